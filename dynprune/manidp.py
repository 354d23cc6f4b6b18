"""ManiDP's losses and threshold schedule (Tang et al., CVPR 2021; official code
huawei-noah/Efficient-Computing, Pruning/ManiDP/main.py, whose defaults we keep).

For a detector the per-image detection loss replaces the per-sample cross-entropy as the
measure of an instance's complexity.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from dynprune.layers import Bottleneck

#: Official-code defaults: --lambda_lasso, --lambda_graph, --gamma (our beta), --thre_cls.
SPARSITY_WEIGHT = 0.1
SIMILARITY_WEIGHT = 0.1
BETA = 1.0
COMPLEXITY_FACTOR = 0.5


def complexity_weights(per_image_loss: torch.Tensor, c: float, beta: float = BETA) -> torch.Tensor:
    """w_i = [L_i < C] * ((C - L_i) / C) ** beta  (ManiDP Eq. 8; C = 0.5 * mean loss of the last epoch)."""
    loss = per_image_loss.detach()
    if c <= 0:
        return torch.zeros_like(loss)
    return (loss < c).to(loss.dtype) * ((c - loss) / c).clamp(min=0).pow(beta)


def sparsity_loss(saliencies: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_l mean_i(w_i * mean_c saliency_{l,i})  (ManiDP Eq. 9, the complexity-weighted lasso)."""
    total = weights.new_zeros(())
    for s in saliencies:
        total = total + (s.mean(1) * weights).mean()
    return total


def gram(x: torch.Tensor) -> torch.Tensor:
    """Cosine-similarity matrix of the rows of ``x`` ``(B, D)``."""
    x = F.normalize(x.flatten(1), dim=1)
    return x @ x.t()


