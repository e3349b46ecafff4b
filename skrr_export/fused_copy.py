"""fused_copy: the ``--optimize ort`` variant of an export measured as ort-cuda-fused: a copy of the graph file rewritten
by ONNX Runtime's transformer optimizer and our attention pass, reading the export's own data file (checked)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from .errors import ArtifactError, InvariantError, UserError


def fused_copy(onnx_path: Path, model_type: str) -> tuple[Path, dict[str, Any]]:
    """A copy of the graph file next to ``onnx_path`` (``model.onnx`` -> ``model.ort.onnx``), rewritten by
    ``ort_fusion.fuse_for_ort``; its initializers keep their external-data entries, which resolve beside the file,
    so both graphs read the export's one data file and no weight is copied (``shared_weight_storage`` checks it).
    Returns the copy and what was fused (op counts, attention fused, how the weights are stored)."""
    from .ort_fusion import fuse_for_ort

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
    """How the fused copy stores its initializers, checked against the export it was made from: it reads the same
    external data files, every byte of them, and holds inline only what the export held inline plus the fusions'
    scalars and shape vectors (``ort_fusion.ADDED_ELEMENTS``). A weight stored anew is an InvariantError."""
    from .ort_fusion import ADDED_ELEMENTS

    ours, theirs = _storage(fused), _storage(export)
    copied = [name for name, (elements, _) in ours["inline"].items()
              if name not in theirs["inline"] and elements > ADDED_ELEMENTS]
    if copied:
        raise InvariantError(f"the fused copy {fused.name} stores {copied[0]} in its graph file ({len(copied)} such): "
                             "the weights must stay in the export's data file")
    if (ours["data_files"], ours["external_bytes"]) != (theirs["data_files"], theirs["external_bytes"]):
        raise InvariantError(f"the fused copy {fused.name} reads {ours['data_files']} ({ours['external_bytes']} bytes), "
                             f"not the export's {theirs['data_files']} ({theirs['external_bytes']} bytes)")
    inline = sum(size for _, size in ours["inline"].values())
    return {"data_files": ours["data_files"], "external_bytes": ours["external_bytes"], "inline_bytes": inline,
            "export_inline_bytes": sum(size for _, size in theirs["inline"].values()),
            "graph_file_bytes": fused.stat().st_size}


def _storage(path: Path) -> dict[str, Any]:
    """An ONNX file's initializers without reading external data: the data files, their bytes, the inline ones
    (name -> (elements, bytes))."""
    import onnx

    from .ort_fusion import tensor_bytes

    init = onnx.load(str(path), load_external_data=False).graph.initializer
    external = [t for t in init if t.data_location == onnx.TensorProto.EXTERNAL]
    return {"data_files": sorted({e.value for t in external for e in t.external_data if e.key == "location"}),
            "external_bytes": sum(map(tensor_bytes, external)),
            "inline": {t.name: (math.prod(t.dims), tensor_bytes(t)) for t in init
                       if t.data_location != onnx.TensorProto.EXTERNAL}}
