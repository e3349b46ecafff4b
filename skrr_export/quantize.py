"""Weight-only quantization stacked on a plan: int8 per output channel, or int4 in blocks along the input width.

What is quantized: the weight of every ``nn.Linear`` in the kept sub-blocks (the attention and feed-forward
projections, nearly all of the bytes). Embeddings, norms, biases, T5's position table and the head (CLIP's
projection) stay in the export's precision: benchmarks/README.md, "Weight-only quantization", measures the choice.
Quantization is symmetric (no zero point). A scale has the weight's own dtype (T5's ``wo`` in an fp16 export: fp32),
except next to bf16 weights, where it is fp16: ONNX Runtime's CPU provider refuses DequantizeLinear with bf16 scales
and its CUDA kernels register float and half scales only (DESIGN.md section 7); such a weight is dequantized to fp16
and cast to bf16, which ``dequantize`` computes too.

One parameter is quantized once, however many slots run it: ``quantize_module`` keys its results by the parameter
object, which a re-used sub-block shares between its slots. Stages:
``quantize_module`` (PyTorch: each weight replaced by its dequantized values, the parity reference) ->
``store_quantized`` (the ONNX pass ``graph.quantized.StoreQuantized``, registered as ``store-quantized``: int8/int4
initializers + scales -> DequantizeLinear -> MatMul) ->
``quantized_weights_once`` (the invariant: the stored bytes are the plan's kept weights at their quantized size).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .apply import checkpoint_parameters
from .errors import ArgumentError, InvariantError, UserError
from .graph import weights as weights_invariant
from .graph.quantized import OPSET, QUANTIZED_SUFFIX, SCALE_SUFFIX, QuantizedArrays, StoreQuantized
from .progress import each
from .units import size

SCHEMES = {"int8": 8, "int4": 4}
BLOCKS = (32, 64, 128)
DEFAULT_BLOCK = 64  # by measurement: benchmarks/README.md, "Weight-only quantization"
BYTES_SLACK = 0.01  # stored quantized bytes may differ from the plan's by 1 % (int4 packing of joined weights)


@dataclass(frozen=True)
class Quantization:
    scheme: str  # "int8" (per output channel) or "int4" (block-wise)
    block: int | None = None  # int4 only: input-width elements per scale

    @property
    def bits(self) -> int:
        return SCHEMES[self.scheme]

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1  # symmetric: -qmax .. qmax

    def sizes(self, out_features: int, in_features: int, itemsize: int) -> tuple[int, int]:
        """(integer bytes, scale bytes) of one [out, in] weight whose dtype has ``itemsize`` bytes."""
        scales = out_features * (in_features // self.block if self.block else 1)
        return -(-out_features * in_features * self.bits // 8), scales * itemsize


def quantization(scheme: str | None, block: int | None) -> Quantization | None:
    """The flags ``--quantize`` and ``--quant-block`` as one setting (None: no quantization)."""
    if scheme is None:
        if block is not None:
            raise ArgumentError("--quant-block needs --quantize int4")
        return None
    if scheme not in SCHEMES:
        raise ArgumentError(f"--quantize must be one of {', '.join(SCHEMES)}, got '{scheme}'")
    if scheme == "int8":
        if block is not None:
            raise ArgumentError("--quant-block applies to --quantize int4 only (int8 is per output channel)")
        return Quantization("int8")
    block = DEFAULT_BLOCK if block is None else block
    if block not in BLOCKS:
        raise ArgumentError(f"--quant-block must be one of {', '.join(map(str, BLOCKS))}, got {block}")
    return Quantization("int4", block)


def check_backends(q: Quantization, backend: Any = None) -> None:
    """Refuse, before any work, a runtime or engine builder that cannot take block-wise int4 / int8 weights
    (``backend``: the loaded trt.Backend of an engine job, None for ONNX only)."""
    import onnxruntime

    if tuple(int(v) for v in onnxruntime.__version__.split(".")[:2]) < (1, 20):
        raise UserError(f"--quantize needs onnxruntime >= 1.20 (opset 21 DequantizeLinear), found {onnxruntime.__version__}")
    if backend is None:
        return
    if not backend.rtx and backend.major < 10 and q.scheme == "int4":
        raise UserError(f"--quantize int4 needs TensorRT >= 10 (block-wise int4 weights), found {backend.version}; "
                        "use --quantize int8, --engine trt-rtx, or a newer TensorRT")


# ----------------------------------------------------------------------------------------------- which weights


def quantizable(parts: dict[str, nn.Module], always: Iterable[nn.Module] = ()) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, weight)`` of every ``nn.Linear`` in ``parts`` (kept sub-blocks, by name), each parameter once; a
    weight also owned by an ``always`` module (stem, head) is not a sub-block's and is left alone."""
    skip = {id(p) for m in always for p in m.parameters()}
    for prefix, part in parts.items():
        for name, module in part.named_modules():
            w = getattr(module, "weight", None) if isinstance(module, nn.Linear) else None
            if w is not None and id(w) not in skip:
                skip.add(id(w))
                yield f"{prefix}.{name}.weight" if name else f"{prefix}.weight", w


