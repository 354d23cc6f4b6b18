"""Parameters and FLOPs of the detector sizes, and the share of FLOPs the gates can skip.

    python benchmarks/model_sizes.py [--sizes nano small] [--imgsz 320 640] [--json out.json]

FLOPs are counted by ``torch.utils.flop_counter`` on one image (:func:`dynprune.flops.count_flops`);
the gateable share is the FLOPs of the gated blocks' hidden channels (:class:`dynprune.flops.CostModel`).
"""

from __future__ import annotations

import argparse
import json

from provenance import provenance

from dynprune.config import config_for
from dynprune.flops import CostModel, count_flops, count_parameters
from dynprune.model import build_detector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["nano", "small"])
    ap.add_argument("--imgsz", type=int, nargs="+", default=[320, 640])
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for size in args.sizes:
        model = build_detector(config_for(size)).eval()
        for imgsz in args.imgsz:
            rows.append({"size": size, "imgsz": imgsz, "params_m": count_parameters(model) / 1e6,
                         "gflops": count_flops(model, imgsz) / 1e9,
                         "gateable_share": CostModel(model, imgsz).gated_fraction})
    print("| size | imgsz | parameters (M) | GFLOPs | gateable share |")
    for r in rows:
        print(f"| {r['size']} | {r['imgsz']} | {r['params_m']:.3f} | {r['gflops']:.3f} | {r['gateable_share']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**provenance("python benchmarks/model_sizes.py --json OUT"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
