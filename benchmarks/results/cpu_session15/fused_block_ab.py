"""The fused compact block and the dense block's two forms, each A/B in one process (BENCHMARKS.md, session 15).

    python benchmarks/results/cpu_session15/fused_block_ab.py dense.pt gates.pt ../shared/datasets/raccoon

1. dynamic: every compact block as one compiled call (``CompactBottleneck.fused``, the default) against the
   compiled gate step followed by PyTorch's products (``fused = False``);
2. dense: each block's faster one-image form, chosen on its first frames (``FoldedBottleneck``, the default),
   against oneDNN's form only (``native = False``);
3. the gated model with every gate open (saliency 1 everywhere), fused blocks, against the dense network:
   what the compiled products cost at full width.

Each pair: two engines, ``time_interleaved`` on 40 frames, six passes in alternating order; p50 ms a frame.
"""

from __future__ import annotations

import sys

import torch

sys.path.insert(0, "benchmarks")
from cpu_dynamic import frames_from, time_interleaved  # noqa: E402

from dynprune.checkpoint import model_from_checkpoint  # noqa: E402
from dynprune.compact import CompactDetector, DenseInference  # noqa: E402
from dynprune.fusion import FoldedBottleneck  # noqa: E402


def ab(name: str, label_a: str, a, label_b: str, b, frames, passes: int = 6) -> None:
    gains = []
    for i in range(passes):
        order = [a, b] if i % 2 == 0 else [b, a]
        (t0, _), (t1, _) = time_interleaved(order, frames)
        ta, tb = (t0, t1) if order[0] is a else (t1, t0)
        gains.append(1 - tb / ta)
        print(f"{name:<9} {label_a} {ta:6.2f} ms   {label_b} {tb:6.2f} ms   {gains[-1] * 100:5.1f}% faster", flush=True)
    print(f"{name:<9} mean {sum(gains) / len(gains) * 100:.1f}% faster with {label_b}", flush=True)


def main() -> None:
    dense_path, gated_path, data = sys.argv[1:4]
    torch.set_num_threads(2)
    frames = frames_from(data, 320, 40)
    gated, _ = model_from_checkpoint(gated_path)
    plain, fused = CompactDetector(gated), CompactDetector(gated)
    for blk in plain.blocks:
        blk.fused = False
    ab("dynamic", "step + PyTorch", plain, "fused block", fused, frames)

    dense, _ = model_from_checkpoint(dense_path)
    onednn, chosen = DenseInference(dense), DenseInference(dense)
    for m in onednn.modules():
        if isinstance(m, FoldedBottleneck):
            m.native = False
    ab("dense", "oneDNN blocks", onednn, "faster form", chosen, frames)
    with torch.inference_mode():
        chosen(frames[0])
    print(
        "dense blocks' choice (1: compiled):",
        [dict(m._forms.chosen) for m in chosen.modules() if isinstance(m, FoldedBottleneck)],
    )

    with torch.no_grad():  # every gate open at saliency 1: full widths, unscaled
        for b in gated.blocks:
            for g in (b.gate1, b.gate2):
                g.threshold.zero_()
                g.fc2.weight.zero_()
                g.fc2.bias.fill_(1.0)
    ab("open", "dense", chosen, "gates open, fused", CompactDetector(gated), frames, passes=2)


if __name__ == "__main__":
    main()
