#!/usr/bin/env bash
# One device call: install dynprune without dependencies (the device image has torch and
# Triton; it has no network), run the whole test suite on the GPU, then the GPU benchmarks.
# Everything goes to $OUT (logs, JSON; the tuned tiles in $OUT/cache/conv_tiles.json). GPU_STAGES picks
# the stages (default "tests frame board kernels"; "tune", "pool" and "ncu" on request):
#   tests    the whole suite on the GPU
#   frame    benchmarks/gpu_frame.py on a carried bundle: runs/gpu/bundle (dynprune export of raccoon
#            models: dense, EFFP-50% static, group-8 gates near keep 0.5) and runs/gpu/frames (the
#            40 raccoon val images); carry runs/gpu. Writes $OUT/frame/bench-raccoon-{320,640}.json.
#            To make runs/gpu on the CPU (about an hour on 2 cores): dynprune train --data RACCOON
#            --out runs/dense; dynprune gate --weights runs/dense/best.pt --data RACCOON --out runs/gate;
#            dynprune prune --weights runs/dense/best.pt --data RACCOON --method effp --flops 0.5
#            --out runs/prune; dynprune export --dynamic runs/gate/best.pt --static runs/prune/best.pt
#            -o runs/gpu/bundle; and copy the images listed in RACCOON/val.txt to runs/gpu/frames/
#   board    benchmarks/board_emulation.py: dense, static, dynamic at 8, 16 and all SMs (green contexts)
#   kernels  benchmarks/gpu_kernels.py (arguments of this script go to it; GPU_SMS=8 confines it;
#            GPU_TUNE=1 adds each layer's tuned tile)
#   tune     the board table's key rows (nano, 640, 8 SMs and all) with the tiles tuned at each SM
#            count against the default tiles, and dense also through torch.compile:
#            $OUT/board-emulation-tuned.json
#   pool     benchmarks/gpu_pool_sweep.py at GPU_SMS (default 8): the pool-and-gates kernel's programs
#            per image at a Jetson's SM count: $OUT/pool-sweep.json
#   ncu      Nsight Compute on every gated layer, cuDNN against Triton (default and runtime tiles) at
#            GPU_SMS (default 8): $OUT/ncu-layers.csv
#
# The JSON names the commit it measured from $DYNPRUNE_COMMIT (the device's copy of the tree has no
# .git): DYNPRUNE_COMMIT=$(git rev-parse --short HEAD), substituted on this side.
#
# The image has no pycocotools, which the AP tests need: carry its wheel in .whl/ (ignored by
# git; see the device README), e.g. here:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl pycocotools
# The whole suite, not only the Triton tests: it runs the CUDA paths of training and pruning,
# which no CPU run reaches.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  fi
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
} 2>&1 | tee "$OUT/env.log"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# The Triton trial's verdict and the tuned tiles outlive the call while the machine stays warm (a later
# call's ncu stage profiles the tiles an earlier one tuned); a copy comes back in $OUT/cache.
export DYNPRUNE_CACHE_DIR=/tmp/dynprune-cache
trap 'mkdir -p "$OUT/cache" && cp -r "$DYNPRUNE_CACHE_DIR"/*.json "$OUT/cache/" 2>/dev/null' EXIT
STAGES=" ${GPU_STAGES:-tests frame board kernels} "
if [[ $STAGES == *" tests "* ]]; then
  python3 -m pytest -p no:cacheprovider -q -rs tests 2>&1 | tee "$OUT/tests.log"
fi
if [[ $STAGES == *" frame "* ]]; then
  if [[ -d runs/gpu/bundle && -d runs/gpu/frames ]]; then
    python3 benchmarks/gpu_frame.py runs/gpu/bundle --source runs/gpu/frames --sizes 320 640 \
      --out "$OUT/frame" 2>&1 | tee "$OUT/frame.log"
  else
    echo "frame stage skipped: carry runs/gpu (bundle/ and frames/)" | tee "$OUT/frame.log"
  fi
fi
if [[ $STAGES == *" board "* ]]; then
  python3 benchmarks/board_emulation.py --json "$OUT/board-emulation.json" 2>&1 | tee "$OUT/board.log"
fi
if [[ $STAGES == *" kernels "* ]]; then
  python3 benchmarks/gpu_kernels.py --json "$OUT/gpu.json" ${GPU_SMS:+--sms $GPU_SMS} ${GPU_TUNE:+--tune} "$@" \
    2>&1 | tee "$OUT/bench.log"
fi
if [[ $STAGES == *" tune "* ]]; then
  python3 benchmarks/board_emulation.py --sms 8 0 --sizes 640 --models nano --batches 1 --tune --compile default \
    --json "$OUT/board-emulation-tuned.json" 2>&1 | tee "$OUT/tune.log"
fi
if [[ $STAGES == *" pool "* ]]; then
  python3 benchmarks/gpu_pool_sweep.py --sms "${GPU_SMS:-8}" --sizes 640 --json "$OUT/pool-sweep.json" 2>&1 \
    | tee "$OUT/pool.log"
fi
if [[ $STAGES == *" ncu "* ]]; then
  if command -v ncu >/dev/null; then
    ncu --clock-control none --nvtx --nvtx-include "profile/" --section SpeedOfLight --section Occupancy \
      --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --csv --page details \
      python3 benchmarks/gpu_layer_profile.py --sms "${GPU_SMS:-8}" > "$OUT/ncu-layers.csv" 2> "$OUT/ncu.log"
    tail -3 "$OUT/ncu.log"
  else
    echo "ncu stage skipped: Nsight Compute (ncu) is not on the PATH" | tee "$OUT/ncu.log"
  fi
fi
