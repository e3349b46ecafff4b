"""report.json (everything measured, machine-readable) and report.md (the same, for a person)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .compare import INFORMATION_ONLY, STATISTICS, Tolerance, deciding
from .inspect_plan import quantization_name
from .units import size, size_exact

def write_report(folder: Path, report: dict[str, Any]) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    (folder / "report.md").write_text(render_markdown(report))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def headline(r: dict[str, Any]) -> str:
    """What was made: the family, the precision and the quantization (``t5, bf16, int4 weight-only (block 32)``)."""
    q = r.get("quantization")
    scheme = f", {quantization_name(q)}" if q else ""
    recipe = ((r.get("provenance") or {}).get("recipe") or {}).get("name")
    return f"{r['model']['family']}, {r['precision']}{scheme}" + (f"; recipe {recipe}" if recipe else "")


def weights_line(r: dict[str, Any]) -> str:
    """The ONNX's weight bytes against what the plan says they should be: the quantized plan for a quantized export
    (the unquantized figure shown as such), else the plan's unique parameters (each stored once)."""
    onnx, q = r["onnx"], r.get("quantization")
    stored = f"`{onnx['path']}`: {onnx['weights']['count']} weights, {size(onnx['weights']['bytes'])}"
    if q:
        return (f"{stored} ({q['scheme']} weight-only; the quantized plan: {size(q['total_bytes'])}; unquantized in "
                f"{r['precision']} the kept parameters would be {size(onnx['unique_parameter_bytes'])})")
    return f"{stored} (each parameter once: the plan's unique parameters {size(onnx['unique_parameter_bytes'])})"


def _pipeline_lines(pipeline: dict[str, Any] | None, inputs: list[str]) -> list[str]:
    """The inputs, which positions parity and the distance scored, and the breaking-change note without the mask."""
    if pipeline is None:  # reports of earlier versions
        return []
    call = pipeline.get("call") or {}
    named = f" as the {call['name']} pipeline calls it" if call.get("name") else ""
    line = f"- Inputs: {', '.join(f'`{i}`' for i in inputs)}{named}; parity and distance scored over {pipeline['scored']}"
    return [line] + ([f"- **Inputs changed**: {pipeline['note']}"] if pipeline.get("note") else [])


def render_markdown(r: dict[str, Any]) -> str:
    plan, cost, onnx = r["plan"], r["cost"], r["onnx"]
    lines = [
        f"# skrr-export report: {headline(r)}",
        "",
        f"- Model: `{r['model']['path']}`{' (random weights)' if r['model']['random_weights'] else ''}",
        f"- Plan: {plan['skipped']} of {cost['num_slots']} sub-blocks skipped, {plan['reused']} re-used; "
        f"sha256 `{plan['sha256'][:16]}`",
        f"- Sparsity (paper's definition): **{cost['sparsity'] * 100:.2f} %** "
        f"({cost['kept_params']:,} of {cost['total_params']:,} parameters kept)",
        f"- Executed sub-blocks: {cost['executed_slots']} of {cost['num_slots']} "
        f"(compute fraction {cost['compute_fraction']:.3f})",
        f"- ONNX {weights_line(r)}; {onnx['constants']['count']} other constants, {size(onnx['constants']['bytes'])}",
        *_pipeline_lines(r.get("pipeline"), onnx["inputs"]),
        *([f"- **ONNX Runtime only** (--optimize ort): {onnx['ort_fusion']['fused_attention']} attention slots fused into "
           f"MultiHeadAttention; {onnx['ort_fusion']['runtime']}"] if onnx.get("ort_fusion") else []),
        "",
        "## Parity",
        "",
    ]
    lines += _parity_lines(r["parity"])
    lines += [f"- Policy check: {c['method']} ({c['precision']}): {'PASSED' if c['passed'] else 'FAILED'}."
              for c in r.get("checks", []) if c["check"] == "policy"] + [""]
    lines += _polygraphy_lines(r.get("polygraphy"))
    if r.get("quantization"):
        from .quantize import render as render_quantization

        lines += ["## Weight-only quantization", "", "```text", *render_quantization(r["quantization"]), "```", ""]
    lines += _distance_lines(r.get("distance_to_dense"))
    if r.get("measure"):
        from .measure_report import render as render_measure

        lines += [render_measure(r["measure"], level=2)]
    if r.get("engine"):
        lines += render_engine(r["engine"])
    lines += _provenance_lines(r.get("provenance"), r["tool"])
    lines += ["## Stages", ""] + [f"- {k}: {v:.1f} s" for k, v in r["seconds"].items()]
    if r.get("peak_memory_bytes") is not None:
        lines.append(f"- peak memory: {size(r['peak_memory_bytes'])} (resident, this process, up to the report)")
    lines += [""]
    return "\n".join(lines)


