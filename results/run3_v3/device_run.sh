#!/usr/bin/env bash
# Device run 3 (v3 kernels, docs/kernels.md §5): environment, GPU tests, benchmark + calibration.
# Run from the repository root on the H200 machine:  bash results/run3_v3/device_run.sh
# Writes to $OUT: env.txt, pytest_gpu.txt, calibrate.log, bench_kernels.json/.csv (rewritten after every
# timed cell), h200.json (the profile). Transfers and the dense layer are reused from results/run2_v2.
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
OUT=${OUT:-/tmp/run3_out}
mkdir -p "$OUT"
{
  date -u
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv
} 2>&1 | tee "$OUT/env.txt"
# GPU tests (float64 oracle) in 3 worker processes while the benchmark compiles; the benchmark waits
# for them before it times anything, so no other GPU work runs during its measurements.
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 200 python3 -m pytest -q -m gpu tests/test_kernels.py \
  -p no:cacheprovider -n 3 --timeout 190 > "$OUT/pytest_gpu.txt" 2>&1 &
PYTEST=$!
XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 450 python3 -m jaxmoe.calibrate --reuse-run results/run2_v2 \
  --out "$OUT/h200.json" --raw-dir "$OUT" --deadline-s 290 --wait-pid "$PYTEST" 2>&1 | tee "$OUT/calibrate.log"
wait "$PYTEST"; echo "pytest exit status $?"
tail -n 25 "$OUT/pytest_gpu.txt"