def kept_parts(module: Any) -> dict[str, nn.Module]:
    """The kept sub-blocks of an applied plan (``SkrrEncoder``), by their parameter-name prefix."""
    return {f"kept.{i}": part for i, part in module.kept.items()}


def check_blocks(q: Quantization, weights: Iterable[tuple[str, Any]]) -> None:
    """Every quantized weight's input width is a whole number of blocks."""
    for name, w in weights:
        if q.block and w.shape[1] % q.block:
            raise ArgumentError(f"--quant-block {q.block} does not divide the input width {w.shape[1]} of {name}; "
                                f"use a block in {', '.join(str(b) for b in BLOCKS if w.shape[1] % b == 0) or 'none'}")


# ----------------------------------------------------------------------------------------------- PyTorch side


@dataclass(frozen=True)
class QuantizedWeight:
    """One parameter's integers ``[in, out]`` (the MatMul's layout: no Transpose in the graph) and its scales
    (``[out]`` for int8, ``[in / block, out]`` for int4), in the weight's dtype."""

    name: str
    bits: int
    values: torch.Tensor  # int8 [in, out]; int4: uint8 [in, out / 2], two per byte, the even column in the low nibble
    scales: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.values.numel() + self.scales.numel() * self.scales.element_size()


def quantize_tensor(weight: torch.Tensor, q: Quantization, name: str = "weight") -> QuantizedWeight:
    """Symmetric quantization of a ``[out, in]`` weight; the integers are rounded against the scales as stored
    (``scale_dtype``), so that ``values * scales`` is what every runtime computes."""
    w = weight.detach().float().t()  # [in, out]
    blocks = w.reshape(-1, q.block, w.shape[1]) if q.block else w[None]
    scales = (blocks.abs().amax(dim=1) / q.qmax).to(scale_dtype(weight.dtype))  # [in / block, out] or [1, out]
    stored = scales.float()
    values = torch.round(blocks / torch.where(stored == 0, 1.0, stored)[:, None]).clamp_(-q.qmax, q.qmax)
    values = values.reshape(w.shape).to(torch.int8)
    return QuantizedWeight(name, q.bits, _pack(values) if q.bits == 4 else values, scales if q.block else scales[0])


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scales next to bf16 weights are fp16 (every runtime's DequantizeLinear takes it; equal bytes); else the weight's."""
    return torch.float16 if dtype == torch.bfloat16 else dtype


def _pack(values: torch.Tensor) -> torch.Tensor:
    """int4 [in, out] -> uint8 [in, out / 2] in ONNX's layout (the first of each pair in the low nibble); rows stay
    rows, so weights joined along the output width are their packed rows joined."""
    if values.shape[1] % 2:
        raise InvariantError(f"int4 packing needs an even output width, got {values.shape[1]}")
    nibbles = values.to(torch.uint8) & 0x0F
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [in, out / 2] -> int8 [in, out] in -8 .. 7."""
    low, high = (packed & 0x0F).to(torch.int8), (packed >> 4).to(torch.int8)
    pairs = torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)
    return (pairs ^ 8) - 8