def _provenance_lines(p: dict[str, Any] | None, tool: dict[str, Any]) -> list[str]:
    """Where the report came from: the command, the tool, the recipe, the settings after merging recipe and flags."""
    if not p:
        return []
    recipe = p.get("recipe")
    s = dict(p["settings"])
    tolerances = s.pop("tolerances", {})
    if s.get("engine") == "onnx":  # builder settings of an engine that was not built
        for key in ("engine_options", "weight_streaming_budget"):
            s.pop(key, None)
    libraries = ", ".join(f"{k} {v}" for k, v in tool.items() if k not in ("name", "skrr-export"))
    return ["## Provenance", "",
            f"- Command: `{p['command']['line']}` (in `{p['command']['cwd']}`)",
            f"- Tool: skrr-export {tool.get('skrr-export')} ({libraries})",
            f"- Recipe: {recipe['name']} (`{recipe['path']}`, sha256 `{recipe['sha256']}`)" if recipe
            else "- Recipe: none (a plan file and flags)",
            "- Settings (recipe, then flags): " + ", ".join(_setting(k, v) for k, v in s.items() if v not in (None, {}, [])),
            "- Tolerances: " + "; ".join(f"`{k}` " + ", ".join(f"{n} {v:g}" for n, v in t.items() if v is not None)
                                         for k, t in tolerances.items()),
            "- Rerun into a new folder: `skrr-export --from-manifest THIS_FOLDER --out NEW`", ""]


def _setting(key: str, value: Any) -> str:
    """One setting as text; a nested one (the engine options) as its set fields, a shape range as min/opt/max."""
    if isinstance(value, dict) and set(value) == {"min", "opt", "max"}:
        return f"{key} {value['min']}/{value['opt']}/{value['max']} (min/opt/max)"
    if isinstance(value, dict):
        return ", ".join(_setting(f"{key}.{k}", v) for k, v in value.items() if v not in (None, False, (), [], {}))
    return f"{key} {value}"


def _parity_lines(parity: list[dict[str, Any]]) -> list[str]:
    """One table per check: the statistics that decide pass/fail against their tolerance, then, apart, the ones
    that are shown for information only (``compare.deciding``), and once why those do not decide."""
    lines = [f"Only the statistics a check's tolerance bounds decide pass/fail (NaN/Inf always fails); the others are "
             f"information: {INFORMATION_ONLY}.", ""] if parity else []
    for check in parity:
        if "outputs" not in check:
            lines += [f"- {check['test']} vs {check['reference']}: **not executed**: {check['reason']}", ""]
            continue
        verdict = "PASSED" if check["passed"] else "FAILED"
        lines += [
            f"### {_check_name(check)}{check['test']} vs {check['reference']} ({check['batch']}): {verdict}",
            "",
            *([f"Method: {check['method']}; tolerance `{check['tolerance_key']}`.", ""] if check.get("method") else []),
        ]
        lines += _statistics_tables(check["outputs"])
        lines += [f"- {line}" for line in _failures(check)] + ([""] if not check["passed"] else [])
    return lines


def _statistics_tables(outputs: list[dict[str, Any]]) -> list[str]:
    """Decides pass/fail: the statistics the tolerance bounds. Information only: the rest, with why."""
    decide = deciding(Tolerance(**outputs[0]["tolerance"]))
    inform = [s for s in STATISTICS if s not in decide]
    lines = ["Decides pass/fail:", "", "| output | " + " | ".join(STATISTICS[s] for s in decide) + " | tolerance | pass |",
             "|---" * (len(decide) + 3) + "|"]
    lines += [f"| {o['name']} | " + " | ".join(_fmt(o[s]) for s in decide) + f" | {_tolerance(o['tolerance'])} | "
              f"{'yes' if o['passed'] else 'NO'} |" for o in outputs]
    lines += ["", "Information only (not tested):", "",
              "| output | " + " | ".join(STATISTICS[s] for s in inform) + " |", "|---" * (len(inform) + 1) + "|"]
    lines += [f"| {o['name']} | " + " | ".join(_fmt(o[s]) for s in inform) + " |" for o in outputs]
    return lines + [""]


