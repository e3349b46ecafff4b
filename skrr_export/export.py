"""ONNX export of an applied plan: dynamo exporter, initializers deduplicated by content, weight bytes asserted."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .apply import SkrrEncoder, unique_parameter_bytes
from .errors import InvariantError, UserError

log = logging.getLogger("skrr_export")

OPSET = 20
IR_VERSION = 10  # ONNX Runtime 1.30/1.31 refuse IR > 13; onnx 1.23 would write a newer one
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # protobuf's limit for a single file
# Graph constants that are not parameters (shape vectors, scalars, masks' fill values) may add up to this.
SMALL_CONSTANT_BYTES = 64 * 1024
INPUT_NAMES = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class ExportOptions:
    input_dtype: str = "int64"  # or int32, as NVIDIA's diffusion demo exports T5/CLIP
    fixed_sequence: int | None = None  # None: dynamic batch and sequence
    external_data: bool | None = None  # None: only above 2 GB


@dataclass(frozen=True)
class OnnxArtifact:
    path: Path
    data_path: Path | None
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    initializer_bytes: int
    unique_parameter_bytes: int
    duplicates_removed: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path.name,
            "data_path": self.data_path.name if self.data_path else None,
            "inputs": list(self.input_names),
            "outputs": list(self.output_names),
            "initializer_bytes": self.initializer_bytes,
            "unique_parameter_bytes": self.unique_parameter_bytes,
            "duplicate_initializers_removed": self.duplicates_removed,
            "seconds": round(self.seconds, 2),
        }


def sample_inputs(options: ExportOptions, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 2 and a sequence > 1 so the exporter does not specialize dynamic axes to 1."""
    seq = options.fixed_sequence or 8
    dtype = getattr(torch, options.input_dtype)
    ids = torch.arange(2 * seq, dtype=dtype).reshape(2, seq) % vocab_size
    return ids, torch.ones(2, seq, dtype=dtype)


def export_onnx(module: SkrrEncoder, path: Path, options: ExportOptions, vocab_size: int) -> OnnxArtifact:
    """Export ``module`` to ``path`` (plus ``path.data`` when external) and check the weight-bytes invariant."""
    start = time.perf_counter()
    program = _torch_export(module, options, vocab_size)
    removed = _deduplicate(program.model)
    _fusable_rms_norms(program.model)
    _transpose_lazily(program.model)
    program.model.ir_version = IR_VERSION
    init_bytes = sum(v.const_value.nbytes for v in program.model.graph.initializers.values())
    unique = unique_parameter_bytes(module)
    if init_bytes > unique + SMALL_CONSTANT_BYTES:
        raise InvariantError(
            f"exported initializers hold {init_bytes} bytes but the module has {unique} unique parameter bytes: "
            "a weight is stored more than once"
        )
    external = options.external_data if options.external_data is not None else init_bytes > EXTERNAL_DATA_THRESHOLD
    data_path = path.with_name(path.name + ".data") if external else None
    program.save(str(path), external_data=external)
    _check(path)
    seconds = time.perf_counter() - start
    log.info("exported %s: %d initializer bytes (%d unique parameter bytes) in %.1f s", path.name, init_bytes, unique, seconds)
    return OnnxArtifact(
        path=path,
        data_path=data_path,
        input_names=INPUT_NAMES,
        output_names=tuple(module.output_names),
        initializer_bytes=init_bytes,
        unique_parameter_bytes=unique,
        duplicates_removed=removed,
        seconds=seconds,
    )


def _torch_export(module: SkrrEncoder, options: ExportOptions, vocab_size: int) -> Any:
    ids, mask = sample_inputs(options, vocab_size)
    axes = {0: "batch"} if options.fixed_sequence else {0: "batch", 1: "sequence"}
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" and the like
    # With autograd on, the exporter cannot decompose HF T5 attention with dynamic shapes (DESIGN.md).
    # Its internal warnings are not the user's to act on.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            module,
            (ids, mask),
            dynamo=True,
            opset_version=OPSET,
            input_names=list(INPUT_NAMES),
            output_names=list(module.output_names),
            dynamic_shapes=(axes, axes),
            verbose=False,
        )


