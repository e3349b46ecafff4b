#!/usr/bin/env bash
# Issue 27's device run in ONE call (see benchmarks/README.md, "The device run").
#
#   bash benchmarks/gpu_run.sh stage    # here, once: jsonschema and its helpers (0.5 MB) into .whl/, and
#                                       # onnxruntime-gpu 1.31.1 (255 MB) in parts of at most 60 MiB into .devcarry/1..5
#   bash benchmarks/gpu_run.sh [ARGS]   # on the GPU machine, carry [".devcarry/5", ".whl"] after the part calls:
#                                       # install what was staged into /tmp/site (once per machine), run gpu_run.py
#
# Everything is written to $OUT (what comes back from the call). ARGS go to gpu_run.py (--steps, --budget).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0"

if [ "${1:-}" = stage ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS \
    || exit 1
  exec ../shared/device/stage-wheels onnxruntime-gpu==1.31.1
fi

out=${OUT:-/tmp/run}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
  # the last staged part carries install.sh: it joins the parts the earlier calls copied to /tmp/stage and installs
  # onnxruntime-gpu into /tmp/site
  install=$(ls .devcarry/*/install.sh 2>/dev/null | tail -1)
  if [ -n "$install" ] && [ ! -d /tmp/site/onnxruntime/capi ]; then bash "$install" || echo "install of the staged wheels failed"; fi
  if ls .whl/*.whl >/dev/null 2>&1 && ! PYTHONPATH=/tmp/site python3 -c 'import jsonschema' 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  fi
} 2>&1 | tee "$out/log.txt"
export PYTHONPATH=/tmp/site:$PWD
# onnxruntime-gpu 1.31.1's CUDA provider needs libcublasLt.so.13, libcublas.so.13, libcurand.so.10, libcudart.so.13:
# torch 2.11+cu130's nvidia packages hold them. Each step imports torch before onnxruntime and calls
# onnxruntime.preload_dlls(); the search path is the fallback for what neither loads.
site=$(python3 -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("torch").origin).parents[1])')
libs=$(ls -d "$site"/nvidia/*/lib "$site"/nvidia/cu13/lib 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv > "$out/nvidia-smi.csv" 2>&1
python3 benchmarks/gpu_run.py --out "$out" "$@" 2>&1 | tee -a "$out/log.txt"
