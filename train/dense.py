"""Dense detector training (``dynprune train``)."""

from __future__ import annotations

from typing import Any, Dict, Optional

from dynprune.checkpoint import load_pretrained
from dynprune.config import config_for
from dynprune.data.formats import DatasetSpec
from dynprune.model import build_detector
from dynprune.train.engine import TrainConfig, Trainer


def train_dense(
    spec: DatasetSpec,
    cfg: TrainConfig,
    size: str = "nano",
    pretrained: Optional[str] = None,
    resume: Optional[str] = None,
    log=print,
) -> Dict[str, Any]:
    """Train a fresh (or user-pretrained) detector of ``size`` on ``spec``."""
    model = build_detector(config_for(size, num_classes=len(spec.names)))
    if pretrained:
        loaded, total = load_pretrained(model, pretrained)
        log(f"loaded {loaded}/{total} tensors from {pretrained}")
    trainer = Trainer(model, spec, cfg, log=log)
    if resume:
        trainer.resume(resume)
    return trainer.fit()
