"""Checkpoints: written atomically, self-describing (config, class names, image size), and
loaded without running code.

A checkpoint holds tensors and plain values only (dicts, lists, tuples, strings, numbers), so
every load uses ``torch.load(weights_only=True)``: a file whose pickle asks for anything else
(a crafted ``__reduce__`` that would run a shell command, say) is refused before any of it runs.
Checkpoints written before this rule may hold NumPy scalars and arrays in their metrics; those
few NumPy reconstructors are allow-listed by name, and checkpoints are now written with plain
Python numbers instead.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from dynprune.config import DetectorConfig
from dynprune.gates import set_gate_mode
from dynprune.model import Detector

FORMAT = "dynprune-1"


class CheckpointError(ValueError):
    """A file that is not a checkpoint dynprune can load safely: the message says which and why."""


# What older dynprune checkpoints may need beyond tensors: NumPy scalars (metrics) and small arrays.
# Each rebuilds a number or an array from bytes and a dtype; none calls anything else.
_NUMPY_GLOBALS = ("numpy.dtype", "numpy.ndarray", "numpy.core.multiarray._reconstruct",
                  "numpy._core.multiarray._reconstruct", "numpy.core.multiarray.scalar",
                  "numpy._core.multiarray.scalar")


def _numpy_allowlist() -> List[Any]:
    import importlib

    objs: List[Any] = [np.dtype, np.ndarray]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        objs += [m._reconstruct, m.scalar]
        break
    # NumPy 1.25+ pickles a dtype through its class (numpy.dtypes.Float64DType, ...)
    for name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"):
        objs.append(type(np.dtype(name)))
    return objs


def _allowed_global(name: str) -> bool:
    return name in _NUMPY_GLOBALS or (name.startswith("numpy.dtypes.") and name.endswith("DType"))


def _plain(obj: Any) -> Any:
    """``obj`` with NumPy scalars as Python numbers and NumPy arrays as tensors, so that the file
    loads with ``weights_only=True`` on any torch release, without an allow-list."""
    if isinstance(obj, dict):
        plain = {k: _plain(v) for k, v in obj.items()}
        return OrderedDict(plain) if isinstance(obj, OrderedDict) else plain
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    return obj


def safe_load(path: str | os.PathLike) -> Any:
    """``torch.load`` that never runs code from the file: tensors, plain containers and numbers
    only (plus NumPy scalars and arrays from older dynprune checkpoints).

    Raises :class:`CheckpointError` naming the file and, where torch can tell, the callable the
    file asked for.
    """
    p = Path(path)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = e
    except Exception as e:  # truncated zip, random bytes, a directory, ...
        raise CheckpointError(f"{p}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    wanted: List[str] = []
    lister = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if lister is not None:
        try:
            wanted = list(lister(p))
        except Exception as e:  # not a torch zip archive at all: random bytes, an old-style pickle
            raise CheckpointError(f"{p}: not a readable checkpoint (not a file written by torch.save; "
                                  f"{type(e).__name__})") from first
    refused = [g for g in wanted if not _allowed_global(g)]
    if refused or not wanted or not hasattr(torch.serialization, "safe_globals"):
        what = f"it asks to call {', '.join(refused[:3])} while loading" if refused else \
            f"it holds more than tensors and plain values ({str(first).splitlines()[-1][:160]})"
        raise CheckpointError(
            f"{p}: refused, {what}. dynprune checkpoints and bundles hold only tensors and plain values, so "
            "this file was not written by dynprune or was altered; nothing in it was run") from first
    with torch.serialization.safe_globals(_numpy_allowlist()):
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{p}: not a readable checkpoint ({str(e).splitlines()[0][:200]})") from e


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A run killed mid-write leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(_plain(obj), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(path: Path) -> List[Path]:
    """Delete the temporaries that writers of ``path`` killed mid-write left behind
    (``.last.pt.<pid>.<random>`` whose process is gone); returns what was removed."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid.isdigit():  # an older writer's name, without a pid: left alone unless an hour old
            try:
                stale = time.time() - tmp.stat().st_mtime > 3600
            except OSError:
                continue
        else:
            stale = not _process_alive(int(pid))
        if stale:
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def make_checkpoint(
    model: Detector, names, imgsz: int, kind: str, gate: Optional[Dict[str, Any]] = None, **extra: Any
) -> Dict[str, Any]:
    return {
        "format": FORMAT,
        "kind": kind,
        "config": model.cfg.to_dict(),
        "gated": model.gated,
        "gate": gate,
        "names": list(names),
        "imgsz": int(imgsz),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }


def load_checkpoint(path: str | os.PathLike) -> Dict[str, Any]:
    """Load a dynprune checkpoint safely (see :func:`safe_load`) and check that it is one."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: checkpoint not found")
    ckpt = safe_load(p)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{p}: not a dynprune checkpoint. To start from your own pretrained weights, "
            "pass a state_dict file with --pretrained (matching keys are loaded)"
        )
    return ckpt


def base_of(ckpt: Dict[str, Any]) -> str:
    """``"pruned"`` when the checkpoint's model has the hidden widths static pruning left (a pruned
    checkpoint, or gates trained into one: the hybrid engine's), ``"dense"`` otherwise."""
    return "pruned" if (ckpt.get("config") or {}).get("hidden") else "dense"


def trained_into(ckpt: Dict[str, Any]) -> Optional[str]:
    """The checkpoint a gated checkpoint's gates were trained into, as ``dynprune gate`` recorded it."""
    return (ckpt.get("train_config") or {}).get("extra", {}).get("dense")


def model_from_checkpoint(ckpt: Dict[str, Any] | str) -> Tuple[Detector, Dict[str, Any]]:
    """Rebuild the model a checkpoint describes (gates included) and load its weights."""
    where = "checkpoint"
    if not isinstance(ckpt, dict):
        where = str(ckpt)
        ckpt = load_checkpoint(ckpt)
    try:
        model = Detector(DetectorConfig.from_dict(ckpt["config"]))
        if ckpt.get("gated"):
            model.add_gates()
            gate = ckpt.get("gate") or {}
            set_gate_mode(model, gate.get("mode", "threshold"), gate.get("keep", 1.0))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{where}: its model description and weights do not fit together "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); the file is damaged") from e
    return model.eval(), ckpt


def load_pretrained(model: Detector, path: str) -> Tuple[int, int]:
    """Load the matching tensors of a user's own weights (dynprune checkpoint or plain state_dict).

    Returns ``(loaded, total)`` tensor counts; tensors whose names or shapes differ are skipped.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: --pretrained weights not found")
    obj = safe_load(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        obj = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state_dict or a dynprune checkpoint")
    obj = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    own = model.state_dict()
    matched = {k: v for k, v in obj.items() if k in own and own[k].shape == v.shape}
    own.update(matched)
    model.load_state_dict(own)
    return len(matched), len(own)