def similarity_loss(features: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """||cos-sim(features) - cos-sim(saliency)||_F^2 / B^2  (ManiDP Eq. 6, the manifold alignment)."""
    b = features.shape[0]
    diff = gram(features.detach()) - gram(saliency)
    return (diff * diff).sum() / (b * b)


#: Gate schedules: the fraction of the run over which the kept fraction anneals to the target.
#: "paper": the whole run, as the official code (the last epoch alone runs at the target);
#: "settle": the first 65%, so that the rest fine-tunes the network at its final thresholds.
SCHEDULES = {"settle": 0.65, "paper": 1.0}
DEFAULT_SCHEDULE = "settle"

#: Where the thresholds sit (:class:`SaliencyStats`): "frames" at the quantile of the per-frame
#: saliencies, so that a frame keeps ``--keep`` of its channels on average (what a user asking for a
#: keep of 0.5 expects); "mean" is ManiDP's k-th largest mean saliency, with which frames keep less
#: (0.42 for 0.5 on raccoon) and, on raccoon and its half set, the gated AP50 fell further below
#: dense (BENCHMARKS.md, "Robustness over seeds and datasets").
DEFAULT_KEEP_ON = "frames"

#: ``dynprune gate``'s block-output distillation weight (``--distill``; train/gate.py): each block's
#: output pulled toward the dense model's. Not part of ManiDP; on raccoon, its half set and the
#: synthetic set, three seeds each, it raised the gated AP50 (BENCHMARKS.md, "Robustness over seeds
#: and datasets"). 0 turns it off.
DISTILL_WEIGHT = 1.0


def remain_rate(epoch: int, epochs: int, target: float, reach: float = 1.0) -> float:
    """Cosine annealing of the kept fraction from 1 to ``target`` over the first ``reach`` of the
    epochs, then ``target`` (``reach=1``: the official code's schedule)."""
    p = min(1.0, (epoch + 1) / max(1e-9, reach * epochs))
    return (1.0 - target) / 2.0 * math.cos(math.pi * p) + (1.0 + target) / 2.0


def collect(blocks: Sequence[Bottleneck]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """(saliencies of every gated layer, the pooled feature each gate saw) from the last forward."""
    sal, feats = [], []
    for b in blocks:
        if b.last:
            for s in b.last["saliency"]:
                sal.append(s)
                feats.append(b.last["pooled"])
    return sal, feats


def quantile_threshold(pool: torch.Tensor, keep: float) -> float:
    """The threshold that keeps a fraction ``keep`` of a descending-sorted saliency ``pool``
    (``saliency >= threshold``); never 0, since a zero saliency is never kept."""
    n = max(1, min(pool.numel(), round(keep * pool.numel())))
    value = float(pool[n - 1])
    if value <= 0:  # fewer positive saliencies than asked for: keep all of them
        positive = pool[pool > 0]
        value = float(positive[-1]) if positive.numel() else float("inf")
    return value


class SaliencyStats:
    """Saliency statistics of a stretch of training, for the thresholds.

    ``keep_on="mean"`` (ManiDP): a running per-group sum; the threshold is the k-th largest
    *mean* saliency, k = ceil(remain * groups), so the average saliency vector keeps a fraction
    ``remain``, and a single frame usually keeps less (0.34 for 0.5 measured on the synthetic
    set). ``keep_on="frames"`` (ours): every (frame, group) saliency is kept and the threshold
    is the quantile that keeps a fraction ``remain`` of them, so the mean per-frame keep ratio
    is what was asked for.
    """

    def __init__(self, blocks: Sequence[Bottleneck], keep_on: str = "mean") -> None:
        if keep_on not in ("mean", "frames"):
            raise ValueError(f"keep_on must be 'mean' (ManiDP) or 'frames', got {keep_on!r}")
        self.gates = [g for b in blocks for g in (b.gate1, b.gate2)]
        self.keep_on = keep_on
        self.reset()

    def reset(self) -> None:
        self.sums = [torch.zeros(g.groups, dtype=torch.float64) for g in self.gates]
        self.values: List[List[torch.Tensor]] = [[] for _ in self.gates]
        self.count = 0

    @torch.no_grad()
    def update(self, blocks: Sequence[Bottleneck]) -> None:
        sal, _ = collect(blocks)
        for i, (s, g) in enumerate(zip(sal, self.gates)):
            per_group = s[:, :: g.group].detach().double().cpu()  # channels of a group share a value
            self.sums[i] += per_group.sum(0)
            if self.keep_on == "frames":
                self.values[i].append(per_group.float().flatten())
        self.count += sal[0].shape[0] if sal else 0

    def all_reduce(self) -> None:
        """Combine the statistics of every DistributedDataParallel rank."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for s in self.sums:
                dist.all_reduce(s)
            n = torch.tensor([self.count], dtype=torch.float64)
            dist.all_reduce(n)
            self.count = int(n.item())
            if self.keep_on == "frames":
                gathered: List[Optional[List[torch.Tensor]]] = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, [torch.cat(v) if v else torch.zeros(0) for v in self.values])
                self.values = [[rank[i] for rank in gathered] for i in range(len(self.gates))]

    def pools(self) -> List[torch.Tensor]:
        """Per gate, every (frame, group) saliency collected (``keep_on="frames"``), sorted in
        descending order: what :func:`quantile_threshold` reads."""
        if self.keep_on != "frames":
            raise ValueError("per-frame saliencies are kept only with keep_on='frames'")
        return [torch.cat(v).sort(descending=True).values if v else torch.zeros(0) for v in self.values]

    @torch.no_grad()
    def apply_thresholds(self, remain: float) -> List[float]:
        """Set each layer's threshold for a kept fraction ``remain`` (see the class docstring)."""
        out = []
        pools = self.pools() if self.keep_on == "frames" and remain < 1.0 else [None] * len(self.gates)
        for s, g, pool in zip(self.sums, self.gates, pools):
            if remain >= 1.0:
                thr = 0.0
            elif pool is not None and pool.numel():
                thr = quantile_threshold(pool, remain)
            else:
                mean = s / max(self.count, 1)
                k = max(1, math.ceil(remain * g.groups))
                thr = float(torch.topk(mean, k).values[-1])
            g.threshold.fill_(thr)
            out.append(thr)
        return out
