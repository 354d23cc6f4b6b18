"""What a Python statement costs inside the running network, against timeit on its own.

    python benchmarks/results/cpu_session14/python_cost_in_situ.py dense.pt g0.5.pt ../shared/datasets/raccoon

For each compact block of the gated model, its input from a real frame is run through the block's
forward (the lean path) by three wrappers: one adding nothing, one adding the tensor checks the
per-image loop makes (``x.device.type``, ``x.dtype``), one adding a fresh kept-count array and an
attribute set (``np.empty``, an item assignment, ``module.attr = ...``). The three alternate call by
call (both orders), 3000 calls each; median microseconds per block. Then the same statements
under timeit, alone. The dense and dynamic networks are not run here.
"""

from __future__ import annotations

import sys
import time
import timeit

import numpy as np
import torch

sys.path.insert(0, "benchmarks")
from cpu_dynamic import frames_from  # noqa: E402

from dynprune.checkpoint import model_from_checkpoint  # noqa: E402
from dynprune.compact import CompactDetector  # noqa: E402


def main() -> None:
    _, gated_path, data = sys.argv[1:4]
    torch.set_num_threads(2)
    gated, _ = model_from_checkpoint(gated_path)
    net = CompactDetector(gated)
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda m, i: inputs.append(i[0].clone().contiguous(
        memory_format=torch.channels_last))) for b in net.blocks]
    with torch.inference_mode():
        net(frames_from(data, 320, 1)[0])
    for h in hooks:
        h.remove()

    def wrapped(blk):  # the same extra call as the two forms below, with nothing added
        def forward(x):
            return type(blk).forward(blk, x)
        return forward

    def with_checks(blk):
        def forward(x):
            if x.device.type != "cpu" or x.dtype != torch.float32:
                raise ValueError
            return type(blk).forward(blk, x)
        return forward

    def with_attribute(blk):
        def forward(x):
            kept = np.empty((1, 2), dtype=np.int64)
            kept[0] = 1, 2
            blk.scratch_attribute = kept
            return type(blk).forward(blk, x)
        return forward

    print(f"{'block':<6}{'input':<18}{'lean us':>9}{'+checks':>9}{'+attr':>9}")
    rows = []
    with torch.inference_mode():
        for i, (blk, x) in enumerate(zip(net.blocks, inputs)):
            forms = {"lean": wrapped(blk), "checks": with_checks(blk), "attr": with_attribute(blk)}
            times = {k: [] for k in forms}
            items = list(forms.items())
            for r in range(3000):
                for k, f in (items if r % 2 else items[::-1]):
                    t0 = time.perf_counter()
                    f(x)
                    times[k].append(time.perf_counter() - t0)
            med = {k: float(np.median(v)) * 1e6 for k, v in times.items()}
            rows.append(med)
            print(f"{i:<6}{str(tuple(x.shape)):<18}{med['lean']:>9.1f}{med['checks']:>9.1f}{med['attr']:>9.1f}")
    print(f"mean added: checks {np.mean([r['checks'] - r['lean'] for r in rows]):.1f} us, "
          f"array + attribute {np.mean([r['attr'] - r['lean'] for r in rows]):.1f} us a block")
    x = inputs[0]
    blk = net.blocks[0]
    kept = np.empty((1, 2), dtype=np.int64)
    n = 200_000
    alone = {
        "checks": timeit.timeit(lambda: x.device.type != "cpu" or x.dtype != torch.float32, number=n) / n,
        "array + attribute": timeit.timeit(lambda: (np.empty((1, 2), dtype=np.int64).__setitem__(0, (1, 2)),
                                                    setattr(blk, "scratch_attribute", kept)), number=n) / n,
    }
    print("timeit alone: " + ", ".join(f"{k} {v * 1e6:.2f} us" for k, v in alone.items()))


if __name__ == "__main__":
    main()
