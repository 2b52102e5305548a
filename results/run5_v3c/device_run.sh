#!/usr/bin/env bash
# Device run 5 (v3: best launch A + best launch B of runs 3-4 as one configuration; split gate/up with an XLA SiLU·mul).
# Run from the repository root on the H200 machine:  bash results/run5_v3c/device_run.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
OUT=${OUT:-/tmp/run5_out}
mkdir -p "$OUT"
{ date -u; python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv; } 2>&1 | tee "$OUT/env.txt"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 200 python3 -m pytest -q -m gpu tests/test_kernels.py \
  -p no:cacheprovider -n 3 --timeout 190 > "$OUT/pytest_gpu.txt" 2>&1 &
PYTEST=$!
XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 280 python3 -m jaxmoe.calibrate --reuse-run results/run2_v2 \
  --out "$OUT/h200.json" --raw-dir "$OUT" --deadline-s 150 --wait-pid "$PYTEST" 2>&1 | tee "$OUT/calibrate.log"
wait "$PYTEST"; echo "pytest exit status $?"; grep -v -i warn "$OUT/pytest_gpu.txt" | tail -n 8
