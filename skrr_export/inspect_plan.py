"""``skrr-export inspect``: what a plan keeps, skips, re-uses and costs, from the model's config alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx_ir as ir

from .errors import AccuracyError, ArtifactError
from .graph import weights
from .graph.read import read_model
from .plan import Plan, kind_of
from .units import size

PRECISIONS = {ir.DataType.FLOAT: "fp32", ir.DataType.FLOAT16: "fp16", ir.DataType.BFLOAT16: "bf16"}
QUANTIZED_DTYPES = {"int8", "int4"}
SCHEMES = {ir.DataType.INT8: "int8", ir.DataType.INT4: "int4"}


def inspect_plan(plan: Plan, model: Path, subfolder: str | None, precision: str,
                 shape: tuple[int, int] | None = None, quantization: Any = None) -> dict[str, Any]:
    """Counted from the config alone (``counts``; no torch): ``shape`` (batch, sequence) for the FLOP count, default
    batch 1 and 256 tokens (or the model's maximum). ``quantization`` (``quantize.Quantization``, which needs torch):
    also the kept bytes with the sub-blocks' linear weights quantized."""
    from .counts import inspect_shape, plan_cost, read_config

    config = read_config(model, subfolder)
    batch, seq = inspect_shape(config, shape)
    cost = plan_cost(config, plan, precision, batch, seq)
    plan.check_sparsity(cost.sparsity)
    info = {
        "family": plan.family,
        "num_blocks": plan.num_blocks,
        "precision": precision,
        "slots": _slots(plan),
        "total_params": cost.total_params,
        "kept_params": cost.kept_params,
        "sparsity": cost.sparsity,
        "bytes_before": cost.total_bytes,
        "bytes_after": cost.kept_bytes,
        "executed_slots": cost.executed_slots,
        "num_slots": cost.num_slots,
        "compute_fraction": cost.compute_fraction,
        "flops": {"batch": batch, "seq": seq, "dense": cost.dense_flops, "plan": cost.flops,
                  "fraction": cost.flops / cost.dense_flops},
    }
    if quantization is not None:
        info["quantization"] = _quantized(plan, model, subfolder, precision, quantization)
    return info


def _quantized(plan: Plan, model: Path, subfolder: str | None, precision: str, quantization: Any) -> dict[str, Any]:
    """``quantize.plan_accounting`` on the model built on the meta device (torch and transformers' modeling)."""
    from .model import DTYPES, ModelSource, build_meta, load_config
    from .quantize import plan_accounting

    enc = build_meta(load_config(ModelSource(model, subfolder)))
    enc.dtype = DTYPES[precision]
    return plan_accounting(enc, plan, quantization)


def _slots(plan: Plan) -> list[dict[str, Any]]:
    out = []
    for slot in range(plan.num_slots):
        src = plan.source(slot)
        state = "kept" if src == slot else "skipped" if src is None else f"re-uses {src}"
        out.append({"slot": slot, "block": slot // 2, "kind": kind_of(slot), "state": state})
    return out


def render(info: dict[str, Any]) -> str:
    gb = size
    lines = [f"{info['family']} encoder, {info['num_blocks']} blocks ({info['num_slots']} sub-blocks), {info['precision']}"
             f"{_scheme(info.get('quantization'))}"]
    for s in info["slots"]:
        if s["state"] != "kept":
            lines.append(f"  slot {s['slot']:>3} (block {s['block']:>2} {s['kind']:<9}) {s['state']}")
    kept = sum(1 for s in info["slots"] if s["state"] == "kept")
    lines.append(f"  {kept} sub-blocks kept, {info['num_slots'] - kept} skipped (re-used ones listed above)")
    lines.append(f"parameters: {info['total_params']:,} -> {info['kept_params']:,}")
    for dtype, before in info["bytes_before"].items():
        lines.append(f"bytes {dtype}: {gb(before)} -> {gb(info['bytes_after'].get(dtype, 0))}")
    lines.append(f"sparsity: {info['sparsity'] * 100:.2f} %")
    lines.append(
        f"executed sub-blocks: {info['executed_slots']} of {info['num_slots']} "
        f"(compute fraction {info['compute_fraction']:.3f})"
    )
    f = info["flops"]
    where = {"the recipe": ", the recipe's fixed sequence and opt batch", "--shape": ", --shape"}.get(f.get("shape_from"), "")
    lines.append(f"executed FLOPs at {f['batch']}x{f['seq']}{where}: {f['plan'] / 1e12:.4g} of {f['dense'] / 1e12:.4g} "
                 f"TFLOP (fraction {f['fraction']:.3f}; matmuls and attention, as torch counts them)")
    if "quantization" in info:
        from .quantize import render as render_quantization

        lines += render_quantization(info["quantization"])
    return "\n".join(lines)


def inspect_onnx(path: Path) -> dict[str, Any]:
    """Initializer bytes of an exported model by dtype, and its precision (the dtype of its first floating
    output), read from the file (external data not loaded)."""
    model = read_model(path)
    by_dtype: dict[str, int] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            by_dtype[tensor.dtype.name.lower()] = by_dtype.get(tensor.dtype.name.lower(), 0) + int(tensor.nbytes)
    return {"onnx": str(path), "precision": _precision(model, path), "quantization": _quantization(model),
            "initializers": len(model.graph.initializers), "bytes": by_dtype, "total_bytes": sum(by_dtype.values())}


def _quantization(model: ir.Model) -> dict[str, Any] | None:
    """The weight-only quantization the file stores (``quantize.store_quantized``'s form): int8 or int4 integers into
    DequantizeLinear, block-wise where it has a block_size; None: not quantized."""
    for node in model.graph:
        if node.op_type == "DequantizeLinear" and node.inputs[0] is not None and node.inputs[0].dtype in SCHEMES:
            block = node.attributes.get("block_size")
            return {"scheme": SCHEMES[node.inputs[0].dtype], "block": block.as_int() if block is not None and block.as_int() else None}
    return None


def quantization_name(q: dict[str, Any]) -> str:
    """``int4 weight-only (block 32)``, ``int8 weight-only (per output channel)``: how reports and inspect name it."""
    return f"{q['scheme']} weight-only " + (f"(block {q['block']})" if q.get("block") else "(per output channel)")


def _scheme(q: dict[str, Any] | None) -> str:
    return f", {quantization_name(q)}" if q else ""


def _precision(model: ir.Model, path: Path) -> str:
    """fp32, fp16 or bf16: the dtype of the model's first floating-point output (what the export ran in)."""
    for value in model.graph.outputs:
        if value.dtype in PRECISIONS:
            return PRECISIONS[value.dtype]
    raise ArtifactError(f"{path} has no floating-point output to read a precision from")


def render_onnx(e: dict[str, Any]) -> str:
    made = f"{e['precision']}{_scheme(e.get('quantization'))}"
    lines = [f"{e['onnx']}: {made}, {e['initializers']} initializers, "
             + ", ".join(f"{k} {size(v)}" for k, v in e["bytes"].items())]
    if "agrees" in e:
        d = e["difference"]
        difference = f"{'+' if d >= 0 else '-'}{size(abs(d))}, {d:+,} bytes" if abs(d) >= 1024 else f"{d:+,} bytes"
        lines.append(f"agrees with the plan in {made}: {'yes' if e['agrees'] else 'NO'} "
                     f"({size(e['onnx_initializer_bytes'])} stored, {size(e['plan_kept_bytes'])} planned: {difference})")
        if not e["agrees"] and QUANTIZED_DTYPES & set(e["bytes"]):
            lines.append("  the ONNX holds int8/int4 weights: pass its --quantize (and --quant-block) to compare")
    if "weights_once" in e:
        check = e["weights_once"]
        lines.append("weights once: " + ("passed" if check["passed"] else "FAILED") + f" ({check['weights']['count']} "
                     f"weights, {check['constants']['count']} other tensors of {size(check['constants']['bytes'])})")
        lines += [f"  {v}" for v in check["violations"]]
    return "\n".join(lines)


def agreement(plan_info: dict[str, Any], onnx_info: dict[str, Any]) -> dict[str, Any]:
    """Does the exported model hold exactly the plan's kept weights, each once, and nothing else beyond small
    constants that copy none of them (``graph.weights.check``, the export's own invariant)? With ``--quantize``: the
    kept weights at their quantized size (within the export's 1 %). A file with int8/int4 weights inspected without
    ``--quantize`` is checked for everything but its weight bytes, and does not agree."""
    quantized = plan_info.get("quantization")
    kept = quantized["total_bytes"] if quantized else sum(plan_info["bytes_after"].values())
    model = read_model(Path(onnx_info["onnx"]))
    unknown = not quantized and bool(QUANTIZED_DTYPES & set(onnx_info["bytes"]))
    slack = _quantized_slack() if quantized else 0.0
    result = weights.check(model, weights.file_expected(model, None if unknown else kept, slack))
    stored = result.stored
    return {"plan_kept_bytes": kept, "onnx_initializer_bytes": onnx_info["total_bytes"],
            "difference": onnx_info["total_bytes"] - kept, "agrees": bool(result) and not unknown,
            "weights_once": {"passed": bool(result), "violations": [str(v) for v in result.violations],
                             "weights": {"count": stored.weight_count, "bytes": stored.weight_bytes},
                             "constants": {"count": stored.constant_count, "bytes": stored.constant_bytes}}}


def check_weights_once(info: dict[str, Any]) -> None:
    """A failed "weights once" check of an inspected file is a failed check (AccuracyError, exit 1): the file may come
    from the user's own optimizer, so it is not a bug of this tool."""
    check = info.get("exported", {}).get("weights_once")
    if check is not None and not check["passed"]:
        more = f" (and {len(check['violations']) - 1} more)" if len(check["violations"]) > 1 else ""
        raise AccuracyError(f"{info['exported']['onnx']}: check \"weights once\" failed: {check['violations'][0]}{more}")


def _quantized_slack() -> float:
    from .quantize import BYTES_SLACK  # torch, as --quantize needs anyway

    return BYTES_SLACK