def dequantize(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The ``[out, in]`` weight the graph computes with: ``values * scales`` in fp32, rounded once to ``dtype``."""
    values = (_unpack(qw.values) if qw.bits == 4 else qw.values).float()
    scales = qw.scales.float()
    if scales.ndim == 2:  # int4: one scale per block of rows
        blocks = values.view(scales.shape[0], -1, values.shape[1]).mul_(scales[:, None, :])
        return blocks.view(values.shape).to(qw.scales.dtype).to(dtype).t()
    return values.mul_(scales).to(qw.scales.dtype).to(dtype).t()


@dataclass
class QuantizedWeights:
    """What ``quantize_module`` did: each quantized parameter once (by identity), and what it left alone."""

    quantization: Quantization
    weights: dict[int, QuantizedWeight]  # id(parameter) -> its quantized form
    kept: dict[str, int]  # parameters left in the export's precision: name -> bytes

    @property
    def bytes(self) -> int:
        return sum(w.nbytes for w in self.weights.values())


@torch.no_grad()
def quantize_module(module: Any, q: Quantization) -> QuantizedWeights:
    """Quantize the kept sub-blocks' linear weights of an applied plan, one tensor at a time, and let go of each
    weight's values: its layer dequantizes it just before it runs and drops it after (``_dequantize_on_call``). So
    ``module`` computes with the quantized weights (the parity reference) while it holds the integers and scales,
    the unquantized parts and one layer's weight at a time (the memory floor of a T5-v1.1-XXL-size export)."""
    targets = list(quantizable(kept_parts(module), (module.stem, module.head)))
    check_blocks(q, ((module.checkpoint_name(n), p) for n, p in targets))
    done: dict[int, QuantizedWeight] = {}
    stored: dict[int, torch.dtype] = {}
    for name, p in each(targets, "weights"):
        done[id(p)], stored[id(p)] = quantize_tensor(p.data, q, module.checkpoint_name(name)), p.dtype
        _drop_file_pages(p.data)
        p.data = placeholder(p.data)
    _dequantize_on_call(module, done, stored)
    kept: dict[str, int] = {}
    seen = set(done)
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            kept[name] = p.numel() * p.element_size()
    return QuantizedWeights(q, done, kept)


def _drop_file_pages(t: torch.Tensor) -> None:
    """A weight read as a zero-copy view of a private file mapping (the loader's safetensors views) gives its pages
    back to the page cache once quantized: they stay counted in the process's memory while mapped otherwise (measured
    on T5-v1.1-XXL: 5.5 GB of checkpoint pages resident beside the integers). Whole pages inside the tensor only;
    read again, they come from the file unchanged. Anything else (converted or random weights) is left alone."""
    import ctypes
    import mmap

    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(a, 16) for a in fields[0].split("-"))
            if low <= start and end <= high:
                if len(fields) < 6 or not fields[5].endswith(".safetensors") or fields[1][3] != "p":
                    return
                first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
                if last > first:
                    ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)
                return


def placeholder(t: torch.Tensor) -> torch.Tensor:
    """``t``'s shape and dtype without its bytes (one element, expanded): what the exporter traces; the ONNX pass
    replaces it by the integers and scales before anything reads its values."""
    return torch.zeros((), dtype=t.dtype).expand(t.shape)


