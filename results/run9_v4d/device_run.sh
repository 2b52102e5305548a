#!/usr/bin/env bash
# Device run 9 (v4d: weights and activations gathered in one register layout, no shared-memory conversions in the main loop; ncu at M = 1).
# Run from the repository root on the H200 machine:  bash results/run9_v4d/device_run.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
OUT=${OUT:-/tmp/run6_out}
mkdir -p "$OUT"
{ date -u; python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv; } 2>&1 | tee "$OUT/env.txt"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 220 python3 -m pytest -q -m gpu tests/test_kernels.py \
  -p no:cacheprovider -n 3 --timeout 210 > "$OUT/pytest_gpu.txt" 2>&1 &
PYTEST=$!
XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 330 python3 -m jaxmoe.calibrate --reuse-run results/run2_v2 \
  --out "$OUT/h200.json" --raw-dir "$OUT" --deadline-s 170 --wait-pid "$PYTEST" 2>&1 | tee "$OUT/calibrate.log"
wait "$PYTEST"; echo "pytest exit status $?"; grep -v -i warn "$OUT/pytest_gpu.txt" | tail -n 8
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 100 "$NCU" --clock-control none --target-processes all -k regex:ffn_ \
  --launch-skip 2 --launch-count 12 --section SpeedOfLight --section WarpStateStats --section Occupancy \
  --section LaunchStats --section SchedulerStats --section MemoryWorkloadAnalysis --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" --csv --page details \
  python3 results/run9_v4d/ncu_m1.py > "$OUT/ncu_m1.csv" 2> "$OUT/ncu_m1.err"
echo "ncu exit status $?"; tail -n 3 "$OUT/ncu_m1.err"; wc -l "$OUT/ncu_m1.csv"
