"""measure_report: the measurement's results for a person (results.md, and the section report.md nests) and its memory
chart. ``render`` is what report.py calls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .compare import STATISTICS, Tolerance, deciding
from .config import VARIANTS
from .errors import MissingDependencyError
from .units import SCALE

GIB = SCALE["GiB"]


def row_at(run: dict[str, Any], shape: dict[str, Any]) -> dict[str, Any] | None:
    """``run``'s row at ``shape``'s batch and sequence (None: not measured there)."""
    return next((r for r in run["shapes"] if (r["batch"], r["seq"]) == (shape["batch"], shape["seq"])), None)


def _memory_method_lines(memory: dict[str, str] | None) -> list[str]:
    """What every figure of the table is (results of earlier versions: nothing)."""
    if not memory:
        return []
    return [f"Every backend's resident and peak: **{memory['method']}**, above a baseline taken {memory['baseline']}; "
            f"it includes {memory['includes']}. Allocator column: {memory['allocator']} (PyTorch backends only).", ""]


def write_results(folder: Path, results: dict[str, Any]) -> None:
    """results.json, results.md and memory.png: what ``skrr-export measure`` writes."""
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (folder / "results.md").write_text(render(results))
    plot_memory(results, folder / "memory.png")


def _gb(n: float) -> str:
    """A memory table's cell: GiB (units.py's convention), three decimals, the unit in the table's heading."""
    return f"{n / GIB:.3f}"


def render(r: dict[str, Any], level: int = 1) -> str:
    """The results for a person; ``level`` 2 nests them under a report's heading (report.py calls it so)."""
    tool, h = r["tool"], "#" * level
    lines = [
        f"{h} skrr-export measure: {r['model']['family']} ({r['precision']}) on {tool['device']}",
        "",
        f"- Model `{r['model']['path']}`{' (random weights)' if r['model']['random_weights'] else ''}; plan sha256 "
        f"`{r['plan']['sha256'][:16]}`, sparsity {r['plan']['sparsity'] * 100:.2f} %",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in tool.items() if k not in ("device", "device_memory_bytes")),
        "",
        f"{h}# Memory (GiB, 2^30 bytes)",
        "",
        *_memory_method_lines(r.get("memory")),
        "| backend | variant | unique weights | resident | resident / unique | shape | forward peak | above resident "
        "| allocator resident / peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        for row in run["shapes"]:
            allocator = (f"{_gb(run['allocator_resident_bytes'])} / {_gb(row['allocator_peak_bytes'])}"
                         if row.get("allocator_peak_bytes") is not None else "-")
            lines.append(f"| {run['backend']} | {run['variant']} | {_gb(run['unique_weight_bytes'])} | "
                         f"{_gb(run['resident_bytes'])} | {run['resident_over_unique']:.4f} | {row['batch']}x{row['seq']} | "
                         f"{_gb(row['peak_bytes'])} | {_gb(row['activation_bytes'])} | {allocator} |")
    lines += _latency_lines(r, h) + _parity_lines(r, h)
    if r.get("targets"):
        lines += ["", f"{h}# Targets", "", "| target | value | limit | met |", "|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']:.4g} | {t['limit']:.4g} | {'yes' if t['met'] else 'NO'} |" for t in r["targets"]]
    for run in r["runs"]:
        if run.get("placement"):
            lines += ["", f"ONNX Runtime node placement ({run['backend']}, {run['variant']}): `{json.dumps(run['placement'])}`"]
        if run.get("fusion"):
            f = run["fusion"]
            lines += ["", f"Fused for ONNX Runtime ({run['variant']}; {f['runtime']}): {f['fused_attention']} "
                      f"MultiHeadAttention, {f['unfused_softmax']} Softmax left; weights read from "
                      f"{', '.join(f['storage']['data_files']) or 'the graph file'}: `{json.dumps(f['op_counts'])}`"]
    for err in r["errors"]:
        kept = err.get("shapes_kept", 0)
        lines += ["", f"**{f'Stopped after {kept} shapes' if kept else 'Not measured'}:** {err['backend']} "
                      f"({err['variant']}): {err['error']}"]
    for skip in r.get("skipped", []):
        lines += ["", f"**Skipped:** {skip['shape']} on {skip['backend']} ({skip['variant']}): {skip['reason']}"]
    return "\n".join(lines) + "\n"


