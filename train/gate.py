"""Gate training (``dynprune gate``): ManiDP or FBS gates trained into a dense detector, or into a
statically pruned one (the hybrid engine: static pruning removes what no frame needs, the gates then
drop per frame what this frame does not need)."""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, Optional, Tuple

import torch

from dynprune.checkpoint import model_from_checkpoint
from dynprune.data.formats import DatasetSpec
from dynprune.gates import DEFAULT_GATE_GROUP, init_from_importance, set_gate_mode
from dynprune.manidp import (
    BETA,
    COMPLEXITY_FACTOR,
    DEFAULT_KEEP_ON,
    DEFAULT_SCHEDULE,
    DISTILL_WEIGHT,
    SCHEDULES,
    SIMILARITY_WEIGHT,
    SPARSITY_WEIGHT,
    SaliencyStats,
    collect,
    complexity_weights,
    remain_rate,
    similarity_loss,
    sparsity_loss,
)
from dynprune.model import Detector
from dynprune.train.engine import TrainConfig, Trainer

#: Gate training's default length: 20 epochs, more on a small dataset so that training sees at least
#: GATE_MIN_IMAGES images (200 steps at batch 16). With 80 training images and 20 epochs (100 steps) the
#: gated AP50 was still climbing at the last epoch (BENCHMARKS.md, "Robustness over seeds and datasets").
GATE_EPOCHS = 20
GATE_MIN_IMAGES = 3200


def default_gate_epochs(train_images: int) -> int:
    """``dynprune gate``'s ``--epochs`` default for a training split of ``train_images`` images."""
    return max(GATE_EPOCHS, math.ceil(GATE_MIN_IMAGES / max(1, train_images)))


