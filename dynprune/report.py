"""Pictures of what the gates do: a histogram of per-frame FLOPs, and the cheapest and most
expensive validation frames side by side (the figure ManiDP uses to show that simple inputs
get small sub-networks; Tang et al. CVPR 2021, Fig. 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np

from dynprune.data.records import ImageRecord


def draw_boxes(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, color=(0, 255, 0)) -> np.ndarray:
    import cv2

    out = image.copy()
    for (x1, y1, x2, y2), s in zip(boxes.astype(int), scores):
        cv2.rectangle(out, (x1, y1), (x2, y2), color, 2)
        cv2.putText(out, f"{s:.2f}", (x1, max(12, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1, cv2.LINE_AA)
    return out


def write_gate_report(result: Dict[str, Any], records: Sequence[ImageRecord], out_dir: str,
                      conf: float = 0.3, tile: int = 240, per_row: int = 4) -> Dict[str, str]:
    """Write ``flops_hist.png`` and ``frames_by_cost.png`` into ``out_dir``; return their paths."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frac = np.asarray(result["frame_flops"])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.hist(frac, bins=30, color="#3b7dd8")
    for q, style in (("flops_mean", "-"), ("flops_p95", "--")):
        ax.axvline(result[q], color="k", ls=style, lw=1, label=f"{q.split('_')[1]} {result[q]:.2f}")
    ax.set_xlabel("FLOPs of the frame / dense FLOPs")
    ax.set_ylabel("frames")
    ax.set_title("Per-frame cost of the gated network")
    ax.legend()
    fig.tight_layout()
    hist_path = out / "flops_hist.png"
    fig.savefig(hist_path)
    plt.close(fig)

    order = np.argsort(frac)
    rows = []
    for title, idx in (("cheapest", order[:per_row]), ("most expensive", order[::-1][:per_row])):
        tiles = []
        for i in idx:
            img = cv2.imread(records[i].path)
            if img is None:
                img = np.zeros((tile, tile, 3), np.uint8)
            pred = result["predictions"][i]
            keep = pred["scores"] >= conf
            img = draw_boxes(img, pred["boxes"][keep], pred["scores"][keep])
            scale = tile / max(img.shape[:2])
            img = cv2.resize(img, (int(img.shape[1] * scale), int(img.shape[0] * scale)))
            canvas = np.full((tile + 22, tile, 3), 255, np.uint8)
            canvas[22 : 22 + img.shape[0], : img.shape[1]] = img
            cv2.putText(canvas, f"{title}: {frac[i]:.2f} of dense", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                        (0, 0, 0), 1, cv2.LINE_AA)
            tiles.append(canvas)
        rows.append(np.hstack(tiles))
    grid_path = out / "frames_by_cost.png"
    cv2.imwrite(str(grid_path), np.vstack(rows))
    return {"histogram": str(hist_path), "frames": str(grid_path)}
