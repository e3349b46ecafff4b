"""The acceptance targets of the measurement issues (16, 21, 27), evaluated on what ``skrr-export measure`` (or a
benchmark calling ``measure.run_measurements``) measured: nothing is evaluated for what was not measured.

Not part of the library: the tool reports what it measured; whether that meets an issue's target is the benchmarks'
question (benchmarks/gpu_run.py writes these next to its results).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from skrr_export.measure_report import row_at


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of the measurement issues, evaluated on what was measured (nothing for what was not)."""
    runs = {(r["variant"], r["backend"]): r for r in results["runs"]}
    out: list[dict[str, Any]] = []

    def target(name: str, value: float, limit: float, met: bool) -> None:
        out.append({"target": name, "value": value, "limit": limit, "met": bool(met)})

    _memory_targets(runs, target)
    _latency_targets(runs, {(f["batch"], f["seq"]): f["fraction"] for f in results["flops"]}, target)
    _fused_latency_targets(runs, target)
    _placement_targets(results["runs"], target)
    return out


def _memory_targets(runs: dict[tuple[str, str], Any], target: Callable[..., None]) -> None:
    torch_plan, torch_dense = runs.get(("plan", "torch")), runs.get(("dense", "torch"))
    if torch_plan:
        ratio = torch_plan["resident_over_unique"]
        target("torch: plan resident / unique weight bytes within 1 %", ratio, 1.01, abs(ratio - 1) <= 0.01)
    if torch_plan and torch_dense:
        for d in torch_dense["shapes"]:
            p = row_at(torch_plan, d)
            if p:
                limit = 1.05 * (torch_plan["unique_weight_bytes"] + d["activation_bytes"])
                target(f"torch {d['batch']}x{d['seq']}: plan peak <= 1.05 x (unique + dense activation peak)",
                       p["peak_bytes"], limit, p["peak_bytes"] <= limit)
    for backend in ("ort-cuda", "ort-cuda-fused"):  # our settings; ort-cuda-stock is the comparison, no target
        if ort_plan := runs.get(("plan", backend)):
            ratio = ort_plan["resident_over_unique"]
            target(f"{backend}: plan resident / unique weight bytes <= 1.05", ratio, 1.05, ratio <= 1.05)


def _latency_targets(runs: dict[tuple[str, str], Any], fractions: dict[tuple[int, int], float],
                     target: Callable[..., None]) -> None:
    """Eager: plan / dense latency within 5 % of the executed-FLOP fraction. Compiled: the compiled plan at most
    0.80 x the compiled dense model. ONNX Runtime CUDA: the plan no slower than PyTorch eager."""
    pairs = [("torch", "torch"), ("torch-compile", "torch-compile"), ("ort-cuda", "torch")]
    for backend, against in pairs:
        plan, base = runs.get(("plan", backend)), runs.get(("plan" if backend == "ort-cuda" else "dense", against))
        if plan is None or base is None:
            continue
        for row in plan["shapes"]:
            other, shape = row_at(base, row), f"{row['batch']}x{row['seq']}"
            if other is None:
                continue
            ratio = row["median_ms"] / other["median_ms"]
            if backend == "torch":
                fraction = fractions[(row["batch"], row["seq"])]
                target(f"torch {shape}: plan / dense latency within 5 % of the executed-FLOP fraction "
                       f"({fraction:.3f})", ratio, 1.05 * fraction, abs(ratio / fraction - 1) <= 0.05)
            elif backend == "torch-compile":
                target(f"torch-compile {shape}: compiled plan / compiled dense latency <= 0.80", ratio, 0.80, ratio <= 0.80)
            else:
                target(f"ort-cuda {shape}: plan latency <= torch eager's (ms)", row["median_ms"], other["median_ms"],
                       row["median_ms"] <= other["median_ms"])


def _fused_latency_targets(runs: dict[tuple[str, str], Any], target: Callable[..., None]) -> None:
    """The fused plan on ONNX Runtime CUDA no slower than the dense model under torch.compile, shape by shape."""
    fused, compiled = runs.get(("plan", "ort-cuda-fused")), runs.get(("dense", "torch-compile"))
    if fused is None or compiled is None:
        return
    for row in fused["shapes"]:
        if other := row_at(compiled, row):
            target(f"ort-cuda-fused {row['batch']}x{row['seq']}: fused plan latency <= dense torch.compile's (ms)",
                   row["median_ms"], other["median_ms"], row["median_ms"] <= other["median_ms"])


def _placement_targets(runs: list[dict[str, Any]], target: Callable[..., None]) -> None:
    """No node off the CUDA provider and no host-device copy on the hot path (``hot_path``), per ONNX Runtime run."""
    for run in runs:
        hot = run.get("placement", {}).get("hot_path")
        if hot is not None:
            nodes = sum(e["nodes"] for e in hot)
            target(f"{run['backend']} ({run['variant']}): nodes off CUDA or memcpy on the hot path", nodes, 0, not nodes)
