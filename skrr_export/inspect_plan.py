"""``skrr-export inspect``: what a plan keeps, skips, re-uses and costs, from the model's config alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .plan import Plan, kind_of


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
    def gb(n: int) -> str:
        return f"{n / 1e9:.3f} GB"

    lines = [f"{info['family']} encoder, {info['num_blocks']} blocks ({info['num_slots']} sub-blocks), {info['precision']}"]
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
    lines.append(f"executed FLOPs at {f['batch']}x{f['seq']}: {f['plan'] / 1e12:.4g} of {f['dense'] / 1e12:.4g} TFLOP "
                 f"(fraction {f['fraction']:.3f}; matmuls and attention, as torch counts them)")
    if "quantization" in info:
        from .quantize import render as render_quantization

        lines += render_quantization(info["quantization"])
    return "\n".join(lines)


def inspect_onnx(path: Path) -> dict[str, Any]:
    """Initializer bytes of an exported model by dtype, and its precision (the dtype of its first floating
    output), read from the file (external data not loaded)."""
    import onnx

    from .artifacts import onnx_initializer_sizes
    from .serving import onnx_precision, read_onnx

    model = read_onnx(path)
    by_dtype: dict[str, int] = {}
    for init, size in zip(model.graph.initializer, onnx_initializer_sizes(path)):
        name = onnx.TensorProto.DataType.Name(init.data_type).lower()
        by_dtype[name] = by_dtype.get(name, 0) + size
    return {"onnx": str(path), "precision": onnx_precision(model), "initializers": len(model.graph.initializer),
            "bytes": by_dtype, "total_bytes": sum(by_dtype.values())}


def render_onnx(e: dict[str, Any]) -> str:
    lines = [f"{e['onnx']}: {e['precision']}, {e['initializers']} initializers, "
             + ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in e["bytes"].items())]
    if "agrees" in e:
        lines.append(f"agrees with the plan in {e['precision']}: {'yes' if e['agrees'] else 'NO'} "
                     f"(difference {e['difference']:+,} bytes)")
        if not e["agrees"] and {"int8", "int4"} & set(e["bytes"]):
            lines.append("  the ONNX holds int8/int4 weights: pass its --quantize (and --quant-block) to compare")
    return "\n".join(lines)


def agreement(plan_info: dict[str, Any], onnx_info: dict[str, Any]) -> dict[str, Any]:
    """Does the exported model hold exactly the plan's kept weights (up to small graph constants)? With
    ``--quantize``: the kept weights at their quantized size (within the export's 1 %)."""
    from .artifacts import SMALL_CONSTANT_BYTES

    quantized = plan_info.get("quantization")
    kept = quantized["total_bytes"] if quantized else sum(plan_info["bytes_after"].values())
    diff = onnx_info["total_bytes"] - kept
    slack = SMALL_CONSTANT_BYTES + (_quantized_slack(kept) if quantized else 0)
    return {"plan_kept_bytes": kept, "onnx_initializer_bytes": onnx_info["total_bytes"], "difference": diff,
            "agrees": abs(diff) <= slack}


def _quantized_slack(kept: int) -> float:
    from .quantize import BYTES_SLACK  # torch, as --quantize needs anyway

    return BYTES_SLACK * kept