def _dequantize_on_call(module: Any, weights: dict[int, QuantizedWeight], stored: dict[int, torch.dtype]) -> None:
    """Each ``nn.Linear`` with a quantized weight gets its dequantized values (in its ``stored`` dtype, as the graph
    holds them, then in the weight's dtype at call time: fp32 inside ``apply.computed_in_fp32``) just before it runs,
    and a placeholder again after. Not while ``torch.export`` traces: the exporter sees the placeholder. A weight
    taken out of ``weights`` is left as it is."""
    def before(layer: nn.Module, args: object) -> None:
        key = id(layer.weight)
        if key in weights and not torch.compiler.is_exporting():
            layer.weight.data = dequantize(weights[key], stored[key]).to(layer.weight.dtype)

    def after(layer: nn.Module, args: object, output: object) -> None:
        if id(layer.weight) in weights and not torch.compiler.is_exporting():
            layer.weight.data = placeholder(layer.weight.data)

    layers = {id(m): m for part in kept_parts(module).values() for m in part.modules()
              if isinstance(m, nn.Linear) and id(m.weight) in weights}
    for layer in layers.values():
        layer.register_forward_pre_hook(before)
        layer.register_forward_hook(after)


# ----------------------------------------------------------------------------------------------- ONNX pass


def store_quantized(model: Any, module: Any, quantized: QuantizedWeights, sequence: int | None = None) -> Any:
    """Replace each quantized weight of the exported graph by its integers and scales feeding one DequantizeLinear
    (``graph.quantized.StoreQuantized``: joined where their MatMuls read the same activations). Returns the invariant's
    accounting (``quantized_weights_once``; ``sequence``: a fixed sequence, which bounds the graph's other tensors)."""
    params = {name: p for name, (_, p) in checkpoint_parameters(module).items()}  # the graph's names (graph.names)
    arrays = {key: QuantizedArrays(w.bits, w.values.numpy(), w.scales.numpy()) for key, w in quantized.weights.items()}
    StoreQuantized({name: arrays[id(p)] for name, p in params.items() if id(p) in arrays})(model)
    return quantized_weights_once(model, module, quantized, sequence)


# ----------------------------------------------------------------------------------------------- the invariant


def _sources(name: str, params: dict[str, Any]) -> list[str] | None:
    """The parameters a quantized initializer holds (its name joins theirs), or None for any other initializer."""
    for suffix in (QUANTIZED_SUFFIX, SCALE_SUFFIX):
        if name.endswith(suffix):
            parts = name.removesuffix(suffix).split("+")
            if all(p in params for p in parts):
                return parts
    return None


def expected_bytes(module: Any, quantized: QuantizedWeights) -> int:
    """The plan's kept weights at their quantized size, from the parameters' shapes alone."""
    q, total, seen = quantized.quantization, 0, set()
    for _, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += sum(q.sizes(*p.shape, p.element_size())) if id(p) in quantized.weights else p.numel() * p.element_size()
    return total


def quantized_weights_once(model: Any, module: Any, quantized: QuantizedWeights, sequence: int | None = None) -> Any:
    """The weight invariant (``graph.weights.check``) with quantized bytes: every kept parameter is stored exactly
    once (plain, or inside one integer and one scale initializer), the weights' bytes are the plan's kept weights at
    their quantized size (within 1 %: int4 pairs packed across joined weights), and everything else stored is within
    the bound for ``sequence`` and copies no weight. A violation is a bug of this tool (InvariantError)."""
    named = checkpoint_parameters(module)  # the graph's names (graph.names)
    keys, params = {n: stored for n, (stored, _) in named.items()}, {n: p for n, (_, p) in named.items()}
    holders = {}
    for name in model.graph.initializers:
        sources = [name] if name in params else _sources(name, params)
        if sources is not None:
            kind = SCALE_SUFFIX if name.endswith(SCALE_SUFFIX) and name not in params else ""
            holders[name] = tuple(keys[source] + kind for source in sources)
    required = {keys[n] + kind for n, p in params.items()
                for kind in (("", SCALE_SUFFIX) if id(p) in quantized.weights else ("",))}
    expected = weights_invariant.Expected(holders, frozenset(required), expected_bytes(module, quantized), BYTES_SLACK,
                                          sequence)
    result = weights_invariant.check(model, expected)
    if not result:
        raise InvariantError(f"quantized ONNX breaks {result.message()}")
    return result.stored