def _check_name(check: dict[str, Any]) -> str:
    return f"{check['check'].capitalize()} check: " if check.get("check") else ""


def _distance_lines(dense: dict[str, Any] | None) -> list[str]:
    """The plan's cost in quality: its outputs against the dense model's."""
    if not dense:
        return []
    lines = ["## What the plan costs (PyTorch, plan vs dense model)", "",
             "| batch | output | MSE | mean cos | min cos | dense norm | plan norm |", "|---|---|---|---|---|---|---|"]
    for batch, outputs in dense.items():
        for name, d in outputs.items():
            lines.append(f"| {batch} | {name} | {_fmt(d['mse'])} | {_fmt(d['mean_cosine'])} | {_fmt(d['min_cosine'])} | "
                         f"{_fmt(d['dense_norm'])} | {_fmt(d['pruned_norm'])} |")
    return lines + [""]


def _tolerance(t: dict[str, Any]) -> str:
    parts = [f"cos >= {t['min_cosine']:g}"]
    if t.get("max_token_error") is not None:
        parts.append(f"token error <= {t['max_token_error']:g}")
    if t.get("atol") is not None:
        parts.append(f"atol {t['atol']:g} + rtol {t['rtol']:g}")
    return ", ".join(parts)


def _failures(check: dict[str, Any]) -> list[str]:
    """For every failing output, what failed and the tolerance that would have passed (the comparator's words)."""
    from .compare import OutputStats

    lines = []
    for o in check["outputs"]:
        if not o["passed"]:
            fields = {k: v for k, v in o.items() if k != "passed"}
            lines.append(OutputStats(**fields | {"tolerance": Tolerance(**o["tolerance"])}).failure())
    return lines


def _bytes(n: int | None) -> str:
    return "not reported" if n is None else size_exact(n)


def _polygraphy_lines(p: dict[str, Any] | None) -> list[str]:
    """Where the parity data for Polygraphy is, and the command that re-checks the export with it."""
    if not p:
        return []
    if not p["written"]:
        return [f"Polygraphy parity data: not written ({p['reason']}).", ""]
    return [f"Polygraphy parity data: `{p['inputs']}` and PyTorch's outputs `{p['reference']}` "
            f"({', '.join(p['iterations'])}); re-check: `{p['command']}`", ""]


def render_engine(e: dict[str, Any]) -> list[str]:
    """engine.json as tables: what built it, the weight accounting, the profile, the tensors, the options set."""
    w = e.get("weights", {})
    rows = [
        ("built by", f"{e.get('module')} {e.get('version')} ({e.get('backend')}) in {e.get('build_seconds')} s"),
        ("engine file", _bytes(e.get("serialized_bytes"))),
        ("engine weights", f"{_bytes(w.get('total_bytes'))}; source: {w.get('source')}"),
        ("ONNX weights", f"{_bytes(e.get('onnx_weight_bytes'))}; 256-byte aligned {_bytes(e.get('onnx_weight_bytes_aligned'))}"),
        ("activations", _bytes(w.get("activation_bytes", w.get("activation_bytes_builder")))),
        ("engine sha256", f"`{str(e.get('engine_sha256'))[:16]}`"),
    ]
    if "streamable_bytes" in w:
        rows.append(("streamable weights", _bytes(w["streamable_bytes"])))
    lines = ["## Engine", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    lines += ["| tensor | io | dtype | shape | profile min / opt / max |", "|---|---|---|---|---|"]
    profile = (e.get("profiles") or [{}])[0]
    for io in ("inputs", "outputs"):
        for t in e.get(io, []):
            ranges = " / ".join("x".join(map(str, s)) for s in profile.get(t["name"], []))
            lines.append(f"| {t['name']} | {io[:-1]} | {t['dtype']} | {'x'.join(map(str, t['shape']))} | {ranges} |")
    options = {k: v for k, v in e.get("options", {}).items() if v not in (None, False, (), []) and k not in ("batch", "sequence")}
    lines += ["", "Options set: " + (", ".join(f"{k}={v}" for k, v in options.items()) or "none beyond the profile"), ""]
    return lines
