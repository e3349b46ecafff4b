"""The ONNX Runtime-only variant of an export (``--optimize ort``): attention as com.microsoft MultiHeadAttention,
norms and GELU as ONNX Runtime's fused operators. For ONNX Runtime and Triton's onnxruntime backend, never TensorRT.

The rewrites are onnx_ir passes of the ONNX layer (``graph.fusion``, registered in ``graph.passes``), run in order on
the saved graph (its weight data is neither loaded nor rewritten): ``ort-fuse-attention``, ``ort-fuse-half-norms``,
``ort-fuse-tanh-gelus``, ``ort-transformer-fusions``; then the weights-once invariant (``graph.weights.check``) with
the export's own weights expected exactly as the export stored them (``graph.weights.stored_expected``): nothing was
packed, copied or rewritten.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from .errors import InvariantError, UserError
from .graph import passes
from .graph import weights as weights_invariant
from .graph.fusion import MS_DOMAIN
from .graph.read import read_model

log = logging.getLogger("skrr_export")

RUNTIME_ONLY = ("the fused graph uses ONNX Runtime's com.microsoft operators: run it with ONNX Runtime (or Triton's "
                "onnxruntime backend), never TensorRT")
OPTIMIZATIONS = ("ort",)
# Ops that are only attention when they are left unfused: the test of "no unfused attention left".
UNFUSED_ATTENTION = ("Softmax",)


@dataclass(frozen=True)
class FusionResult:
    attention: int  # MultiHeadAttention nodes written by the ort-fuse-attention pass
    unfused_softmax: int  # Softmax nodes left: attention that did not match
    op_counts: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"optimize": "ort", "runtime": RUNTIME_ONLY, "fused_attention": self.attention,
                "unfused_softmax": self.unfused_softmax, "op_counts": self.op_counts}


def check_optimize(optimize: str | None, engine: str) -> None:
    """``--optimize ort`` is an ONNX Runtime graph: refuse it with an engine build before any work."""
    if optimize is None:
        return
    if optimize not in OPTIMIZATIONS:
        raise UserError(f"--optimize must be one of {', '.join(OPTIMIZATIONS)}, got '{optimize}'")
    if engine != "onnx":
        raise UserError(f"--optimize ort writes ONNX Runtime-only operators (com.microsoft MultiHeadAttention, "
                        f"SkipLayerNormalization) that TensorRT cannot build; use --engine onnx with --optimize ort, "
                        f"or --engine {engine} without it")


def refuse_for_tensorrt(path: Path) -> None:
    """A fused ONNX (com.microsoft operators) cannot become a TensorRT engine: one line instead of a parser error."""
    if any(n.domain == MS_DOMAIN for n in onnx.load(str(path), load_external_data=False).graph.node):
        raise UserError(f"{path} was exported with --optimize ort: {RUNTIME_ONLY}; export again without --optimize to "
                        "build a TensorRT engine")


def op_counts(proto: Any) -> dict[str, int]:
    counts = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in proto.graph.node)
    return dict(sorted(counts.items()))


# ----------------------------------------------------------------------------------------------- the variant


def fuse_for_ort(path: Path, model_type: str) -> tuple[list[int], FusionResult]:
    """Rewrite the exported graph at ``path`` into the fused variant, in place: the graph only (an external data
    file is neither read nor rewritten). Returns its initializers' sizes and what was fused."""
    from .export import IR_VERSION

    model = read_model(path)
    expected = weights_invariant.stored_expected(model)
    attention = passes.PASSES["ort-fuse-attention"].cls()
    ir.passes.Sequential(attention, passes.PASSES["ort-fuse-half-norms"].cls(),
                         passes.PASSES["ort-fuse-tanh-gelus"].cls())(model)
    model = passes.PASSES["ort-transformer-fusions"].cls(model_type)(model).model
    ir.external_data.set_base_dir(model.graph, path.parent)
    check = weights_invariant.check(model, expected)
    if not check:
        raise InvariantError(f"ONNX Runtime fusion breaks {check.message()}")
    model.ir_version = IR_VERSION
    proto = ir.serde.serialize_model(model)
    onnx.save(proto, str(path))  # not onnx.checker: it rejects ONNX Runtime's SimplifiedLayerNormalization
    counts = op_counts(proto)
    result = FusionResult(attention.fused, sum(v for k, v in counts.items() if k in UNFUSED_ATTENTION), counts)
    log.info("fused for ONNX Runtime: %d MultiHeadAttention, %d Softmax left, %d nodes", result.attention,
             result.unfused_softmax, sum(counts.values()))
    return [int(v.const_value.nbytes) for v in model.graph.initializers.values()], result


def fuse_artifact(artifact: Any, adapter: Any) -> tuple[Any, FusionResult]:
    """The exported ``artifact`` fused for ONNX Runtime (as the family's ``ort_model_type``): its weights as the
    export stored and checked them, its constants counted anew."""
    from dataclasses import replace

    sizes, result = fuse_for_ort(artifact.path, adapter.ort_model_type)
    weights = artifact.initializers
    constants = replace(weights, constant_count=len(sizes) - weights.weight_count,
                        constant_bytes=sum(sizes) - weights.weight_bytes)
    return replace(artifact, initializers=constants), result
