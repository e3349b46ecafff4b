#!/usr/bin/env bash
# CUDA part 2: the exported ONNX on ONNX Runtime CUDA (see benchmarks/README.md, "CUDA part 2", for the device calls).
#
#   bash benchmarks/gpu_part2.sh stage    # here: jsonschema into .whl/ (gpu_part1.sh stage), and onnxruntime-gpu 1.31.1
#                                         # (255 MB) in parts of at most 60 MiB into .devcarry/1..5 (stage-wheels)
#   bash benchmarks/gpu_part2.sh [ARGS]   # on the GPU machine: install what was staged into /tmp/site (once per
#                                         # machine), point the loader at torch's CUDA 13 libraries, run gpu_part2.py
#
# Everything is written to $OUT (what comes back from the call). ARGS go to gpu_part2.py (--steps, --budget, --rehearse).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = stage ]; then
  bash benchmarks/gpu_part1.sh stage || exit 1
  exec ../shared/device/stage-wheels onnxruntime-gpu==1.31.1
fi

out=${OUT:-/tmp/part2}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
  # the last staged part carries install.sh: it joins the parts copied to /tmp/stage by the earlier calls and
  # installs onnxruntime-gpu into /tmp/site
  install=$(ls .devcarry/*/install.sh 2>/dev/null | tail -1)
  if [ -n "$install" ] && [ ! -d /tmp/site/onnxruntime/capi ]; then bash "$install" || echo "install of the staged wheels failed"; fi
  if ls .whl/*.whl >/dev/null 2>&1 && ! PYTHONPATH=/tmp/site python3 -c 'import jsonschema' 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  fi
} 2>&1 | tee "$out/log.txt"
export PYTHONPATH=/tmp/site:$PWD
# onnxruntime-gpu 1.31.1's CUDA provider needs libcublasLt.so.13, libcublas.so.13, libcurand.so.10, libcudart.so.13:
# torch 2.11+cu130's nvidia packages hold them (nvidia/cu13/lib, cuDNN in nvidia/cudnn/lib). gpu_part2.py imports torch
# before onnxruntime and calls onnxruntime.preload_dlls(); the search path is the fallback for what neither loads.
site=$(python3 -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("torch").origin).parents[1])')
libs=$(ls -d "$site"/nvidia/*/lib 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv > "$out/nvidia-smi.csv" 2>&1
python3 benchmarks/gpu_part2.py --out "$out" "$@" 2>&1 | tee -a "$out/log.txt"
