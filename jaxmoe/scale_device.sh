#!/bin/bash
# The GPU command of jaxmoe.scale (issue 10), run from a copy of this repository on the GPU machine.
# Usage: bash jaxmoe/scale_device.sh OUTDIR ARGS...   (ARGS go to python -m jaxmoe.scale)
# Expects: $SCALE_CARRY/whl/gguf-*.whl (gguf is not installed there) and
#          $SCALE_CARRY/data/{meta.json,calib.bin,eval.bin,train.bin.xz}; SCALE_CARRY defaults to the repo root.
set -o pipefail
OUTDIR=$1; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${SCALE_CARRY:-.}"/whl/*.whl || exit 3
export PYTHONPATH=$PWD:/tmp/site:$PWD/jaxmoe/device_stubs PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
mkdir -p /tmp/corpus "$OUTDIR"
D="${SCALE_CARRY:-.}/data"
cp "$D/meta.json" "$D/calib.bin" "$D/eval.bin" /tmp/corpus/
[ -f /tmp/corpus/train.bin ] || python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('$D/train.bin.xz'), open('/tmp/corpus/train.bin','wb'))"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nproc
timeout -s TERM "${SCALE_TIMEOUT:-100000}" python3 -m jaxmoe.scale --data /tmp/corpus "$@" 2>&1 | tee "$OUTDIR/log.txt"