def _fusable_rms_norms(model: Any) -> int:
    """T5's RMSNorm exports as ``x * Reciprocal(Sqrt(mean(x^2) + eps))``, which ONNX Runtime's
    SimplifiedLayerNormFusion does not match (it looks for ``x / Sqrt(...)``): every norm then runs as six or
    more nodes. Rewritten as a Div (one rounding instead of two), all of them fuse (measured on ONNX Runtime
    1.31: 7 of 7 SimplifiedLayerNormalization nodes on a 3-block T5, 0 before)."""
    from onnxscript.rewriter import pattern

    def target(op: Any, x: Any, v: Any) -> Any:
        return op.Mul(x, op.Reciprocal(op.Sqrt(v)))

    def replacement(op: Any, x: Any, v: Any) -> Any:
        return op.Div(x, op.Sqrt(v))

    rules = pattern.RewriteRuleSet([pattern.RewriteRule(target, replacement, name="RMSNormAsDiv")], commute=True)
    return int(rules.apply_to_model(model))


CONTENT_HASH_LIMIT = 1 << 20  # bytes; larger initializers are compared by the tensor storage they view


def _deduplicate(model: Any) -> int:
    """Merge initializers that hold the same data: small ones by content (the exporter folds a copy per call
    site of a re-used weight), large ones by the parameter storage they view (a re-used weight is one
    parameter). onnx_ir's own pass hashes contiguous buffers only, which would copy every transposed view
    of a weight: +3.7 GB on the 5.5 GB PixArt-Sigma plan (measured)."""
    merged = 0
    for graph in model.graphs():
        seen: dict[tuple[Any, ...], Any] = {}
        for name, value in tuple(graph.initializers.items()):
            if value.const_value is None or value.is_graph_input() or value.is_graph_output():
                continue
            key = _identity(value.const_value)
            if key in seen:
                value.replace_all_uses_with(seen[key])
                graph.initializers.pop(name)
                merged += 1
            else:
                seen[key] = value
    return merged


def _identity(tensor: Any) -> tuple[Any, ...]:
    """Large tensors: the memory they view (a parameter, or the optimizer's transposed view of one);
    small ones: their content."""
    import hashlib

    import numpy as np

    raw = getattr(tensor, "raw", None)
    if tensor.nbytes > CONTENT_HASH_LIMIT:
        if isinstance(raw, torch.Tensor):
            address = raw.untyped_storage().data_ptr() + raw.storage_offset() * raw.element_size()
            return ("memory", address, tuple(raw.shape), tuple(raw.stride()), str(raw.dtype))
        if isinstance(raw, np.ndarray):
            return ("memory", raw.__array_interface__["data"][0], raw.shape, raw.strides, str(raw.dtype))
    data = np.ascontiguousarray(tensor.numpy())
    return ("content", str(tensor.dtype), tuple(tensor.shape), hashlib.sha256(data.view(np.uint8)).hexdigest())


def _transpose_lazily(model: Any) -> None:
    """The optimizer folds ``Transpose(W)`` into a strided numpy view of each weight; saving copies it with
    numpy's strided loop (0.2 GB/s here). Copy with torch's blocked transpose instead (1.1 GB/s), one tensor at
    a time while saving, so no second copy of the weights is ever held."""
    import numpy as np
    import onnx_ir as ir

    for value in model.graph.initializers.values():
        raw = getattr(value.const_value, "raw", None)
        if not isinstance(raw, np.ndarray) or raw.flags.c_contiguous or raw.nbytes <= CONTENT_HASH_LIMIT:
            continue
        tensor = value.const_value
        value.const_value = ir.LazyTensor(_contiguous(raw), tensor.dtype, tensor.shape, name=tensor.name)


def _contiguous(array: Any) -> Any:
    import numpy as np
    import onnx_ir as ir

    def materialize() -> Any:
        ints = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[array.itemsize]  # torch lacks ml_dtypes' bf16
        return ir.tensor(torch.from_numpy(array.view(ints)).contiguous().numpy().view(array.dtype))

    return materialize


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as exc:
        raise InvariantError(f"exported ONNX fails onnx.checker: {str(exc).splitlines()[0]}") from None


def onnx_initializer_sizes(path: Path) -> list[int]:
    """Byte size of every initializer of an ONNX file on disk (external data included), without loading the data."""
    import onnx

    if not path.is_file():
        raise UserError(f"{path} does not exist")
    model = onnx.load(str(path), load_external_data=False)
    sizes = []
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            sizes.append(int({e.key: e.value for e in init.external_data}.get("length", 0)))
        else:
            sizes.append(len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes)
    return sizes


def onnx_weight_bytes(path: Path) -> int:
    return sum(onnx_initializer_sizes(path))
