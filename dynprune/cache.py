"""dynprune's per-user cache folder (``$DYNPRUNE_CACHE_DIR``, else ``~/.cache/dynprune``): the
compiled CPU blocks (kernels/cpu_blocks.py), the verdicts of the Triton trial
(kernels/triton_trial.py) and the Triton kernels' tiles tuned per GPU (kernels/conv_tiles.py).
Everything in it can be deleted; it is made again when needed (tuned tiles by dynprune tune)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("DYNPRUNE_CACHE_DIR") or Path.home() / ".cache" / "dynprune")
