#!/usr/bin/env bash
# One device call: install dynprune without dependencies (the device image has torch and
# Triton; it has no network), run the GPU tests, then the GPU benchmark. Everything goes
# to $OUT (log, JSON). The device image has no pycocotools: the tests that score AP are left out.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
} 2>&1 | tee "$OUT/env.log"
python3 -m pytest -p no:cacheprovider -q -rs tests/test_kernels.py 2>&1 | tee "$OUT/tests.log"
python3 benchmarks/gpu_kernels.py --json "$OUT/gpu.json" "$@" 2>&1 | tee "$OUT/bench.log"
