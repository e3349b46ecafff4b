"""ONNX export of an applied plan: the dynamo exporter, then named graph passes, then the weight invariant.

Passes (onnx_ir passes of ``graph.export_passes``, in order, ``graph_passes``): ``KeepWeightsOptimize`` (the exporter's own optimizer, minus
the two things that break "one named weight per parameter"), ``RmsNormAsDiv``, ``MergeEqualConstants``,
``StripDebugMetadata``; then ``graph.names.CheckpointNames`` names every weight as the checkpoint does, and
``WeightsOnce``, the invariant as a pass of its own, checks the result.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch

from .apply import SkrrEncoder, checkpoint_parameters, stored_names, unique_parameter_bytes
from .errors import InvariantError
from .graph.export_passes import KeepWeightsOptimize, MergeEqualConstants, RmsNormAsDiv, StripDebugMetadata
from .graph.half_scalars import rounded_scalars
from .graph import weights as weights_invariant
from .graph.names import CheckpointNames
from .units import size
from .graph.save import save_model
from .graph.weights import Initializers

log = logging.getLogger("skrr_export")

OPSET = 20
IR_VERSION = 10  # ONNX Runtime 1.30/1.31 refuse IR > 13; onnx 1.23 would write a newer one
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # protobuf's limit for a single file


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
    initializers: Initializers
    unique_parameter_bytes: int
    seconds: float

    @property
    def initializer_bytes(self) -> int:
        return self.initializers.total_bytes

    def to_json(self) -> dict[str, Any]:
        i = self.initializers
        return {
            "path": self.path.name,
            "data_path": self.data_path.name if self.data_path else None,
            "inputs": list(self.input_names),
            "outputs": list(self.output_names),
            "initializer_bytes": i.total_bytes,
            "weights": {"count": i.weight_count, "bytes": i.weight_bytes},
            "constants": {"count": i.constant_count, "bytes": i.constant_bytes},
            "unique_parameter_bytes": self.unique_parameter_bytes,
            "seconds": round(self.seconds, 2),
        }


def sample_inputs(module: SkrrEncoder, options: ExportOptions, vocab_size: int) -> tuple[torch.Tensor, ...]:
    """One tensor per input of ``module``: batch 2 and a sequence > 1 so the exporter does not specialize dynamic axes
    to 1. Ids count up through the vocabulary, the mask is all ones, anything else (segment ids) zeros."""
    seq = options.fixed_sequence or 8
    dtype = getattr(torch, options.input_dtype)
    ids = torch.arange(2 * seq, dtype=dtype).reshape(2, seq) % vocab_size
    fill = {"input_ids": ids, "attention_mask": torch.ones(2, seq, dtype=dtype)}
    return tuple(fill.get(name, torch.zeros(2, seq, dtype=dtype)) for name in module.input_names)


def dynamic_shapes(module: SkrrEncoder, options: ExportOptions) -> tuple[Any, ...]:
    """torch.export's dynamic axes per input, from the family's declaration; the optional inputs are one varargs
    tuple of ``forward``. A fixed sequence leaves only the batch axis dynamic."""
    axes = [{d: name for d, name in enumerate(i.axes) if not (options.fixed_sequence and name == "sequence")}
            for i in module.inputs]
    required = sum(not i.optional for i in module.inputs)
    return (*axes[:required], tuple(axes[required:])) if required < len(axes) else tuple(axes)


def export_onnx(module: SkrrEncoder, path: Path, options: ExportOptions, vocab_size: int,
                quantized: Any = None) -> OnnxArtifact:
    """Export ``module`` to ``path`` (plus ``path.data`` when external) and check the weight invariant.
    ``quantized`` (``quantize.QuantizedWeights``): store those weights quantized (opset 21), checked likewise."""
    from . import quantize

    start = time.perf_counter()
    program = _torch_export(module, options, vocab_size, quantize.OPSET if quantized is not None else OPSET)
    graph_passes(weight_names(module))(program.model)
    CheckpointNames(stored_names(module))(program.model)  # from here on, the graph's weights go by checkpoint names
    check_half_scalars(program.model)
    program.model.ir_version = IR_VERSION
    stored = weights_once(program.model, module, options.fixed_sequence)
    if quantized is not None:
        stored = quantize.store_quantized(program.model, module, quantized, options.fixed_sequence)
    external = options.external_data if options.external_data is not None else stored.total_bytes > EXTERNAL_DATA_THRESHOLD
    data_path = path.with_name(path.name + ".data") if external else None
    save_model(program.model, path, external)  # and onnx.checker on it, without reading the weights back
    seconds = time.perf_counter() - start
    log.info("exported %s: %d weights (%s, each parameter once), %d constants (%s) in %.1f s", path.name,
             stored.weight_count, size(stored.weight_bytes), stored.constant_count, size(stored.constant_bytes), seconds)
    return OnnxArtifact(
        path=path,
        data_path=data_path,
        input_names=module.input_names,
        output_names=tuple(module.output_names),
        initializers=stored,
        unique_parameter_bytes=unique_parameter_bytes(module),
        seconds=seconds,
    )


def _torch_export(module: SkrrEncoder, options: ExportOptions, vocab_size: int, opset: int = OPSET) -> Any:
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" and the like
    # With autograd on, the exporter cannot decompose HF T5 attention with dynamic shapes (DESIGN.md).
    # Its internal warnings are not the user's to act on. Its optimizer runs later, as KeepWeightsOptimize.
    with torch.no_grad(), warnings.catch_warnings(), HalfScalarsInFp32():
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            module,
            sample_inputs(module, options, vocab_size),
            dynamo=True,
            opset_version=opset,
            input_names=list(module.input_names),
            output_names=list(module.output_names),
            dynamic_shapes=dynamic_shapes(module, options),
            optimize=False,
            verbose=False,
        )


# Elementwise arithmetic that PyTorch's eager kernels compute in fp32 ("opmath") for half-precision tensors
# (add, sub, mul, div, pow and their operator and reversed forms): a Python scalar enters at fp32.
_SCALAR_ARITHMETIC = {"add", "sub", "rsub", "mul", "div", "true_divide", "truediv", "rdiv", "pow", "rpow"}
_HALF = (torch.bfloat16, torch.float16)


class HalfScalarsInFp32(torch.overrides.TorchFunctionMode):
    """Export half-precision arithmetic with a Python scalar as PyTorch's eager kernels run it: the scalar in fp32.

    Eager bf16/fp16 applies a Python scalar in fp32 and rounds only the result; the exporter instead stores the scalar
    as a constant of the tensor's dtype, so T5's tanh-GELU read 0.796875 for sqrt(2/pi) = 0.7978846 and 0.044677734
    for 0.044715 (CLIP's quick-GELU: 1.703125 for 1.702): a graph that drifts from the module on every runtime
    (DESIGN.md section 7). Under this mode an operation whose scalar is not exact in the tensor's dtype is traced as
    Cast up, compute in fp32, Cast down: bit-identical to eager (tests/test_half_scalars.py), and exported as such.
    Scalars that are exact in the half dtype (0.5, 1.0, 3.0) stay as they are."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        dtype = _inexact_half_scalar(func, args, kwargs)
        if dtype is None:
            return func(*args, **kwargs)
        widen = lambda a: a.float() if isinstance(a, torch.Tensor) else a  # noqa: E731
        return func(*map(widen, args), **{k: widen(v) for k, v in kwargs.items()}).to(dtype)


def _inexact_half_scalar(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.dtype | None:
    """The half dtype of ``func``'s tensors when it is scalar arithmetic whose scalar that dtype cannot hold exactly."""
    if getattr(func, "__name__", "").strip("_") not in _SCALAR_ARITHMETIC:
        return None
    values = (*args, *kwargs.values())
    dtypes = {a.dtype for a in values if isinstance(a, torch.Tensor)}
    if len(dtypes) != 1 or (dtype := next(iter(dtypes))) not in _HALF:
        return None
    scalars = [a for a in values if isinstance(a, (int, float)) and not isinstance(a, bool)]
    return dtype if any(float(torch.tensor(s, dtype=dtype)) != s for s in scalars) else None


def weight_names(module: torch.nn.Module) -> set[str]:
    """Every name a parameter of ``module`` goes by (the exporter names each initializer after one of them)."""
    return {name for name, _ in module.named_parameters(remove_duplicate=False)}


def graph_passes(weights: set[str]) -> ir.passes.Sequential:
    """The export's graph edits, in order; ``weights``: every name a parameter goes by (never folded or merged)."""
    return ir.passes.Sequential(KeepWeightsOptimize(weights), RmsNormAsDiv(), MergeEqualConstants(weights),
                                StripDebugMetadata())


class WeightsOnce(ir.passes.InPlacePass):
    """The invariant (``graph.weights.check``) for ``module``'s export: every parameter is exactly one initializer
    named after it in the checkpoint (``apply.checkpoint_parameters``), the weights hold the module's unique parameter
    bytes, everything else stored is within the bound for ``sequence`` and copies no weight. A violation is a bug of
    this tool (InvariantError); ``stored`` is the accounting after the pass has run. Changes nothing."""

    def __init__(self, module: torch.nn.Module, sequence: int | None = None):
        super().__init__()
        self.module = module
        self.sequence = sequence
        self.stored: Initializers | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        keys = {name: stored for name, (stored, _) in checkpoint_parameters(self.module).items()}
        expected = weights_invariant.Expected({n: (k,) for n, k in keys.items()}, frozenset(keys.values()),
                                              unique_parameter_bytes(self.module), sequence=self.sequence)
        result = weights_invariant.check(model, expected)
        if not result:
            raise InvariantError(f"exported ONNX breaks {result.message()}")
        self.stored = result.stored
        return ir.passes.PassResult(model, modified=False)


def weights_once(model: ir.Model, module: torch.nn.Module, sequence: int | None = None) -> Initializers:
    """Run the ``WeightsOnce`` invariant on ``model``; its accounting of weights and constants."""
    invariant = WeightsOnce(module, sequence)
    invariant(model)
    assert invariant.stored is not None
    return invariant.stored


def check_half_scalars(model: ir.Model) -> None:
    """The export's half-precision arithmetic uses every scalar at the precision PyTorch does (HalfScalarsInFp32);
    a rounded scalar left in the graph is a bug of this tool."""
    found = rounded_scalars(model)
    if found:
        raise InvariantError(f"{len(found)} half-precision node(s) compute with a rounded scalar, first: {found[0]}")
