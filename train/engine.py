"""The training engine every loop shares: data, optimiser, schedule, EMA, AMP, DDP,
validation, atomic checkpoints and exact resume at epoch boundaries.

Subclasses (gate training, EFFP) add terms to the loss and act at epoch or step
boundaries through the ``extra_loss``/``epoch_start``/``after_step`` hooks.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from dynprune.checkpoint import load_checkpoint, make_checkpoint, save_atomic
from dynprune.data.dataset import DetectionDataset, collate
from dynprune.data.formats import DatasetSpec
from dynprune.loss import DetectionLoss
from dynprune.model import Detector
from dynprune.train.ema import ModelEMA
from dynprune.validate import run_validation


@dataclass
class TrainConfig:
    """Hyper-parameters of a training run. Defaults suit a one-class set of a few hundred images."""

    epochs: int = 60
    batch: int = 16
    imgsz: int = 320
    lr: float = 2e-3
    final_lr: float = 0.05  # as a fraction of lr, reached by the cosine at the last step
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    mosaic: float = 0.3
    augment: bool = True
    workers: int = 2
    device: str = "auto"
    seed: int = 0
    val_every: int = 1
    out: str = "runs/train"
    amp: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def fitness(metrics: Dict[str, float]) -> float:
    """What ``best.pt`` is chosen by: the mean of AP50 and AP50-95.

    On a validation split of tens of images either metric alone swings by several points from one
    epoch to the next; picking the epoch with the best AP50-95 alone often lands on a noisy epoch
    whose AP50 is far below its neighbours' (BENCHMARKS.md, "Robustness over seeds and datasets",
    lists how far, for each rule). The mean serves users who judge by either metric."""
    return 0.5 * (float(metrics.get("ap50", 0.0)) + float(metrics.get("ap50_95", 0.0)))


def _dist_info() -> Tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


class Trainer:
    """Trains ``model`` on ``spec`` and writes ``last.pt``/``best.pt`` under ``cfg.out``."""

    kind = "dense"

    def __init__(self, model: Detector, spec: DatasetSpec, cfg: TrainConfig, log=print) -> None:
        self.cfg, self.spec, self.log = cfg, spec, log
        self.world, self.rank, local = _dist_info()
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            self.device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
        else:
            self.device = pick_device(cfg.device)
        self.out = Path(cfg.out)
        # channels_last: ~13% faster convolutions on the CPU (measured), the layout tensor cores want.
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.loss_fn = DetectionLoss(model.cfg.num_classes)
        self.start_epoch = 0
        self.min_best_epoch = 0  # epochs before this one never become best.pt
        self.best = -1.0  # fitness of best.pt's epoch
        self.best_record: Optional[Dict[str, Any]] = None  # its record (epoch, metrics)
        self.history: List[Dict[str, Any]] = []
        self._seed(cfg.seed)
        self.train_set = DetectionDataset(spec.train, cfg.imgsz, augment=cfg.augment, mosaic=cfg.mosaic, seed=cfg.seed)
        self.sampler = DistributedSampler(self.train_set, seed=cfg.seed) if self.world > 1 else None
        self.optimizer = torch.optim.AdamW(self.param_groups(), lr=cfg.lr, betas=(0.9, 0.999))
        self.iters_per_epoch = max(1, math.ceil(len(self.train_set) / (cfg.batch * self.world)))
        self.total_iters = self.iters_per_epoch * cfg.epochs
        self.ema = ModelEMA.for_run(self.model, self.total_iters)
        use_amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        self.autocast = torch.autocast("cuda", enabled=use_amp) if use_amp else torch.autocast("cpu", enabled=False)
        self.ddp_model: nn.Module = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)

    # ---------------------------------------------------------------- hooks for subclasses
    def param_groups(self) -> List[Dict[str, Any]]:
        """Weight decay on conv/linear weights only; never on BN, biases or gates (ManiDP)."""
        decay, no_decay, gates = [], [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if ".gate" in name:
                gates.append(p)
            elif p.ndim <= 1:
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if gates:
            groups.append({"params": gates, "weight_decay": 0.0})
        return groups

    def extra_loss(self, per_image: torch.Tensor, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        return per_image.new_zeros(()), {}

    def epoch_start(self, epoch: int) -> None:
        pass

    def epoch_end(self, epoch: int, per_image_losses: torch.Tensor) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def checkpoint_extra(self) -> Dict[str, Any]:
        return {}

    def load_extra(self, ckpt: Dict[str, Any]) -> None:
        pass

    def export_model(self) -> Detector:
        """The model that goes into ``best.pt``/``last.pt`` (the EMA weights)."""
        return self.ema.ema

    def gate_info(self) -> Optional[Dict[str, Any]]:
        return None

    # ---------------------------------------------------------------- machinery
    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to ``final_lr * lr`` (Loshchilov & Hutter, ICLR 2017)."""
        warm = max(1, int(self.cfg.warmup_epochs * self.iters_per_epoch))
        if step < warm:
            return self.cfg.lr * (0.1 + 0.9 * step / warm)
        t = (step - warm) / max(1, self.total_iters - warm)
        return self.cfg.lr * (self.cfg.final_lr + (1 - self.cfg.final_lr) * 0.5 * (1 + math.cos(math.pi * t)))

    def resume(self, path: str) -> None:
        ckpt = load_checkpoint(path)
        state = ckpt.get("train_state")
        if state is None:
            raise ValueError(f"{path}: has no training state to resume from (a best.pt? use last.pt)")
        if ckpt.get("kind") != self.kind:
            raise ValueError(f"{path}: a {ckpt.get('kind')} run's checkpoint cannot resume a {self.kind} run")
        if list(ckpt.get("names") or []) != list(self.spec.names):
            raise ValueError(f"{path}: trained on classes {ckpt.get('names')}, the dataset has {self.spec.names}")
        if ckpt["epoch"] + 1 >= self.cfg.epochs:
            raise ValueError(f"{path}: the run has finished {ckpt['epoch'] + 1} of {self.cfg.epochs} epochs; "
                             "give more epochs to train it longer")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ValueError(f"{path}: its model differs from this run's ({str(e).splitlines()[0]})") from e
        self.ema.ema.load_state_dict(ckpt["model"])
        self.ema.updates = state["ema_updates"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = ckpt["epoch"] + 1
        self.history = state["history"]
        # recomputed from the history, so that a run saved under another fitness rule resumes under this one
        for r in self.history:
            self._consider_for_best(r)
        self.load_extra(ckpt)
        self.log(f"resuming {path}: epoch {self.start_epoch + 1}/{self.cfg.epochs}")

    def _consider_for_best(self, record: Dict[str, Any]) -> bool:
        """Whether a validated epoch's ``record`` beats best.pt's so far (and may become best.pt);
        if so it becomes the best."""
        if "ap50_95" not in record or record["epoch"] - 1 < self.min_best_epoch or fitness(record) <= self.best:
            return False
        self.best, self.best_record = fitness(record), record
        return True

    def _save(self, epoch: int, metrics: Dict[str, Any], is_best: bool) -> None:
        model = self.export_model()
        ckpt = make_checkpoint(
            model, self.spec.names, self.cfg.imgsz, self.kind, gate=self.gate_info(), epoch=epoch,
            metrics={k: v for k, v in metrics.items() if not isinstance(v, list)},
            train_config=asdict(self.cfg), data=self.spec.source, **self.checkpoint_extra(),
        )
        last = dict(ckpt)
        last["train_state"] = {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "ema_updates": self.ema.updates,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "best": self.best,
            "history": self.history,
        }
        save_atomic(last, self.out / "last.pt")
        if is_best:
            save_atomic(ckpt, self.out / "best.pt")

    def fit(self) -> Dict[str, Any]:
        from tqdm import tqdm

        cfg = self.cfg
        main = self.rank == 0
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
            if self.start_epoch == 0:  # a new run: a new record (a resumed one appends)
                (self.out / "results.jsonl").write_text("")
        loader_gen = torch.Generator()
        metrics: Dict[str, Any] = {}
        for epoch in range(self.start_epoch, cfg.epochs):
            self.train_set.set_epoch(epoch)
            loader_gen.manual_seed(cfg.seed * 1000 + epoch)
            if self.sampler is not None:
                self.sampler.set_epoch(epoch)
            loader = DataLoader(
                self.train_set, batch_size=cfg.batch, shuffle=self.sampler is None, sampler=self.sampler,
                num_workers=cfg.workers, collate_fn=collate, drop_last=len(self.train_set) >= 2 * cfg.batch,
                generator=loader_gen, persistent_workers=False,
            )
            self.epoch_start(epoch)
            self.model.train()
            losses, per_image_all = [], []
            # A progress bar on a terminal; in a log file the per-epoch lines say enough.
            bar = tqdm(loader, desc=f"{self.kind} {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                       disable=not (main and sys.stderr.isatty()))
            t0 = time.time()
            for i, (images, targets, _) in enumerate(bar):
                step = epoch * self.iters_per_epoch + i
                for g in self.optimizer.param_groups:
                    g["lr"] = self.lr_at(step) * g.get("lr_mult", 1.0)
                images = images.to(self.device, non_blocking=True, memory_format=torch.channels_last)
                with self.autocast:
                    boxes, logits = self.ddp_model(images)
                    points, strides = self.model.anchors(tuple(images.shape[-2:]), images.device, boxes.dtype)
                    per_image, parts = self.loss_fn(boxes, logits, targets, points, strides)
                    extra, extra_logs = self.extra_loss(per_image, step)
                    loss = per_image.mean() + extra
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1} step {i}; "
                                             "lower --lr or check the labels")
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.after_step(step)
                self.ema.update(self.model)
                losses.append(loss.item())
                per_image_all.append(per_image.detach().float().cpu())
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", cls=f"{parts['cls']:.3f}",
                                box=f"{parts['box']:.3f}", **{k: f"{v:.3f}" for k, v in extra_logs.items()})
            self.epoch_end(epoch, torch.cat(per_image_all))
            record: Dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "time_s": time.time() - t0}
            if main and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                metrics = run_validation(self.export_model(), self.spec.val, self.spec.names, cfg.imgsz,
                                         batch=cfg.batch, device=self.device)
                record.update({k: v for k, v in metrics.items() if not isinstance(v, list)})
            self.history.append(record)
            if main:
                is_best = self._consider_for_best(record)
                self._save(epoch, record, is_best or not (self.out / "best.pt").exists())
                # one line an epoch, for plots and scripts; eligible: an epoch that may become best.pt
                with open(self.out / "results.jsonl", "a") as f:
                    f.write(json.dumps({**record, "best": is_best, "eligible": epoch >= self.min_best_epoch}) + "\n")
                self.log(self.format_record(record))
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
        return {"history": self.history, "best": self.best_record, "last": metrics}

    def format_record(self, r: Dict[str, Any]) -> str:
        s = f"epoch {r['epoch']:3d}/{self.cfg.epochs}  loss {r['loss']:.4f}  {r['time_s']:.0f}s"
        if "ap50" in r:
            s += f"  P {r['precision']:.3f}  R {r['recall']:.3f}  AP50 {r['ap50']:.4f}  AP50-95 {r['ap50_95']:.4f}"
        if "flops_mean" in r:
            s += f"  FLOPs {r['flops_mean']:.3f} (p95 {r['flops_p95']:.3f})"
        return s
