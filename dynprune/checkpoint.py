"""Checkpoints: written atomically, self-describing (config, class names, image size)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from dynprune.config import DetectorConfig
from dynprune.gates import set_gate_mode
from dynprune.model import Detector

FORMAT = "dynprune-1"


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A run killed mid-write leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: checkpoint not found")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{p}: not a readable checkpoint ({e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(
            f"{p}: not a dynprune checkpoint. To start from your own pretrained weights, "
            "pass a state_dict file with --pretrained (matching keys are loaded)"
        )
    return ckpt


def model_from_checkpoint(ckpt: Dict[str, Any] | str) -> Tuple[Detector, Dict[str, Any]]:
    """Rebuild the model a checkpoint describes (gates included) and load its weights."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    model = Detector(DetectorConfig.from_dict(ckpt["config"]))
    if ckpt.get("gated"):
        model.add_gates()
        gate = ckpt.get("gate") or {}
        set_gate_mode(model, gate.get("mode", "threshold"), gate.get("keep", 1.0))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def load_pretrained(model: Detector, path: str) -> Tuple[int, int]:
    """Load the matching tensors of a user's own weights (dynprune checkpoint or plain state_dict).

    Returns ``(loaded, total)`` tensor counts; tensors whose names or shapes differ are skipped.
    """
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        obj = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state_dict or a dynprune checkpoint")
    own = model.state_dict()
    matched = {k: v for k, v in obj.items() if k in own and own[k].shape == v.shape}
    own.update(matched)
    model.load_state_dict(own)
    return len(matched), len(own)