class GateTrainer(Trainer):
    """Adds ManiDP's complexity-weighted sparsity and manifold similarity losses and resets
    each layer's threshold every epoch (``method='manidp'``), or trains FBS's top-k gates
    (``method='fbs'``, Gao et al. ICLR 2019) with a plain L1 on the saliencies."""

    kind = "gated"

    def __init__(
        self,
        model: Detector,
        spec: DatasetSpec,
        cfg: TrainConfig,
        keep: float = 0.5,
        method: str = "manidp",
        sparsity: float = SPARSITY_WEIGHT,
        similarity: float = SIMILARITY_WEIGHT,
        beta: float = BETA,
        complexity: bool = True,
        threshold_every: int = 0,
        gate_lr_mult: float = 10.0,
        keep_on: str = DEFAULT_KEEP_ON,
        schedule: str = DEFAULT_SCHEDULE,
        distill: float = 0.0,
        teacher: Optional[Detector] = None,
        log=print,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown gate schedule {schedule!r}; choose {' or '.join(SCHEDULES)}")
        self.schedule, self.reach = schedule, SCHEDULES[schedule]
        if not 0 < keep <= 1:
            raise ValueError(f"--keep {keep}: must be in (0, 1]")
        if method not in ("manidp", "fbs"):
            raise ValueError(f"unknown gate method {method!r}; choose manidp or fbs")
        self.keep, self.method = keep, method
        # 0: thresholds reset once per epoch (ManiDP's --thre_freq 1). N > 0: every N steps from the
        # last N steps' saliencies; smoother for short schedules, where a per-epoch jump drops many
        # channels at once. Either way the remain rate anneals over the schedule's first ``reach``.
        self.threshold_every = threshold_every
        self.gate_lr_mult = gate_lr_mult
        self.sparsity_w, self.similarity_w, self.beta, self.complexity = sparsity, similarity, beta, complexity
        self.c_value: Optional[float] = None  # 0.5 * mean per-image loss of the previous epoch
        self._running: Tuple[float, int] = (0.0, 0)
        # The mode is set before the base trainer copies the model (its EMA copy included).
        if method == "fbs":
            set_gate_mode(model, "topk", keep)
        else:
            set_gate_mode(model, "threshold")
        super().__init__(model, spec, cfg, log)
        # "mean": ManiDP's k-th largest mean saliency; "frames": the mean per-frame keep is --keep.
        self.stats = SaliencyStats(self.model.blocks, keep_on=keep_on)
        # An epoch that keeps more channels than the target must not become best.pt: best.pt is the
        # best of the epochs run wholly at the target thresholds (FBS keeps the target from the start).
        self.min_best_epoch = self.first_epoch_at_target() if method == "manidp" else 0
        self.distill = distill
        if distill > 0:
            if teacher is None:
                raise ValueError("distill > 0 needs the dense teacher model")
            self._attach_teacher(teacher)

    def _attach_teacher(self, teacher: Detector) -> None:
        """Block-output distillation: each block's output (the full-width residual stream, which the
        gates never cut) is pulled toward the dense model's on the same images, so that the network
        learns to do without the skipped channels instead of drifting from what the dense model
        computed (FitNets, Romero et al., ICLR 2015, hint loss; used to recover pruned networks)."""
        self.teacher = teacher.to(self.device).eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self._student_out: list = []
        self._teacher_out: list = []

        def keep_student(module, inputs, output):
            if module.training:  # training steps only; validation runs the student alone
                self._student_out.append(output)

        for b in self.model.blocks:
            b.register_forward_hook(keep_student)
        for b in self.teacher.blocks:
            b.register_forward_hook(lambda module, inputs, output: self._teacher_out.append(output))

        def teacher_forward(module, args):
            if module.training:
                self._student_out.clear()
                self._teacher_out.clear()
                with torch.no_grad():
                    self.teacher(args[0])

        self.model.register_forward_pre_hook(teacher_forward)

    def distill_loss(self) -> torch.Tensor:
        """Mean over blocks of ``|student - teacher|^2 / |teacher|^2`` for the last training step."""
        terms = [((s.float() - t.float()) ** 2).mean() / (t.float() ** 2).mean().clamp_min(1e-6)
                 for s, t in zip(self._student_out, self._teacher_out)]
        return torch.stack(terms).mean()

    def first_epoch_at_target(self) -> int:
        """The first (0-based) epoch that runs at the target thresholds."""
        epochs = self.cfg.epochs
        if self.threshold_every:
            # the first epoch whose last step is at the target: the schedule reaches it at step
            # reach * total - 1, which ends an epoch when reach * total is a multiple of an epoch
            return min(epochs - 1, math.ceil(self.reach * self.total_iters / self.iters_per_epoch) - 1)
        # thresholds set at the end of epoch e hold for epoch e + 1
        return next((e for e in range(1, epochs) if self._epoch_remain(e) == self.keep), epochs - 1)

    def _epoch_remain(self, epoch: int) -> float:
        """The kept fraction the thresholds are set to for ``epoch`` (per-epoch mode)."""
        if epoch >= self.cfg.epochs - 1:
            return self.keep
        r = remain_rate(epoch, self.cfg.epochs, self.keep, self.reach)
        return self.keep if abs(r - self.keep) < 1e-12 else r

    def param_groups(self):
        """The base groups, with the freshly added gates at ``gate_lr_mult`` times the learning rate."""
        groups = super().param_groups()
        if len(groups) == 3:
            groups[2]["lr_mult"] = self.gate_lr_mult
        return groups

    def export_model(self) -> Detector:
        """The trained gated model itself, not an EMA: the thresholds are quantiles of *its*
        saliencies, and an averaged copy's saliencies drift from them (ManiDP keeps no EMA)."""
        return self.model

    def gate_info(self) -> Dict[str, Any]:
        mode = "topk" if self.method == "fbs" else "threshold"
        return {"mode": mode, "keep": self.keep, "method": self.method, "complexity": self.complexity,
                "sparsity": self.sparsity_w, "similarity": self.similarity_w, "beta": self.beta,
                "threshold_every": self.threshold_every, "keep_on": self.stats.keep_on, "schedule": self.schedule,
                "distill": self.distill}

    def epoch_start(self, epoch: int) -> None:
        if not self.threshold_every:
            self.stats.reset()
        self._running = (0.0, 0)

    def remain_at(self, step: int) -> float:
        """Step-wise schedule: ManiDP's cosine from 1 to the target over the schedule's ``reach``."""
        p = min(1.0, (step + 1) / max(1.0, self.reach * self.total_iters))
        return (1.0 - self.keep) / 2.0 * math.cos(math.pi * p) + (1.0 + self.keep) / 2.0

    def after_step(self, step: int) -> None:
        if self.method == "manidp" and self.threshold_every and (step + 1) % self.threshold_every == 0:
            self.stats.all_reduce()
            self.stats.apply_thresholds(self.remain_at(step))
            self.stats.reset()

    def extra_loss(self, per_image: torch.Tensor, step: int):
        sal, feats = collect(self.model.blocks)
        self.stats.update(self.model.blocks)
        total, n = self._running
        self._running = (total + float(per_image.detach().sum()), n + per_image.shape[0])
        if self.method == "fbs":
            weights = torch.ones_like(per_image)
        elif not self.complexity:
            weights = torch.ones_like(per_image)  # ablation: every image pushed equally
        else:
            c = self.c_value if self.c_value is not None else COMPLEXITY_FACTOR * self._running[0] / self._running[1]
            weights = complexity_weights(per_image, c, self.beta)
        l_sparse = self.sparsity_w * sparsity_loss(sal, weights)
        l_sim = per_image.new_zeros(())
        if self.method == "manidp" and self.similarity_w > 0 and per_image.shape[0] > 1:
            for s, f in zip(sal, feats):
                l_sim = l_sim + similarity_loss(f, s)
            l_sim = self.similarity_w * l_sim
        logs = {"sp": float(l_sparse.detach()), "sim": float(l_sim.detach())}
        if self.distill > 0:
            l_kd = self.distill * self.distill_loss()
            logs["kd"] = float(l_kd.detach())
            return l_sparse + l_sim + l_kd, logs
        return l_sparse + l_sim, logs

    def epoch_end(self, epoch: int, per_image_losses: torch.Tensor) -> None:
        self.c_value = COMPLEXITY_FACTOR * float(per_image_losses.mean())
        if self.method == "manidp" and not self.threshold_every:
            self.stats.all_reduce()
            self.stats.apply_thresholds(self._epoch_remain(epoch + 1))

    def checkpoint_extra(self) -> Dict[str, Any]:
        return {"gate_state": {"c_value": self.c_value}}

    def load_extra(self, ckpt: Dict[str, Any]) -> None:
        self.c_value = (ckpt.get("gate_state") or {}).get("c_value")


def train_gates(
    weights: str,
    spec: DatasetSpec,
    cfg: TrainConfig,
    keep: float = 0.5,
    method: str = "manidp",
    group: int = DEFAULT_GATE_GROUP,
    resume: Optional[str] = None,
    log=print,
    teacher_weights: Optional[str] = None,
    **loss_options: Any,
) -> Dict[str, Any]:
    """Attach gates to the dense or statically pruned model in ``weights`` and train them in on ``spec``.

    A pruned model's hidden widths differ from block to block; each gate decides whole groups of
    ``group`` channels and, where a width is no multiple of ``group``, a last narrower group (a width
    below ``group`` is one group: all or nothing). Every backend runs such widths (tests/test_backends.py).
    With distillation the teacher is the model in ``teacher_weights`` (default: the model in ``weights``
    itself, pruned or not); it needs the same blocks and residual widths, which pruning leaves as they are."""
    model, ckpt = model_from_checkpoint(weights)
    if model.gated:
        raise ValueError(f"{weights}: already gated; start from a dense or pruned checkpoint")
    if list(ckpt["names"]) != list(spec.names):
        raise ValueError(f"{weights}: trained on classes {ckpt['names']}, dataset has {spec.names}")
    loss_options.setdefault("distill", DISTILL_WEIGHT)
    teacher = None
    if loss_options["distill"] > 0:
        teacher = copy.deepcopy(model) if not teacher_weights else _teacher(teacher_weights, model, weights)
    model.add_gates(group=group)
    for b in model.blocks:  # saliency ordered by BN |gamma| at the start (see init_from_importance)
        init_from_importance(b.gate1, b.cv1.bn.weight.abs())
        init_from_importance(b.gate2, b.cv2.bn.weight.abs())
    trainer = GateTrainer(model, spec, cfg, keep=keep, method=method, teacher=teacher, log=log, **loss_options)
    if resume:
        trainer.resume(resume)
    return trainer.fit()


def _teacher(path: str, student: Detector, weights: str) -> Detector:
    """The distillation teacher in ``path``: an un-gated model whose block outputs match the student's."""
    teacher, _ = model_from_checkpoint(path)
    if teacher.gated:
        raise ValueError(f"{path}: the teacher must be a dense or pruned checkpoint, not a gated one")
    same_blocks = [b.c for b in teacher.blocks] == [b.c for b in student.blocks]
    if not same_blocks or teacher.cfg.num_classes != student.cfg.num_classes:
        raise ValueError(f"{path}: its blocks' widths differ from those of {weights}; distil from the dense model "
                         "this one was pruned from, or from the model itself")
    return teacher


def keep_shortfall(result: Dict[str, Any], keep: float, method: str = "manidp", complexity: bool = True,
                   keep_on: str = DEFAULT_KEEP_ON, margin: float = 0.1) -> Optional[str]:
    """A note when the trained gates keep far fewer hidden channels on the val images (last epoch) than
    ``--keep`` asked for, naming the likely cause and what to change; ``None`` when within ``margin``.

    Why it happens (BENCHMARKS.md, gate ablation): ReLU saliencies that reach exactly 0 cannot be kept
    by any threshold, and ManiDP's thresholds are set on training statistics, not on the val frames."""
    kept = (result.get("last") or {}).get("keep_mean")
    if kept is None or kept >= keep - margin:
        return None
    head = f"the gates keep {kept:.2f} of the hidden channels on the val images, against --keep {keep:g}: "
    if method == "fbs":
        return head + ("FBS's top-k cannot keep channels whose saliency is exactly 0; a higher --keep keeps more "
                       f"(--keep {min(1.0, keep + 0.3):g})")
    if not complexity:
        return head + ("without the complexity weight every image gets the full sparsity push and most saliencies "
                       "reach exactly 0, which no threshold keeps; lower --sparsity (raccoon: 0.02 kept 0.44-0.46)")
    if keep_on == "mean":
        return head + ("ManiDP's thresholds are the k-th largest mean saliency, so single frames keep less; "
                       "--keep-on frames sets them on the per-frame saliencies")
    return head + ("the thresholds were set on the augmented training frames; retrain with a higher --keep, or "
                   f"move them with dynprune calibrate --keep {keep:g} (which costs AP beyond a few points of FLOPs)")


def accuracy_shortfall(gated: Dict[str, Any], dense: Dict[str, Any], keep: float, epochs: int, method: str = "manidp",
                       points: float = 0.05, distill: float = 0.0, base: str = "dense") -> Optional[str]:
    """A warning when the gated best.pt's AP50 (``gated`` metrics) is more than ``points`` below the ``base``
    (dense or pruned) model's it started from, with what to try; ``None`` otherwise or when either AP50 is
    unknown."""
    g, d = gated.get("ap50"), dense.get("ap50")
    if g is None or d is None or g >= d - points:
        return None
    tries = [f"more epochs (--epochs {2 * epochs})", f"a higher --keep ({min(1.0, keep + 0.2):.1f})"]
    if not distill:  # the default; it closed the gap on three datasets (BENCHMARKS.md, "Robustness ...")
        tries.insert(0, f"--distill {DISTILL_WEIGHT:.1f}")
    if method != "fbs":
        tries.append("--gate fbs")
    return (f"the gated model's AP50 {g:.3f} is {100 * (d - g):.1f} points below the {base} model's {d:.3f} at "
            f"--keep {keep:g}; try " + ", ".join(tries))
