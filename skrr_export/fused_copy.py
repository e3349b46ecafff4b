"""fused_copy: the ``--optimize ort`` variant of an export measured as ort-cuda-fused: a copy of the graph file rewritten
by ONNX Runtime's transformer optimizer and our attention pass, reading the export's own data file (checked)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import onnx_ir as ir

from .errors import ArtifactError, InvariantError, UserError
from .graph import weights as weights_invariant
from .graph.read import read_model
from .ort_fusion import fuse_for_ort


def fused_copy(onnx_path: Path, model_type: str) -> tuple[Path, dict[str, Any]]:
    """A copy of the graph file next to ``onnx_path`` (``model.onnx`` -> ``model.ort.onnx``), rewritten by
    ``ort_fusion.fuse_for_ort``; its initializers keep their external-data entries, which resolve beside the file,
    so both graphs read the export's one data file and no weight is copied (``shared_weight_storage`` checks it).
    Returns the copy and what was fused (op counts, attention fused, how the weights are stored)."""
    fused = onnx_path.with_name(onnx_path.name.removesuffix(".onnx") + ".ort.onnx")
    shutil.copyfile(onnx_path, fused)
    try:
        _, result = fuse_for_ort(fused, model_type)
    except (UserError, InvariantError):
        fused.unlink()
        raise
    except Exception as exc:  # ONNX Runtime's optimizer changes between releases: name it, do not lose the run
        fused.unlink()
        raise ArtifactError(f"ONNX Runtime's transformer optimizer could not fuse {onnx_path.name}: "
                            f"{type(exc).__name__}: {exc}") from exc
    return fused, result.to_json() | {"storage": shared_weight_storage(onnx_path, fused)}


def shared_weight_storage(export: Path, fused: Path) -> dict[str, Any]:
    """How the fused copy stores its initializers, checked against the export it was made from by the weights-once
    invariant (``graph.weights.check``, the export's weights expected exactly as the export stores them): every weight
    is the export's own, in the same data file at the same place (or inline with the same bytes where the export
    holds it inline), and nothing else stored copies one. A weight stored anew is an InvariantError."""
    original, copy = read_model(export), read_model(fused)
    check = weights_invariant.check(copy, weights_invariant.stored_expected(original))
    if not check:
        raise InvariantError(f"the fused copy {fused.name} breaks {check.message()}: the weights must stay where the "
                             f"export stores them")
    ours, theirs = _storage(copy), _storage(original)
    return {"data_files": ours["data_files"], "external_bytes": ours["external_bytes"],
            "inline_bytes": ours["inline_bytes"], "export_inline_bytes": theirs["inline_bytes"],
            "graph_file_bytes": fused.stat().st_size}


def _storage(model: ir.Model) -> dict[str, Any]:
    """A model's initializers without reading external data: the data files, their bytes, the bytes held inline."""
    tensors = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    external = [t for t in tensors if isinstance(t, ir.ExternalTensor)]
    return {"data_files": sorted({str(t.location) for t in external}),
            "external_bytes": sum(int(t.nbytes) for t in external),
            "inline_bytes": sum(int(t.nbytes) for t in tensors if not isinstance(t, ir.ExternalTensor))}
