"""Whole networks with and without oneDNN weights made once (``prepack_convolutions``).

    python benchmarks/results/cpu_session14/prepacked_network_ab.py dense.pt gates.pt ../shared/datasets/raccoon

For the dense and the dynamic network in turn, two instances in one process, one with every
``FoldedConv.prepack`` off; ``time_interleaved`` on 40 frames, four passes in alternating order;
p50 ms per frame.
"""

from __future__ import annotations

import sys

import torch

sys.path.insert(0, "benchmarks")
from cpu_dynamic import frames_from, time_interleaved  # noqa: E402

from dynprune.checkpoint import model_from_checkpoint  # noqa: E402
from dynprune.compact import CompactDetector, DenseInference  # noqa: E402
from dynprune.fusion import FoldedConv  # noqa: E402


def without_prepacking(net: torch.nn.Module) -> torch.nn.Module:
    for m in net.modules():
        if isinstance(m, FoldedConv):
            m.prepack = False
    return net


def main() -> None:
    dense_path, gated_path, data = sys.argv[1:4]
    torch.set_num_threads(2)
    frames = frames_from(data, 320, 40)
    for name, build, path in (("dense", DenseInference, dense_path), ("dynamic", CompactDetector, gated_path)):
        model, _ = model_from_checkpoint(path)
        plain, packed = without_prepacking(build(model)), build(model)
        for order in ((plain, packed), (packed, plain)) * 2:
            (a, _), (b, _) = time_interleaved(list(order), frames)
            t_plain, t_packed = (a, b) if order[0] is plain else (b, a)
            print(f"{name:<8} conv2d {t_plain:6.2f} ms   weights made once {t_packed:6.2f} ms   "
                  f"{(1 - t_packed / t_plain) * 100:4.1f}% faster")


if __name__ == "__main__":
    main()
