"""Neuron Merging against plain pruning: AP straight after pruning (no fine-tuning) and after the
usual fine-tuning, for L1 and EFFP at two FLOPs targets.

    python benchmarks/neuron_merging.py --weights DENSE --data D --name raccoon [--flops 0.5 0.3]
        [--finetune [--prune-args="--epochs 6 ..."]] [--work runs/merging] --json OUT

Straight after pruning: the channels each method's criterion removes from the dense model (L1: filter
norms, one global threshold; EFFP: BatchNorm |gamma|, one global threshold, the selection EFFP makes at
its end, here without its pruning-aware training), then the slim model, with and without merging; the
merge also with its scale limited to [1/2, 2] (where treating SiLU as homogeneous errs least).
``--finetune``: ``dynprune prune --method M --flops F [--merge]`` with its defaults and ``--prune-args``, one
run each.

Rows: ``dataset``, ``method`` (``dense``, ``l1``, ``effp``), ``flops``, ``merge``, ``finetuned``,
``ap50``, ``ap50_95``, and for merges the channels merged of those removed (``variant`` names the
scale-limited merge).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from provenance import provenance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True, help="a dense checkpoint")
    ap.add_argument("--data", required=True)
    ap.add_argument("--name", required=True, help="the dataset's name in the rows")
    ap.add_argument("--flops", type=float, nargs="+", default=[0.5, 0.3])
    ap.add_argument("--finetune", action="store_true", help="also the fine-tuned runs (dynprune prune, minutes each)")
    ap.add_argument("--prune-args", default="", help="more dynprune prune arguments for the fine-tuned runs "
                    "(one string, e.g. the schedule)")
    ap.add_argument("--work", default="runs/merging")
    ap.add_argument("--json")
    args = ap.parse_args()

    from dynprune.checkpoint import model_from_checkpoint
    from dynprune.data import load_dataset
    from dynprune.flops import CostModel
    from dynprune.pruning.importance import bn_gamma, l1_norm
    from dynprune.pruning.merge import merge_removed
    from dynprune.pruning.select import select_widths
    from dynprune.pruning.surgery import slim_model
    from dynprune.validate import run_validation

    model, ckpt = model_from_checkpoint(args.weights)
    model.eval()
    imgsz = int(ckpt["imgsz"])
    spec = load_dataset(args.data)
    cost = CostModel(model, imgsz)

    def ap(m) -> dict:
        r = run_validation(m.eval(), spec.val, spec.names, imgsz, batch=8)
        return {"ap50": r["ap50"], "ap50_95": r["ap50_95"]}

    rows = [{"dataset": args.name, "method": "dense", "flops": 1.0, "merge": False, "finetuned": False, **ap(model)}]
    selections = {"l1": lambda f: select_widths(cost, l1_norm(model), f, None, 8, scope="global"),
                  "effp": lambda f: select_widths(cost, bn_gamma(model), f, None, 8, scope="global",
                                                  normalize=False)}
    for flops in args.flops:
        for method, select in selections.items():
            keep = select(flops)
            base = {"dataset": args.name, "method": method, "flops": flops, "finetuned": False}
            rows.append({**base, "merge": False, **ap(slim_model(model, keep))})
            for variant, max_scale in (("paper", None), ("scale within 2x", 2.0)):
                merged, (done, removed) = merge_removed(model, keep, max_scale=max_scale)
                rows.append({**base, "merge": True, "variant": variant, "merged_channels": done,
                             "removed_channels": removed, **ap(slim_model(merged, keep))})
            for r in rows[-3:]:
                print(f"{method} {flops:g} merge={r['merge']} {r.get('variant', '')}: AP50 {r['ap50']:.3f} "
                      f"AP50-95 {r['ap50_95']:.3f}", flush=True)
            if args.finetune:
                for merge in (False, True):
                    out = Path(args.work) / f"{args.name}_{method}_{flops:g}{'_merge' if merge else ''}"
                    cmd = [sys.executable, "-m", "dynprune", "prune", "--weights", args.weights, "--data", args.data,
                           "--method", method, "--flops", str(flops), "--out", str(out), "--json",
                           *args.prune_args.split()]
                    done = subprocess.run(cmd + (["--merge"] if merge else []), capture_output=True, text=True)
                    if done.returncode != 0:
                        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
                    res = json.loads(done.stdout[done.stdout.rindex("\n{") + 1:])
                    rows.append({**base, "finetuned": True, "merge": merge, "ap50": res["ap50"],
                                 "ap50_95": res["ap50_95"], "merged_channels": res.get("merged_channels")})
                    print(f"{method} {flops:g} merge={merge} fine-tuned: AP50 {res['ap50']:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({**provenance(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
