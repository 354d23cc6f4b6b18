"""Threshold calibration: make a gated model's *realised* per-frame cost hit a target.

ManiDP sets each layer's threshold to the k-th largest training-set *mean* saliency, with
k = ceil(remain_rate * C) (Tang et al., CVPR 2021, Sec. 3.3 and the official code). That
keeps a fraction ``remain_rate`` of each layer's channels on the *average* saliency vector,
not on each frame: a frame keeps only the channels whose own saliency clears the bar, and
measured keep ratios land well under the target (0.34 for ``--keep 0.5`` on the synthetic
set, 0.46 on raccoon). Users who ask for 50% expect 50%, and a fair comparison of gating
methods needs them at *matched* mean FLOPs.

:func:`calibrate` searches, by bisection, one scalar per method until the mean per-frame
keep ratio or FLOPs fraction over a set of training images equals the target. No weight
changes; the scalar's midpoint is the trained model itself.

* ManiDP: a factor ``m`` on every layer's *realised* keep fraction. Each gate's threshold
  keeps some fraction ``k`` of the (frame, channel) saliencies of the calibration images;
  the new threshold is the saliency quantile that keeps ``min(1, m * k)``. Every layer
  moves in proportion, so the balance between layers that training settled on is kept.
  Two simpler knobs were measured and dropped: re-deriving ManiDP's thresholds from fresh
  (eval-mode) mean saliencies cost 6 AP50 points on raccoon at the trained FLOPs, and one
  common factor on the thresholds shut whole layers (the ones with flat saliencies) first,
  AP50 0.70 -> 0.01 for a 5% FLOPs cut.
* FBS: the top-k ratio, the same in every layer as in training.

A target can be out of reach: a channel whose saliency is exactly 0 (the gates' last ReLU)
is never kept, whatever the threshold, so gates trained to silence most channels cannot be
calibrated up to a high keep ratio. :class:`Calibration` says so (``reachable``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch

from dynprune.flops import CostModel
from dynprune.gates import Gate
from dynprune.manidp import SaliencyStats, quantile_threshold
from dynprune.model import Detector

#: What a target can be: the mean kept fraction of hidden channels, or the FLOPs per frame as
#: a fraction of the dense model's.
MEASURES = ("keep", "flops")


@dataclass
class Calibration:
    """The outcome of :func:`calibrate`."""

    measure: str
    target: float
    achieved: float
    knob: float  # ManiDP: the factor on each layer's kept fraction; FBS: the top-k ratio
    keep_mean: float
    flops_mean: float
    steps: int
    reachable: bool = True


@torch.no_grad()
def realised_cost(model: Detector, images: torch.Tensor, cost: CostModel, batch: int = 16) -> tuple[float, float]:
    """``(mean keep ratio, mean FLOPs fraction)`` of the gated ``model`` over ``images``."""
    widths = torch.tensor([[b.h1, b.h2] for b in model.blocks], dtype=torch.float64)
    keeps: List[float] = []
    flops: List[float] = []
    for chunk in images.split(batch):
        model(chunk)
        # (B, blocks, 2) kept channels per frame, counted from the masks the gates produced
        kept = torch.stack([torch.stack([(m > 0).sum(1) for m in b.last["mask"]], 1) for b in model.blocks], 1)
        for k in kept:
            keeps.append(float((k / widths).mean()))
            flops.append(cost.frame_flops(k.tolist()) / cost.dense)
    return sum(keeps) / len(keeps), sum(flops) / len(flops)


def _bisect(apply: Callable[[float], None], measure: Callable[[], float], target: float, lo: float, hi: float,
            steps: int, tol: float) -> tuple[float, float, int]:
    """Bisection on a knob in ``[lo, hi]`` whose cost grows with it. Returns ``(knob, cost,
    steps)`` of the point closest to ``target`` among those tried, and leaves it applied."""
    best = (float("inf"), hi, float("nan"))
    tried = 0
    while tried < steps:
        tried += 1
        mid = (lo + hi) / 2
        apply(mid)
        got = measure()
        if abs(got - target) < best[0]:
            best = (abs(got - target), mid, got)
        if abs(got - target) <= tol:
            break
        lo, hi = (mid, hi) if got < target else (lo, mid)
    apply(best[1])
    return best[1], best[2], tried


@torch.no_grad()
def saliency_pools(model: Detector, images: torch.Tensor, batch: int = 16) -> List[torch.Tensor]:
    """Per gate, every (frame, group) saliency over ``images``, sorted in descending order."""
    stats = SaliencyStats(model.blocks, keep_on="frames")
    for chunk in images.split(batch):
        model(chunk)
        stats.update(model.blocks)
    return stats.pools()


@torch.no_grad()
def calibrate(model: Detector, images: torch.Tensor, target: float, measure: str = "keep", steps: int = 14,
              tol: float = 0.003, batch: int = 16, log: Callable[[str], None] = lambda s: None) -> Calibration:
    """Set the thresholds of a gated ``model`` so that its mean per-frame ``measure`` over
    ``images`` (letterboxed, ``(N, 3, S, S)``) equals ``target``."""
    if measure not in MEASURES:
        raise ValueError(f"unknown calibration measure {measure!r}; choose one of {MEASURES}")
    if not model.gated:
        raise ValueError("calibration needs a gated model (dynprune gate)")
    if not 0 < target <= 1:
        raise ValueError(f"calibration target {target}: must be in (0, 1]")
    model.eval()
    cost = CostModel(model, images.shape[-1])
    gates: Sequence[Gate] = [g for b in model.blocks for g in (b.gate1, b.gate2)]
    modes = {g.mode for g in gates}
    if len(modes) != 1 or modes == {"open"}:
        raise ValueError(f"gates must all be in threshold (ManiDP) or topk (FBS) mode, found {sorted(modes)}")
    index = 0 if measure == "keep" else 1
    if target < 1 and measure == "flops" and target <= cost.fixed / cost.dense:
        raise ValueError(f"--flops {target}: below the {cost.fixed / cost.dense:.3f} of dense FLOPs that no gate "
                         "can remove (stem, down-sampling, neck, head)")

    def measured() -> float:
        value = realised_cost(model, images, cost, batch)[index]
        log(f"  {measure} {value:.4f}")
        return value

    if modes == {"threshold"}:
        trained = [g.threshold.clone() for g in gates]
        pools = saliency_pools(model, images, batch)
        kept = [float(((pool >= float(t)) & (pool > 0)).float().mean()) for pool, t in zip(pools, trained)]

        def to_knob(v: float) -> float:  # factor m = 2**(8 v - 4) on each layer's kept fraction; v = 0.5: as trained
            return 2.0 ** (8 * v - 4)

        def apply(v: float) -> None:
            m = to_knob(v)
            for g, t, pool, k in zip(gates, trained, pools, kept):
                g.threshold.copy_(t if m == 1.0 or k == 0 else quantile_threshold(pool, min(1.0, m * k)))
    else:
        def apply(v: float) -> None:
            for g in gates:
                g.keep_ratio = max(v, 1e-6)

        def to_knob(v: float) -> float:
            return v

    v, achieved, n = _bisect(apply, measured, target, 0.0, 1.0, steps, tol)
    # Further off than the discreteness of channels explains: out of the gates' reach (see above).
    reachable = abs(achieved - target) <= max(4 * tol, 0.02)
    keep, flops = realised_cost(model, images, cost, batch)
    return Calibration(measure, target, achieved, to_knob(v), keep, flops, n, reachable)