# ----------------------------------------------------------------------------------------------- accounting


def _role(name: str) -> str:
    """A parameter's name with its sub-block or block index replaced by '*': one row per kind of weight."""
    import re

    return re.sub(r"\.\d+\.", ".*.", name, count=1)


def accounting(q: Quantization, entries: Iterable[tuple[str, tuple[int, ...], int, bool]]) -> dict[str, Any]:
    """What was quantized and what was not, with bytes, by role. ``entries``: (name, shape, itemsize, quantized)
    for every kept parameter once."""
    out: dict[str, Any] = {"scheme": q.scheme, "block": q.block, "opset": OPSET,
                           "quantized": {"count": 0, "bytes_before": 0, "bytes": 0, "roles": {}},
                           "not_quantized": {"count": 0, "bytes": 0, "roles": {}}}
    for name, shape, itemsize, is_quantized in entries:
        before = int(np.prod(shape)) * itemsize
        after = sum(q.sizes(*shape, itemsize)) if is_quantized else before
        side = out["quantized" if is_quantized else "not_quantized"]
        row = side["roles"].setdefault(_role(name), {"count": 0, "bytes": 0} | ({"bytes_before": 0} if is_quantized else {}))
        for d in (side, row):
            d["count"] += 1
            d["bytes"] += after
            if is_quantized:
                d["bytes_before"] += before
    out["total_bytes"] = out["quantized"]["bytes"] + out["not_quantized"]["bytes"]
    return out


def module_accounting(module: Any, quantized: QuantizedWeights) -> dict[str, Any]:
    """``accounting`` of an applied (and quantized) plan, by the checkpoint's names (as ``plan_accounting``)."""
    seen: set[int] = set()
    entries = []
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            entries.append((module.checkpoint_name(name), tuple(p.shape), p.element_size(), id(p) in quantized.weights))
    return accounting(quantized.quantization, entries)


def plan_accounting(enc: Any, plan: Any, q: Quantization) -> dict[str, Any]:
    """``accounting`` from the model's structure alone (a meta-device ``model.Encoder``): ``inspect --quantize``."""
    from .model import target_dtype

    kept = {str(i): enc.sub_blocks[i] for i in sorted(set(plan.kept))}
    targets = dict(quantizable(kept, (enc.stem, enc.head)))
    check_blocks(q, targets.items())
    quantized = {id(p) for p in targets.values()}
    parts = [enc.stem, enc.head, *kept.values()]
    kept_ids = {id(p) for part in parts for p in part.parameters()}
    entries = [(name, tuple(p.shape), torch.empty((), dtype=target_dtype(enc, name)).element_size(), id(p) in quantized)
               for name, p in enc.model.named_parameters() if id(p) in kept_ids]
    return accounting(q, entries)


def render(a: dict[str, Any]) -> list[str]:
    """report.md / inspect lines: the two sides and their roles."""
    qd, nq = a["quantized"], a["not_quantized"]
    lines = [f"weight-only {a['scheme']}" + (f", block {a['block']}" if a["block"] else ", per output channel")
             + f" (opset {a['opset']}): {size(a['total_bytes'])} of weights",
             f"  quantized: {qd['count']} weights, {size(qd['bytes_before'])} -> {size(qd['bytes'])} (integers + scales)"]
    lines += [f"    {role}: {r['count']} x, {size(r['bytes_before'])} -> {size(r['bytes'])}" for role, r in qd["roles"].items()]
    lines.append(f"  kept in the export's precision: {nq['count']} tensors, {size(nq['bytes'])}")
    lines += [f"    {role}: {r['count']} x, {size(r['bytes'])}" for role, r in nq["roles"].items()]
    return lines
