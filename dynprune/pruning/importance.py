"""Importance criteria for the hidden channels of each block: one score per channel, per layer.

Every criterion returns ``[(scores_h1, scores_h2) per block]``; a larger score is more
important. Kept apart from the pruner, as in Torch-Pruning.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch

from dynprune.data.records import ImageRecord
from dynprune.model import Detector

Scores = List[Tuple[torch.Tensor, torch.Tensor]]


def l1_norm(model: Detector) -> Scores:
    """L1 norm of each filter's weights (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017, Sec. 3.1)."""
    return [(b.cv1.conv.weight.detach().abs().sum((1, 2, 3)), b.cv2.conv.weight.detach().abs().sum((1, 2, 3)))
            for b in model.blocks]


def bn_gamma(model: Detector) -> Scores:
    """|gamma| of each channel's BatchNorm (Liu et al., "Network Slimming", ICCV 2017, Sec. 3.2).

    On the CPU whatever device the model is on: selection and masks are bookkeeping, kept on the
    CPU (a GPU run of EFFP mixed devices here)."""
    return [(b.cv1.bn.weight.detach().abs().cpu(), b.cv2.bn.weight.detach().abs().cpu()) for b in model.blocks]


@torch.no_grad()
def feature_map_statistics(model: Detector, records: Sequence[ImageRecord], imgsz: int, max_images: int = 64):
    """Per hidden channel: mean and variance of its feature map inside ground-truth boxes and in the
    background, over up to ``max_images`` images. Returns ``[(stats_h1 (C,4), stats_h2 (C,4))]``
    with columns (mean_gt, var_gt, mean_bg, var_bg)."""
    from dynprune.data.dataset import DetectionDataset

    model.eval()
    ds = DetectionDataset(records[:max_images], imgsz)
    feats: List[List[torch.Tensor]] = [[] for _ in model.blocks]
    hooks = []
    for i, b in enumerate(model.blocks):
        hooks.append(b.cv1.register_forward_hook(lambda m, a, out, i=i: feats[i].append(out)))
        hooks.append(b.cv2.register_forward_hook(lambda m, a, out, i=i: feats[i].append(out)))
    sums = [[torch.zeros(b.h1, 4, dtype=torch.float64), torch.zeros(b.h2, 4, dtype=torch.float64)]
            for b in model.blocks]
    counts = [[0.0, 0.0] for _ in model.blocks]
    try:
        for idx in range(len(ds)):
            img, targets, _ = ds[idx]
            for f in feats:
                f.clear()
            model(img[None])
            for i, (f1, f2) in enumerate(feats):
                for j, fm in enumerate((f1[0], f2[0])):
                    h, w = fm.shape[-2:]
                    gt = torch.zeros(h, w, dtype=torch.bool)
                    for _, x1, y1, x2, y2 in targets.tolist():
                        sx, sy = w / imgsz, h / imgsz
                        gt[int(y1 * sy) : max(int(y1 * sy) + 1, int(np.ceil(y2 * sy))),
                           int(x1 * sx) : max(int(x1 * sx) + 1, int(np.ceil(x2 * sx)))] = True
                    fmd = fm.double().flatten(1)
                    m_gt, m_bg = gt.flatten(), ~gt.flatten()
                    stats = torch.zeros(fm.shape[0], 4, dtype=torch.float64)
                    if m_gt.any():
                        stats[:, 0], stats[:, 1] = fmd[:, m_gt].mean(1), fmd[:, m_gt].var(1, unbiased=False)
                    if m_bg.any():
                        stats[:, 2], stats[:, 3] = fmd[:, m_bg].mean(1), fmd[:, m_bg].var(1, unbiased=False)
                    sums[i][j] += stats
                    counts[i][j] += 1
    finally:
        for h in hooks:
            h.remove()
    return [(s1 / max(c1, 1), s2 / max(c2, 1)) for (s1, s2), (c1, c2) in zip(sums, counts)]


def kmeans_pp(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """K-means with k-means++ seeding (Arthur & Vassilvitskii, SODA 2007); returns a label per row."""
    rng = np.random.default_rng(seed)
    n = len(x)
    k = min(k, n)
    centers = [x[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None] - np.array(centers)[None]) ** 2).sum(-1), 1)
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1 / n)
        centers.append(x[rng.choice(n, p=p)])
    c = np.array(centers)
    labels = np.zeros(n, dtype=int)
    for _ in range(iters):
        labels = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        new = np.array([x[labels == j].mean(0) if np.any(labels == j) else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return labels


def cluster_keep(stats: torch.Tensor, keep: int, seed: int = 0) -> torch.Tensor:
    """Feature-map clustering (the seed's method): K-means++ over each channel's standardised
    (mean_gt, var_gt, mean_bg, var_bg), ``keep`` clusters, and in each cluster the channel with
    the largest variance on ground truth (max-VG) survives. Returns the kept channel indices."""
    x = stats.numpy()
    x = (x - x.mean(0)) / (x.std(0) + 1e-12)
    labels = kmeans_pp(x, keep, seed)
    vg = stats[:, 1].numpy()
    kept = [int(np.flatnonzero(labels == j)[np.argmax(vg[labels == j])]) for j in np.unique(labels)]
    # Empty clusters (duplicate points) leave fewer than `keep`: fill with the next-best by VG.
    rest = [int(i) for i in np.argsort(-vg) if int(i) not in kept]
    kept += rest[: keep - len(kept)]
    return torch.tensor(sorted(kept[:keep]))