def _latency_lines(r: dict[str, Any], h: str) -> list[str]:
    lines = ["", f"{h}# Latency (ms; median / p90)", "", "| backend | shape | dense | plan | plan / dense | "
             "executed-FLOP fraction |", "|---|---|---|---|---|---|"]
    runs = {(x["variant"], x["backend"]): x for x in r["runs"]}
    for s in r["summary"]:
        d, p = (row_at(runs[(v, s["backend"])], s) for v in VARIANTS)
        assert d is not None and p is not None
        lines.append(f"| {s['backend']} | {s['batch']}x{s['seq']} | {d['median_ms']:.2f} / {d['p90_ms']:.2f} | "
                     f"{p['median_ms']:.2f} / {p['p90_ms']:.2f} | {s['latency_ratio']:.3f} | {s['flop_fraction']:.3f} |")
    return lines


def _parity_lines(r: dict[str, Any], h: str) -> list[str]:
    if not r["parity"]:
        return []
    lines = ["", f"{h}# Parity: PyTorch on the device vs each backend", "",
             "Only the statistics the tolerance bounds decide pass/fail (compare.deciding), as in report.md.", "",
             "| backend | variant | batch | output | deciding statistics | passed |", "|---|---|---|---|---|---|"]
    for check in r["parity"]:
        for o in check["outputs"]:
            decide = deciding(Tolerance(**o["tolerance"]))
            stats = ", ".join(f"{STATISTICS[s]} {o[s]:.3g}" for s in decide)
            lines.append(f"| {check['backend']} | {check.get('variant', 'plan')} | {check['batch']} | {o['name']} | "
                         f"{stats} | {'yes' if o['passed'] else 'NO'} |")
    return lines


def plot_memory(r: dict[str, Any], path: Path) -> None:
    """Bars per backend, dense vs plan: resident weights, and the forward peak above them at the largest shape."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("matplotlib", "measure", "the memory chart") from None
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * max(1, len(r["backends"])), 4.2), dpi=120)
    width = 0.38
    for i, variant in enumerate(VARIANTS):
        runs = {x["backend"]: x for x in r["runs"] if x["variant"] == variant}
        xs = [b + (i - 0.5) * width for b in range(len(r["backends"]))]
        resident = [runs[b]["resident_bytes"] / GIB if b in runs else 0 for b in r["backends"]]
        extra = [max(runs[b]["shapes"], key=lambda s: s["peak_bytes"])["activation_bytes"] / GIB if b in runs and runs[b]["shapes"] else 0
                 for b in r["backends"]]
        color = "tab:gray" if variant == "dense" else "tab:blue"
        ax.bar(xs, resident, width, color=color, label=f"{variant}: resident")
        ax.bar(xs, extra, width, bottom=resident, color=color, alpha=0.35, hatch="//", label=f"{variant}: forward peak above it")
        for x, a, b in zip(xs, resident, extra):
            if a:
                ax.text(x, a + b, f"{a + b:.2f}", ha="center", va="bottom", fontsize=8)
    largest = max(r["flops"], key=lambda f: f["batch"] * f["seq"]) if r["flops"] else None
    ax.set_xticks(range(len(r["backends"])), r["backends"])
    ax.set_ylabel("device memory (GiB)")
    title = f"{r['model']['family']} {r['precision']} on {r['tool']['device']}"
    ax.set_title(title + (f", peak at {largest['batch']}x{largest['seq']}" if largest else ""), fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
