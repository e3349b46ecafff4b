"""Make tensorrt-stubs 10.13 usable by mypy.

As published, the stubs have no py.typed marker, two syntax errors (parameters named ``in``; a required
parameter after defaulted ones in ``add_scale_nd``) and import ``tensorrt_libs``. This copies them into a
folder and repairs exactly those, so that mypy can check skrr_export/trt.py against TensorRT's API.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path


def installed_stubs() -> Path | None:
    """site-packages folder holding tensorrt/__init__.pyi from tensorrt-stubs, if installed."""
    spec = importlib.util.find_spec("tensorrt")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "__init__.pyi").is_file() and (Path(folder).parent / "tensorrt_bindings").is_dir():
            return Path(folder).parent
    return None


def prepare(site: Path, dest: Path) -> Path:
    for pkg in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(site / pkg, dest / pkg, ignore=shutil.ignore_patterns("*.so", "*.py", "__pycache__"))
    for pyi in dest.rglob("*.pyi"):
        text = pyi.read_text()
        text = re.sub(r"\bin: list", "in_: list", text)
        text = re.sub(
            r"def add_scale_nd\(self, input: ITensor, mode: ScaleMode, shift: Weights = None, scale: Weights = None, "
            r"power: Weights = None, channel_axis: int\)",
            "def add_scale_nd(self, input: ITensor, mode: ScaleMode, shift: Weights = ..., scale: Weights = ..., "
            "power: Weights = ..., channel_axis: int = ...)",
            text,
        )
        text = text.replace("import tensorrt_libs as tensorrt_libs", "from typing import Any as tensorrt_libs")
        pyi.write_text(text)
    config = dest / "mypy.ini"
    config.write_text(
        "[mypy]\n"
        f"mypy_path = {dest}\n"
        "python_version = 3.11\n"
        "follow_imports = silent\n"
        "[mypy-tensorrt.*,tensorrt_bindings.*,tensorrt,tensorrt_bindings]\n"
        "ignore_errors = True\n"
        "[mypy-tensorrt_libs,tensorrt_rtx,tensorrt_rtx.*,onnx.*,onnxruntime.*,torch.*,transformers.*]\n"
        "ignore_missing_imports = True\n"
        # not analysed (their names are Any here): the check is about TensorRT's API, and torch alone took most of
        # the run's minute
        "[mypy-torch,torch.*,transformers,transformers.*,onnx,onnx.*,onnx_ir,onnx_ir.*,onnxscript,onnxscript.*,"
        "onnxruntime,onnxruntime.*]\n"
        "follow_imports = skip\n"
    )
    return config
