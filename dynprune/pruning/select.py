"""Choose the hidden widths (and the channels) that meet a FLOPs / parameter target.

Widths are rounded up to multiples of ``round_to`` (8 by default: TensorRT and tensor cores
run faster on such widths) and never fall below one group. The search is over a global
threshold on the importance scores (``scope='global'``) or one ratio for every layer
(``scope='local'``), followed by a greedy fill that adds back the most important remaining
groups while the target still holds, so the result lands just under the target.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from dynprune.flops import CostModel
from dynprune.pruning.importance import Scores

Keep = List[Tuple[torch.Tensor, torch.Tensor]]


def _round(n: int, width: int, round_to: int) -> int:
    return min(width, max(min(round_to, width), math.ceil(n / round_to) * round_to))


def _fits(cost: CostModel, widths, flops_target: float, params_target: Optional[float]) -> bool:
    if cost.widths_flops(widths) > flops_target * (cost.dense - cost.gates):
        return False
    if params_target is not None and cost.widths_params(widths) > params_target * (cost.params - cost.gate_params):
        return False
    return True


def top_channels(scores: torch.Tensor, n: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores.float(), n).indices).values


def select_widths(
    cost: CostModel,
    scores: Scores,
    flops_target: float,
    params_target: Optional[float] = None,
    round_to: int = 8,
    scope: str = "global",
    normalize: bool = True,
) -> Keep:
    """Kept channel indices ``[(idx_h1, idx_h2)]`` per block meeting the targets (fractions of dense)."""
    if not 0 < flops_target <= 1:
        raise ValueError(f"FLOPs target {flops_target}: must be a fraction in (0, 1]")
    layers = [s.float() for pair in scores for s in pair]
    full = [len(s) for s in layers]
    if normalize:  # comparable across layers: each layer's scores relative to its own mean
        layers = [s / (s.mean() + 1e-12) for s in layers]

    def widths_for(counts: Sequence[int]):
        w = [_round(n, f, round_to) for n, f in zip(counts, full)]
        return [w[i : i + 2] for i in range(0, len(w), 2)]

    if scope == "global":
        candidates = torch.sort(torch.cat(layers)).values
        lo, hi = 0, len(candidates)  # find the smallest threshold index whose widths fit
        while lo < hi:
            mid = (lo + hi) // 2
            tau = candidates[mid]
            if _fits(cost, widths_for([int((s >= tau).sum()) for s in layers]), flops_target, params_target):
                hi = mid
            else:
                lo = mid + 1
        tau = candidates[min(lo, len(candidates) - 1)]
        counts = [int((s >= tau).sum()) for s in layers]
    elif scope == "local":
        lo_r, hi_r = 0.0, 1.0
        for _ in range(40):
            mid = (lo_r + hi_r) / 2
            if _fits(cost, widths_for([math.ceil(mid * f) for f in full]), flops_target, params_target):
                lo_r = mid
            else:
                hi_r = mid
        counts = [math.ceil(lo_r * f) for f in full]
    else:
        raise ValueError(f"unknown scope {scope!r}; choose global or local")
    widths = [w for pair in widths_for(counts) for w in pair]
    if not _fits(cost, [widths[i : i + 2] for i in range(0, len(widths), 2)], flops_target, params_target):
        raise ValueError(f"no widths meet FLOPs {flops_target:.2f} (params {params_target}) with --round-to "
                         f"{round_to}; the un-prunable part alone costs {cost.fixed / cost.dense:.2f} of dense")
    # Greedy fill: give back whole groups, most important next group first, while the target holds.
    while True:
        best, best_gain = None, -1.0
        for i, s in enumerate(layers):
            if widths[i] >= full[i]:
                continue
            nxt = min(full[i], widths[i] + round_to)
            gain = float(torch.sort(s, descending=True).values[widths[i] : nxt].mean())
            trial = list(widths)
            trial[i] = nxt
            if gain > best_gain and _fits(cost, [trial[k : k + 2] for k in range(0, len(trial), 2)],
                                          flops_target, params_target):
                best, best_gain = i, gain
        if best is None:
            break
        widths[best] = min(full[best], widths[best] + round_to)
    keep = [top_channels(s, w) for s, w in zip(layers, widths)]
    return [(keep[i], keep[i + 1]) for i in range(0, len(keep), 2)]
