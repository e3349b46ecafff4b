"""Reading an ONNX file into onnx_ir: the one reader of the ONNX layer (external data stays on disk until read)."""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

from ..artifacts import check_onnx_files
from ..errors import ArtifactError


def read_model(path: Path) -> ir.Model:
    """The model at ``path``, once it and every external data file it names are known to be there."""
    check_onnx_files(path)
    try:
        return ir.load(os.fspath(path))
    except Exception as exc:  # protobuf's DecodeError and the like
        raise ArtifactError(f"{path} is not a readable ONNX model ({type(exc).__name__}); export it again") from None
