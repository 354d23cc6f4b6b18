#!/bin/bash
# The commands behind the session-13 gate ablation (BENCHMARKS.md, "Gate ablation (issue 3)").
# Run one job at a time on an otherwise idle machine: the CPU timings are taken in between.
#   RACCOON_DENSE  the raccoon dense checkpoint (session 11: AP50 0.7256 at 320)
#   SYN_DENSE      the demo's dense checkpoint (dynprune demo -> runs/demo/dense/best.pt)
#   SYN_DATA       the demo's dataset (runs/demo/data/synthetic-s0-n480-320/data.yaml)
#   RACCOON_GATES  the raccoon gates the bundle carries (session 11: `--keep 0.5`, val keep 0.497)
set -u
RAC=${RAC:-../shared/datasets/raccoon}
B=benchmarks/cpu_dynamic.py
declare -A FLAG=(
  [manidp]="--keep 0.5"
  [nocx]="--keep 0.5 --no-complexity"
  [nocx_s02]="--keep 0.5 --no-complexity --sparsity 0.02"
  [nosim]="--keep 0.5 --similarity 0"
  [fbs]="--keep 0.5 --gate fbs"
  [fbs_k09]="--keep 0.9 --gate fbs"
)
COMMON="--mosaic 0 --threshold-every 10 --keep-on frames --epochs 20 --workers 1"
for v in manidp nocx nocx_s02 nosim fbs fbs_k09; do
  dynprune gate --weights "$RACCOON_DENSE" --data "$RAC" --lr 5e-4 $COMMON ${FLAG[$v]} --out rac_$v
  dynprune val --weights rac_$v/best.pt --data "$RAC" --imgsz 320 --json > rac_$v.val.json
  python $B --dense "$RACCOON_DENSE" --gated rac_$v/best.pt --data "$RAC" --imgsz 320 --frames 40 --json rac_$v.cpu.json
done
for v in manidp nocx nocx_s02 nosim fbs fbs_k09; do
  dynprune gate --weights "$SYN_DENSE" --data "$SYN_DATA" --lr 1e-3 --imgsz 256 $COMMON ${FLAG[$v]} --out syn_$v
  dynprune val --weights syn_$v/best.pt --data "$SYN_DATA" --imgsz 320 --json > syn_$v.val.json
  python $B --dense "$SYN_DENSE" --gated syn_$v/best.pt --data "$SYN_DATA" --imgsz 320 --frames 40 --json syn_$v.cpu.json
done
# A second seed for the four raccoon variants at or near matched FLOPs (files racs1_*).
for v in manidp nosim nocx_s02 fbs_k09; do
  dynprune gate --weights "$RACCOON_DENSE" --data "$RAC" --lr 5e-4 $COMMON --seed 1 ${FLAG[$v]} --out racs1_$v
  dynprune val --weights racs1_$v/best.pt --data "$RAC" --imgsz 320 --json > racs1_$v.val.json
  python $B --dense "$RACCOON_DENSE" --gated racs1_$v/best.pt --data "$RAC" --imgsz 320 --frames 40 --json racs1_$v.cpu.json
done
for v in manidp nosim nocx_s02 fbs_k09; do  # and for the synthetic ones (files syns1_*)
  dynprune gate --weights "$SYN_DENSE" --data "$SYN_DATA" --lr 1e-3 --imgsz 256 $COMMON --seed 1 ${FLAG[$v]} --out syns1_$v
  dynprune val --weights syns1_$v/best.pt --data "$SYN_DATA" --imgsz 320 --json > syns1_$v.val.json
  python $B --dense "$SYN_DENSE" --gated syns1_$v/best.pt --data "$SYN_DATA" --imgsz 320 --frames 40 --json syns1_$v.cpu.json
done
dynprune val --weights "$SYN_DENSE" --data "$SYN_DATA" --imgsz 320 --json > syn_dense.val.json
# The raccoon bundle: EFFP 50% with the default 20 epochs, exported with the session-11 gates, benched twice.
dynprune prune --weights "$RACCOON_DENSE" --data "$RAC" --method effp --flops 0.5 --lr 5e-4 --mosaic 0 --workers 1 \
  --json --out rac_effp20
dynprune export --dynamic "$RACCOON_GATES" --static rac_effp20/best.pt --dense "$RACCOON_DENSE" -o rac_bundle20
for i in 1 2; do dynprune bench rac_bundle20 --data "$RAC" --frames 40 --out bench20_$i; done
