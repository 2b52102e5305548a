#!/usr/bin/env bash
# Device run 10: the structural floor of the v4 launches (benchmarks/bench_kernel_floor.py).
# Run from the repository root on the H200 machine:  bash results/run10_floor/device_run.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
OUT=${OUT:-/tmp/run10_out}
mkdir -p "$OUT"
{ date -u; python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv; } 2>&1 | tee "$OUT/env.txt"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 300 python3 benchmarks/bench_kernel_floor.py --out "$OUT/floor.json" 2>&1 \
  | grep -v -i warn | tee "$OUT/floor.log"
