"""Neuron Merging (Kim, Kim, Lee, Hong, NeurIPS 2020): each removed hidden channel is compensated,
without data, in the layer that reads it, through its most similar kept channel.

Take a Conv-BN-activation layer whose channel ``i`` is removed and channel ``j`` kept. BatchNorm
makes each channel's pre-activation ``a_k = g_k (w_k . x - mu_k) / sd_k + beta_k``. When the
filters point the same way, ``w_i = s w_j`` with ``s = |w_i| / |w_j|``, and then

    a_i = z a_j + c,   z = s g_i sd_j / (sd_i g_j),   c = beta_i - z beta_j + g_i (s mu_j - mu_i) / sd_i

(the paper's decomposition with its BatchNorm terms, Sec. 3.3). With ``z > 0`` and ``c = 0`` a
positively homogeneous activation gives ``act(a_i) = z act(a_j)``, so the next layer's weight
column of ``i``, times ``z``, can be added to the column of ``j`` and ``i`` removed with no
change. Among the kept channels, ``j`` minimises ``lam * (1 - cos) + (1 - lam) * |c| / z`` (the
bias distance scaled to [0, 1] over the candidates), as in the paper; a removed channel whose
best cosine is under ``threshold``, or whose ``z`` is not positive, is not merged.

The detector's activation is SiLU, which is not homogeneous: ``silu(z a) = z silu(a)`` only for
``z = 1`` (exactly), and approximately where ``a`` is large and positive (SiLU is ReLU there).
``max_scale`` limits merges to ``1 / max_scale <= z <= max_scale``, where the error of treating
SiLU as homogeneous stays small; BENCHMARKS.md ("Neuron Merging") measures what merging gives
with the paper's rule unchanged and with the limit, rather than assuming either.
"""

from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence, Tuple

import torch

from dynprune.layers import Bottleneck
from dynprune.model import Detector

Keep = Sequence[Tuple[torch.Tensor, torch.Tensor]]

#: the paper's weight of the cosine distance against the bias distance (its released scripts)
LAMBDA = 0.85


def _merge_matrix(weight: torch.Tensor, bn: torch.nn.BatchNorm2d, kept: torch.Tensor, threshold: float,
                  lam: float, max_scale: Optional[float]) -> Dict[int, Tuple[int, float]]:
    """``{removed channel: (kept channel, z)}`` for one Conv-BN layer (``weight`` (out, ...))."""
    w = weight.reshape(weight.shape[0], -1).double()
    g, beta, mu = bn.weight.double(), bn.bias.double(), bn.running_mean.double()
    sd = (bn.running_var.double() + bn.eps).sqrt()
    norms = w.norm(dim=1)
    kept = torch.as_tensor(kept, dtype=torch.long)
    removed = [i for i in range(w.shape[0]) if i not in set(kept.tolist())]
    out: Dict[int, Tuple[int, float]] = {}
    if not len(kept):
        return out
    unit = w / norms.clamp_min(1e-12)[:, None]
    for i in removed:
        if norms[i] == 0 or g[i] == 0:
            continue  # a channel that outputs a constant: nothing of the input to carry over
        cos = unit[kept] @ unit[i]
        s = norms[i] / norms[kept].clamp_min(1e-12)
        z = s * g[i] * sd[kept] / (sd[i] * g[kept].where(g[kept] != 0, torch.full_like(g[kept], 1e-12)))
        c = beta[i] - z * beta[kept] + g[i] * (s * mu[kept] - mu[i]) / sd[i]
        bias = (c.abs() / z.abs().clamp_min(1e-12))
        span = bias.max() - bias.min()
        bias = (bias - bias.min()) / span if span > 0 else torch.zeros_like(bias)
        score = lam * (1 - cos) + (1 - lam) * bias
        ok = (z > 0) & (cos >= threshold)
        if max_scale is not None:
            ok &= (z <= max_scale) & (z >= 1.0 / max_scale)
        if not ok.any():
            continue
        best = int(torch.where(ok, score, torch.full_like(score, float("inf"))).argmin())
        out[i] = (int(kept[best]), float(z[best]))
    return out


@torch.no_grad()
def merge_block(block: Bottleneck, keep1: torch.Tensor, keep2: torch.Tensor, threshold: float = 0.0,
                lam: float = LAMBDA, max_scale: Optional[float] = None) -> Tuple[int, int]:
    """Merge the removed hidden channels of one block into the layers that read them, in place:
    cv1's into cv2's input columns, then cv2's (its filters over the kept inputs, already
    compensated) into cv3's. Returns how many channels of each were merged."""
    merges1 = _merge_matrix(block.cv1.conv.weight, block.cv1.bn, keep1, threshold, lam, max_scale)
    w2 = block.cv2.conv.weight
    for i, (j, z) in merges1.items():
        w2[:, j] += z * w2[:, i]
    merges2 = _merge_matrix(w2[:, keep1], block.cv2.bn, keep2, threshold, lam, max_scale)
    w3 = block.cv3.conv.weight
    for i, (j, z) in merges2.items():
        w3[:, j] += z * w3[:, i]
    return len(merges1), len(merges2)


@torch.no_grad()
def merge_removed(model: Detector, keep: Keep, threshold: float = 0.0, lam: float = LAMBDA,
                  max_scale: Optional[float] = None) -> Tuple[Detector, Tuple[int, int]]:
    """A copy of the dense ``model`` whose layers that read the hidden channels absorb the ones
    ``keep`` removes, ready for :func:`~dynprune.pruning.surgery.slim_model` with the same ``keep``;
    and the number of channels merged against removed, over all blocks."""
    if model.gated:
        raise ValueError("Neuron Merging works on dense models; merge before adding gates")
    merged = copy.deepcopy(model).eval()
    done = removed = 0
    for block, (k1, k2) in zip(merged.blocks, keep):
        n1, n2 = merge_block(block, k1, k2, threshold, lam, max_scale)
        done += n1 + n2
        removed += block.h1 - len(k1) + block.h2 - len(k2)
    return merged, (done, removed)
