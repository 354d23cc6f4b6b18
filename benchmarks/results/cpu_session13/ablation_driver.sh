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

# variant PREFIX DENSE DATA "TRAIN FLAGS" NAME...: train, validate and time each named variant into PREFIX_NAME
variant() {
  local prefix=$1 dense=$2 data=$3 train=$4
  shift 4
  for v in "$@"; do
    dynprune gate --weights "$dense" --data "$data" $train $COMMON ${FLAG[$v]} --out ${prefix}_$v
    dynprune val --weights ${prefix}_$v/best.pt --data "$data" --imgsz 320 --json > ${prefix}_$v.val.json
    python $B --dense "$dense" --gated ${prefix}_$v/best.pt --data "$data" --imgsz 320 --frames 40 --json ${prefix}_$v.cpu.json
  done
}
ALL="manidp nocx nocx_s02 nosim fbs fbs_k09"
MATCHED="manidp nosim nocx_s02 fbs_k09"  # at or near matched FLOPs: these got a second seed
variant rac "$RACCOON_DENSE" "$RAC" "--lr 5e-4" $ALL
variant syn "$SYN_DENSE" "$SYN_DATA" "--lr 1e-3 --imgsz 256" $ALL
variant racs1 "$RACCOON_DENSE" "$RAC" "--lr 5e-4 --seed 1" $MATCHED
variant syns1 "$SYN_DENSE" "$SYN_DATA" "--lr 1e-3 --imgsz 256 --seed 1" $MATCHED
dynprune val --weights "$SYN_DENSE" --data "$SYN_DATA" --imgsz 320 --json > syn_dense.val.json
# The raccoon bundle: EFFP 50% with the default 20 epochs, exported with the session-11 gates, benched twice.
dynprune prune --weights "$RACCOON_DENSE" --data "$RAC" --method effp --flops 0.5 --lr 5e-4 --mosaic 0 --workers 1 \
  --json --out rac_effp20
dynprune export --dynamic "$RACCOON_GATES" --static rac_effp20/best.pt --dense "$RACCOON_DENSE" -o rac_bundle20
for i in 1 2; do dynprune bench rac_bundle20 --data "$RAC" --frames 40 --out bench20_$i; done
