"""How often each gated block's kept lists equal the previous frame's (BENCHMARKS.md, session 13).

    python benchmarks/results/cpu_session13/kept_list_repeats.py GATED.pt (SOURCE | DATASET) [--frames N]

A source is anything ``dynprune serve --source`` takes (a video file gives consecutive frames, a stream); a dataset
(``--dataset``) gives its distinct val images. Runs the CPU compact path with
the compiled gate step and reads each block's kept lists from it.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # benchmarks/, for cpu_dynamic

from cpu_dynamic import frames_from  # noqa: E402

from dynprune.boxes import letterbox  # noqa: E402
from dynprune.checkpoint import model_from_checkpoint  # noqa: E402
from dynprune.compact import CompactDetector  # noqa: E402
from dynprune.data.dataset import to_tensor  # noqa: E402


def stream_frames(uri: str, imgsz: int, limit: int):
    """The first ``limit`` frames of a serving source, letterboxed as the engines do."""
    from dynprune.serve.sources import iterate, open_source

    frames = [to_tensor(letterbox(frame.image, imgsz)[0]) for frame in iterate(open_source(uri), limit)]
    if not frames:
        raise SystemExit(f"{uri}: no frames could be read")
    return frames


def repeat_rates(compact: CompactDetector, frames) -> np.ndarray:
    """``(blocks,)`` share of frames after the first whose kept lists (both gates) equal the previous frame's."""
    previous = [None] * len(compact.blocks)
    same = np.zeros(len(compact.blocks))
    with torch.inference_mode():
        for n, frame in enumerate(frames):
            compact(frame)
            for i, block in enumerate(compact.blocks):
                plan = block._native
                if plan is None:
                    raise SystemExit("the compiled gate step is not available (no C compiler?)")
                kept1, kept2, slots1, _ = plan.counts.tolist()
                lists = (plan.index[:kept1].tobytes(), plan.index[slots1 : slots1 + kept2].tobytes())
                same[i] += n > 0 and lists == previous[i]
                previous[i] = lists
    return same / max(1, len(frames) - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gated")
    ap.add_argument("frames", help="a serving source (video file, camera, folder), or with --dataset a dataset")
    ap.add_argument("--dataset", action="store_true", help="FRAMES is a dataset: its val images are the frames")
    ap.add_argument("--frames", dest="limit", type=int, default=300)
    ap.add_argument("--imgsz", type=int, default=320)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, _ = model_from_checkpoint(args.gated)
    if args.dataset:
        frames = frames_from(args.frames, args.imgsz, args.limit)
    else:
        frames = stream_frames(args.frames, args.imgsz, args.limit)
    rates = repeat_rates(CompactDetector(model), frames)
    print(f"{len(frames)} frames; kept lists equal to the previous frame's, per block:")
    print(" ".join(f"{r:.2f}" for r in rates), f"(mean {rates.mean():.2f})")


if __name__ == "__main__":
    main()
