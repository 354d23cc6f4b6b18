"""Where a benchmark's JSON comes from: the command, the machine, the commit and the date, which
``report.py`` prints above every table of BENCHMARKS.md.

The commit is ``$DYNPRUNE_COMMIT`` where set (a device machine gets a copy of the working tree
without ``.git``: ``benchmarks/gpu_run.sh`` passes it on), else ``git rev-parse`` of this checkout.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

REPO = Path(__file__).resolve().parent.parent


def commit() -> str:
    given = os.environ.get("DYNPRUNE_COMMIT")
    if given:
        return given
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def machine() -> str:
    """The CPU's architecture and cores, PyTorch's version and, where a CUDA GPU is visible, the GPU
    and Triton's version."""
    text = f"{platform.machine()}, {os.cpu_count()} cores"
    try:
        import torch
    except ImportError:
        return text
    text += f", PyTorch {torch.__version__}"
    if torch.cuda.is_available():
        try:
            import triton

            triton_text = f", Triton {triton.__version__}"
        except ImportError:
            triton_text = ""
        text = f"{torch.cuda.get_device_name()}, {text}{triton_text}"
    return text


def provenance(command: Optional[str] = None) -> Dict[str, Any]:
    """``{"command", "machine", "commit", "date"}`` for a result; the command defaults to this
    process's (``python benchmarks/NAME.py ARGS``)."""
    if command is None:
        script = Path(sys.argv[0])
        where = f"benchmarks/{script.name}" if script.parent.resolve() == REPO / "benchmarks" else sys.argv[0]
        command = " ".join(["python", where, *sys.argv[1:]])
    return {"command": command, "machine": machine(), "commit": commit(), "date": time.strftime("%Y-%m-%d")}
