"""Per-layer time of the dense and the dynamic nano detector with 1 and 2 threads (BENCHMARKS.md, session 13).

    python benchmarks/results/cpu_session13/thread_scaling.py DENSE.pt GATED.pt DATASET

Both models run in one process on the same frames; the thread count alternates 2, 1, 2, 1 between passes, so
that a slow spell of the machine hits both counts. Forward hooks time every stage module (microseconds a frame).
"""

from __future__ import annotations

import collections
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # benchmarks/, for cpu_dynamic

from cpu_dynamic import frames_from  # noqa: E402

from dynprune.checkpoint import model_from_checkpoint  # noqa: E402
from dynprune.compact import CompactDetector, dense_inference_model  # noqa: E402


def stage_modules(net):
    mods = [("stem", net.stem)]
    for i, stage in enumerate(net.stages):
        mods += [(f"s{i}.{j}", m) for j, m in enumerate(stage)]
    mods += [(f"lat{i}", m) for i, m in enumerate(net.lateral)]
    mods += [(f"fpn{i}", m) for i, m in enumerate(net.fpn_blocks)]
    return mods


def instrument(model, sink: dict) -> None:
    """Add each stage module's forward time to ``sink["times"][name]`` (seconds)."""
    started = {}

    def before(name):
        return lambda module, inputs: started.__setitem__(name, time.perf_counter())

    def after(name):
        def hook(module, inputs, output):
            sink["times"][name] += time.perf_counter() - started[name]
        return hook

    for name, module in stage_modules(model.net):
        module.register_forward_pre_hook(before(name))
        module.register_forward_hook(after(name))


def main() -> None:
    dense, _ = model_from_checkpoint(sys.argv[1])
    gated, _ = model_from_checkpoint(sys.argv[2])
    frames = frames_from(sys.argv[3], 320, 40)
    models = {"dense": dense_inference_model(dense), "dynamic": CompactDetector(gated)}
    sinks = {key: {"times": collections.defaultdict(float)} for key in models}
    for key, model in models.items():
        instrument(model, sinks[key])
    per_frame = {(key, threads): collections.Counter() for key in models for threads in (1, 2)}
    for threads in (2, 1, 2, 1):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            for f in frames[:10]:  # warm-up at this thread count
                for model in models.values():
                    model(f)
            for sink in sinks.values():
                sink["times"].clear()
            for f in frames:
                for model in models.values():
                    model(f)
        for key in models:  # two passes per thread count: half of each
            for name, seconds in sinks[key]["times"].items():
                per_frame[key, threads][name] += seconds / (2 * len(frames)) * 1e6
    columns = [("dense", 2), ("dense", 1), ("dynamic", 2), ("dynamic", 1)]
    print(f"{'layer':8s}" + "".join(f"{f'{k} {t}t':>12s}" for k, t in columns))
    for name in per_frame["dense", 2]:
        print(f"{name:8s}" + "".join(f"{per_frame[c][name]:12.0f}" for c in columns))
    print(f"{'sum':8s}" + "".join(f"{sum(per_frame[c].values()):12.0f}" for c in columns))


if __name__ == "__main__":
    main()
