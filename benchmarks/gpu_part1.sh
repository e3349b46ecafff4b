#!/usr/bin/env bash
# CUDA part 1 in ONE device call (see benchmarks/README.md, "CUDA part 1").
#
#   bash benchmarks/gpu_part1.sh stage      # here: jsonschema and its helpers (0.5 MB) into .whl/ (git-ignored)
#   bash benchmarks/gpu_part1.sh [ARGS]     # on the GPU machine, carry [".whl"]: install them, run gpu_part1.py
#
# Everything is written to $OUT (what comes back from the call). ARGS go to gpu_part1.py (--budget, --rehearse).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0"

if [ "${1:-}" = stage ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  # shellcheck disable=SC2086
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS
fi

out=${OUT:-/tmp/part1}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c 'import jsonschema' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv > "$out/nvidia-smi.csv" 2>&1
python3 benchmarks/gpu_part1.py --out "$out" "$@" 2>&1 | tee "$out/log.txt"
