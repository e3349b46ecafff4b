"""report.json (everything measured, machine-readable) and report.md (the same, for a person)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(folder: Path, report: dict[str, Any]) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    (folder / "report.md").write_text(render_markdown(report))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def render_markdown(r: dict[str, Any]) -> str:
    plan, cost, onnx = r["plan"], r["cost"], r["onnx"]
    lines = [
        f"# skrr-export report: {r['model']['family']} ({r['precision']})",
        "",
        f"- Model: `{r['model']['path']}`{' (random weights)' if r['model']['random_weights'] else ''}",
        f"- Plan: {plan['skipped']} of {cost['num_slots']} sub-blocks skipped, {plan['reused']} re-used; "
        f"sha256 `{plan['sha256'][:16]}`",
        f"- Sparsity (paper's definition): **{cost['sparsity'] * 100:.2f} %** "
        f"({cost['kept_params']:,} of {cost['total_params']:,} parameters kept)",
        f"- Executed sub-blocks: {cost['executed_slots']} of {cost['num_slots']} "
        f"(compute fraction {cost['compute_fraction']:.3f})",
        f"- ONNX `{onnx['path']}`: initializers {_mib(onnx['initializer_bytes'])}, "
        f"unique parameters {_mib(onnx['unique_parameter_bytes'])}, "
        f"{onnx['duplicate_initializers_removed']} duplicate initializers merged",
        "",
        "## Parity",
        "",
    ]
    for check in r["parity"]:
        if "outputs" not in check:
            lines += [f"- {check['test']} vs {check['reference']}: **not executed**: {check['reason']}", ""]
            continue
        verdict = "PASSED" if check["passed"] else "FAILED"
        lines += [
            f"### {check['test']} vs {check['reference']} ({check['batch']}): {verdict}",
            "",
            "| output | max abs | mean abs | max rel | mean rel | min cos | mean cos | atol / rtol / cos | pass |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for o in check["outputs"]:
            t = o["tolerance"]
            lines.append(
                f"| {o['name']} | {_fmt(o['max_abs'])} | {_fmt(o['mean_abs'])} | {_fmt(o['max_rel'])} | "
                f"{_fmt(o['mean_rel'])} | {_fmt(o['min_cosine'])} | {_fmt(o['mean_cosine'])} | "
                f"{t['atol']:g} / {t['rtol']:g} / {t['min_cosine']:g} | {'yes' if o['passed'] else 'NO'} |"
            )
        lines.append("")
    dense = r.get("distance_to_dense")
    if dense:
        lines += ["## What the plan costs (PyTorch, plan vs dense model)", "", "| batch | output | MSE | mean cos | min cos | dense norm | plan norm |", "|---|---|---|---|---|---|---|"]
        for batch, outputs in dense.items():
            for name, d in outputs.items():
                lines.append(
                    f"| {batch} | {name} | {_fmt(d['mse'])} | {_fmt(d['mean_cosine'])} | {_fmt(d['min_cosine'])} | "
                    f"{_fmt(d['dense_norm'])} | {_fmt(d['pruned_norm'])} |"
                )
        lines.append("")
    if r.get("measure"):
        from .measure import render_markdown as render_measure

        lines += [render_measure(r["measure"], level=2)]
    if r.get("engine"):
        lines += ["## Engine", "", "```json", json.dumps(r["engine"], indent=2), "```", ""]
    lines += ["## Stages", ""] + [f"- {k}: {v:.1f} s" for k, v in r["seconds"].items()] + [""]
    return "\n".join(lines)
