"""CUDA, part 2, in one run: the exported ONNX on ONNX Runtime CUDA (stock settings, ours, fused) against torch.compile.

On the GPU machine, once the onnxruntime-gpu wheel's parts are there (benchmarks/README.md, "CUDA part 2"):
    bash benchmarks/gpu_part2.sh                      # writes everything to $OUT
Rehearsal on a CPU machine (the same steps on tiny configs of the same depth, ONNX Runtime's CPU provider, every
memory figure 0):
    python benchmarks/gpu_part2.py --rehearse --out /tmp/part2

T5-v1.1-XXL (real config, random weights), dense and the PixArt-Sigma 41.9 % plan, at 1x256, 1x512 and 4x512. Steps,
most important first, each skipped (and recorded as skipped) when less of the budget is left than it needs:
1. plan-fp16: the plan in PyTorch eager (also the parity reference), exported once, on ONNX Runtime CUDA with its stock
   settings (ort-cuda-stock), with ours (ort-cuda) and fused (ort-cuda-fused: ``--optimize ort``, a copy of the graph
   file reading the export's weights);
2. dense-compile-fp16: the dense model in PyTorch eager and under torch.compile (checked against eager);
3. dense-ort-fp16: the dense export on the same three ONNX Runtime variants;
4-6. the same three in bf16.
Every cell is checked against PyTorch on the device (TF32 off); ONNX Runtime runs record device bytes after session
creation and at each shape's peak, and the nodes its profile saw off the CUDA provider and the memcpy nodes. The
issue's targets come out met, missed or not measured. part2.json is written after every step (a run cut short keeps
what it measured), then part2.md and a memory chart per precision (gpu_part2.sh adds log.txt and nvidia-smi.csv:
at most 8 files in --out, what comes back from a device call).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_part1 import ABSENT_ON_DEVICE, ROOT, Budget, _free_device, _unstated, environment, merge, tiny_copy  # noqa: E402

log = logging.getLogger("gpu_part2")

MODEL, PLAN = ROOT / "recipes/t5-v1_1-xxl", ROOT / "recipes/pixart-sigma-41.9/plan.json"
SHAPES, REHEARSAL_SHAPES = ((1, 256), (1, 512), (4, 512)), ((1, 16), (1, 32), (2, 32))
ORT = ("ort-cuda-stock", "ort-cuda", "ort-cuda-fused")
# Dense T5-v1.1-XXL fp16 on the H100, November 2026 (issue 16): a plain export on ONNX Runtime CUDA, and torch.compile.
ANCHORS_MS = {"ort-cuda, plain export (dense)": {"1x256": 61.9, "1x512": 118.0, "4x512": 774.0},
              "torch-compile (dense)": {"1x256": 13.4, "1x512": 14.8, "4x512": 53.5}}
DENSE_OVER_PLAN_BYTES = 1.72  # T5-v1.1-XXL: 9.53 GB of weights dense, 5.53 GB for the PixArt plan


@dataclass(frozen=True)
class Step:
    """One run_measurements call: one variant, one precision, some backends. ``seconds``: what it needs at least on
    the H100/H200 (an estimate: random weights made on the CPU, the export written to disk, sessions loading it);
    once the step ``like`` has run, its measured time x ``scale`` replaces the estimate."""

    variant: str
    precision: str
    backends: tuple[str, ...]
    seconds: float
    like: str | None = None
    scale: float = 1.0


STEPS = {
    "plan-fp16": Step("plan", "fp16", ("torch", *ORT), 150),
    "dense-compile-fp16": Step("dense", "fp16", ("torch", "torch-compile"), 120),
    "dense-ort-fp16": Step("dense", "fp16", ORT, 230, "plan-fp16", DENSE_OVER_PLAN_BYTES),
    "plan-bf16": Step("plan", "bf16", ("torch", *ORT), 150, "plan-fp16"),
    "dense-compile-bf16": Step("dense", "bf16", ("torch", "torch-compile"), 120, "dense-compile-fp16"),
    "dense-ort-bf16": Step("dense", "bf16", ORT, 230, "dense-ort-fp16"),
}


def needs(name: str, record: dict[str, Any]) -> float:
    """The step's estimate, or the time its ``like`` step took when that one ran through."""
    step, measured = STEPS[name], record["step_seconds"]
    ran = step.like in measured and step.like not in record["failed"]
    return measured[step.like] * step.scale if ran else step.seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/part2")))
    p.add_argument("--rehearse", action="store_true", help="CPU, tiny configs of the same depth, memory figures 0")
    p.add_argument("--budget", type=float, help="seconds for every step together (default 320; rehearsal 3600)")
    p.add_argument("--iterations", type=int, default=10, help="timed runs per shape (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per shape first (default 3)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    args = p.parse_args()
    steps = [s for s in args.steps.split(",") if s]
    if unknown := set(steps) - set(STEPS):
        p.error(f"--steps: unknown {', '.join(sorted(unknown))}; choose from {', '.join(STEPS)}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for name in ("gpu_part2", "gpu_part1", "skrr_export"):  # not onnx_ir's or ONNX Runtime's optimizer's chatter
        logging.getLogger(name).setLevel(logging.INFO)
    if args.rehearse:  # import what the GPU machine can import, nothing more
        sys.modules.update(dict.fromkeys(ABSENT_ON_DEVICE))
    args.budget = args.budget or (3600.0 if args.rehearse else 320.0)
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget)
    record = head(args, steps)
    with tempfile.TemporaryDirectory() as tmp, _device_or_rehearsal(args.rehearse):
        model, plan = inputs(args.rehearse, Path(tmp) / "configs")
        for name in steps:
            if budget.allows(name, needs(name, record), record["skipped"]):
                run_step(name, model, plan, record, args, Path(tmp) / "work")
                write(record, args.out, charts=False)
    record["seconds"] = round(args.budget - budget.left(), 1)
    write(record, args.out, charts=True)
    print((args.out / "part2.md").read_text())
    return 0


def head(args: argparse.Namespace, steps: list[str]) -> dict[str, Any]:
    """What the run is: device, versions, the ONNX Runtime it loaded (and how), settings; results fill in."""
    shapes = REHEARSAL_SHAPES if args.rehearse else SHAPES
    return {"environment": environment(args.rehearse), "onnxruntime": _onnxruntime(),
            "settings": {"model": str(MODEL.relative_to(ROOT)), "plan": str(PLAN.relative_to(ROOT)),
                         "random_weights": True, "shapes": [f"{b}x{s}" for b, s in shapes], "warmup": args.warmup,
                         "iterations": args.iterations, "torch_compile_dynamic": True, "tf32": False,
                         "rehearsal_width": "1/64 of the width, same depth" if args.rehearse else None},
            "budget_seconds": args.budget, "steps": steps, "estimates": {n: STEPS[n].seconds for n in steps},
            "skipped": {}, "failed": {}, "step_seconds": {}, "matrix": {}}


def _onnxruntime() -> dict[str, Any]:
    """backends.preload_cuda_libraries, or why it failed (the PyTorch steps still run)."""
    from skrr_export.backends import preload_cuda_libraries

    try:
        return preload_cuda_libraries()
    except Exception as exc:  # noqa: BLE001 - e.g. the staged wheel did not install: recorded, the run goes on
        log.exception("onnxruntime could not be loaded")
        return {"onnxruntime": "not loaded", "path": "", "preload_dlls": False, "cuda_libraries": [],
                "error": f"{type(exc).__name__}: {exc}"}


def inputs(rehearse: bool, folder: Path) -> tuple[Path, Path]:
    """The model's config folder and the plan: the real ones, or for a rehearsal a narrow copy of the same depth and
    the plan without its stated sparsity (which the narrow model does not have)."""
    if not rehearse:
        return MODEL, PLAN
    folder.mkdir(parents=True)
    return tiny_copy(MODEL, folder), _unstated({"plan": PLAN}, folder)["plan"]


def run_step(name: str, model: Path, plan_path: Path, record: dict[str, Any], args: argparse.Namespace, work: Path) -> None:
    """One step's run_measurements, merged into its precision's results; a failure is recorded, not raised: one
    failed step must not cost the others their device time."""
    import torch

    from skrr_export.measure import MeasureConfig, run_measurements
    from skrr_export.model import ModelSource, build_meta, check_plan_fits, load_config
    from skrr_export.plan import load_plan
    from skrr_export.workload import Shape

    step, start = STEPS[name], time.perf_counter()
    torch.manual_seed(0)  # the same random weights in every run of a step
    try:
        source = ModelSource(model, random_weights=True)
        meta, plan = build_meta(load_config(source)), load_plan(plan_path)
        check_plan_fits(plan, meta)
        cfg = MeasureConfig(plan=plan_path, out=work, model=model, random_weights=True, precision=step.precision,
                            warmup=args.warmup, iterations=args.iterations, compile_dynamic=True,
                            variants=(step.variant,), parity=(step.variant,))
        shapes = [Shape(b, s) for b, s in (REHEARSAL_SHAPES if args.rehearse else SHAPES)]
        results = run_measurements(meta, source, plan, step.backends, shapes, cfg, work / name)
        add(record["matrix"], step.precision, results)
    except Exception as exc:  # noqa: BLE001 - recorded in part2.json and part2.md
        log.exception("%s failed", name)
        record["failed"][name] = f"{type(exc).__name__}: {exc}"
    record["step_seconds"][name] = round(time.perf_counter() - start, 1)
    _free_device()


def add(matrix: dict[str, Any], precision: str, results: dict[str, Any]) -> None:
    """gpu_part1.merge (runs, parity, errors, then summary and targets again), and the stage timings."""
    earlier = matrix.get(precision)
    merge(matrix, {precision: results})
    if earlier is not None:
        earlier["stages"] += results["stages"]


def _device_or_rehearsal(rehearse: bool) -> Any:
    from benchmarks.rehearsal import rehearsal_on_cpu

    return rehearsal_on_cpu() if rehearse else nullcontext()


# ------------------------------------------------------------------------------------------------ the issue's targets


def issue_targets(results: dict[str, Any], rehearsal: bool) -> list[dict[str, Any]]:
    """The three targets of issue 16 from measure.check_targets, each row met, missed or not measured: the plan's
    device bytes <= 1.05 x its unique weight bytes (our settings, plain and fused); the fused plan no slower than
    the dense model under torch.compile, per shape; nothing off CUDA and no memcpy on the hot path, per ONNX Runtime
    run. A rehearsal's memory figures are 0: its device-bytes rows say so instead of 'met'."""
    found = {t["target"]: t for t in results["targets"]}
    if rehearsal:
        found = {k: v for k, v in found.items() if "resident" not in k}
    shapes = [f"{f['batch']}x{f['seq']}" for f in results["flops"]]
    wanted = [(f"{b}: plan resident / unique weight bytes <= 1.05", "device bytes") for b in ("ort-cuda", "ort-cuda-fused")]
    wanted += [(f"ort-cuda-fused {s}: fused plan latency <= dense torch.compile's (ms)", "latency") for s in shapes]
    ort_runs = [r for r in results["runs"] if r["backend"] in ORT]
    wanted += [(f"{r['backend']} ({r['variant']}): nodes off CUDA or memcpy on the hot path", "placement") for r in ort_runs]
    if not ort_runs:
        wanted.append(("ONNX Runtime runs: nodes off CUDA or memcpy on the hot path", "placement"))
    def missing(kind: str) -> str:
        return "not measured (CPU rehearsal: no memory figure)" if rehearsal and kind == "device bytes" else "not measured"

    return [found.get(name, {"target": name, "value": None, "limit": None, "met": None, "why": missing(kind)})
            | {"kind": kind} for name, kind in wanted]


# ------------------------------------------------------------------------------------------------ writing


def write(record: dict[str, Any], out: Path, charts: bool) -> None:
    """part2.json (every step), part2.md, and at the end a memory chart per precision (measure.plot_memory)."""
    from skrr_export.measure import plot_memory

    for results in record["matrix"].values():
        results["issue_targets"] = issue_targets(results, record["environment"]["rehearsal"])
    (out / "part2.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (out / "part2.md").write_text(render(record))
    for precision, results in record["matrix"].items() if charts else ():
        plot_memory(results, out / f"memory-{precision}.png")


def render(r: dict[str, Any]) -> str:
    env, ort = r["environment"], r["onnxruntime"]
    rehearsal = "**CPU rehearsal: no number here is a GPU measurement** (memory figures read 0). " if env["rehearsal"] else ""
    lines = [f"# CUDA part 2 on {env['device']}", "",
             f"- {rehearsal}T5-v1.1-XXL config ({r['settings']['rehearsal_width'] or 'full size'}), random weights, "
             f"dense and the PixArt-Sigma 41.9 % plan; TF32 off; {r['settings']['warmup']} warm-up and "
             f"{r['settings']['iterations']} timed runs per shape; torch.compile with dynamic=True",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("device", "rehearsal")),
             f"- ONNX Runtime imported: {ort['onnxruntime']} from `{ort['path']}` {ort.get('error', '')}; preload_dlls "
             f"{'called' if ort['preload_dlls'] else 'absent'}; CUDA libraries mapped: "
             f"{', '.join(Path(p).name for p in ort['cuda_libraries']) or 'none'}"
             + (f"; preload_dlls printed: {ort['preload_messages']!r}" if ort.get("preload_messages") else ""),
             f"- Wall time {r.get('seconds', '(running)')} s of a {r['budget_seconds']:.0f} s budget; steps: "
             + ", ".join(f"{k} {v} s" for k, v in r["step_seconds"].items()), ""]
    for precision, results in r["matrix"].items():
        lines += _precision_lines(precision, results, " (CPU rehearsal)" if env["rehearsal"] else "")
    lines += ["## Issue 16's anchors (dense T5-v1.1-XXL fp16 on the H100, before this work)", "",
              "| run | " + " | ".join(SHAPES_TEXT) + " |", "|---|" + "---|" * len(SHAPES_TEXT)]
    lines += [f"| {k} | " + " | ".join(f"{v[s]:.1f} ms" for s in SHAPES_TEXT) + " |" for k, v in ANCHORS_MS.items()]
    lines.append("")
    for step, why in {**r["skipped"], **r["failed"]}.items():
        lines.append(f"- **{step}: not measured**: {why}")
    return "\n".join(lines) + "\n"


SHAPES_TEXT = [f"{b}x{s}" for b, s in SHAPES]


def _precision_lines(precision: str, results: dict[str, Any], where: str) -> list[str]:
    lines = [f"## {precision}", "", "### The issue's targets", "", "| target | value | limit | verdict |", "|---|---|---|---|"]
    for t in results["issue_targets"]:
        verdict = t.get("why", "not measured") if t["met"] is None else ("met" if t["met"] else "**missed**") + where
        value = "" if t["value"] is None else f"{t['value']:.4g}"
        limit = "" if t["limit"] is None else f"{t['limit']:.4g}"
        lines.append(f"| {t['target']} | {value} | {limit} | {verdict} |")
    lines += ["", "### Runs", "", "| variant | backend | shape | median / p90 ms | resident GB | peak GB | resident / unique "
              "| parity min cos / max abs | nodes off CUDA (hot path) | memcpy |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        lines += _run_rows(run, results["parity"])
    lines += _detail_lines(results)
    return lines + [""]


def _run_rows(run: dict[str, Any], parity: list[dict[str, Any]]) -> list[str]:
    checks = [o for p in parity if p["backend"] == run["backend"] and p.get("variant") == run["variant"] for o in p["outputs"]]
    passed = all(o["passed"] for o in checks)
    cos = (f"{min(o['min_cosine'] for o in checks):.6f} / {max(o['max_abs'] for o in checks):.3g}"
           f"{'' if passed else ' **FAILED**'}") if checks else "reference" if run["backend"] == "torch" else ""
    where = run.get("placement") or {}
    off = sum(where.get("ops_not_on_cuda", {}).values())
    hot = sum(e["nodes"] for e in where.get("hot_path", []))
    placed = f"{off} ({hot})" if where else ""
    rows = []
    for s in run["shapes"]:
        rows.append(f"| {run['variant']} | {run['backend']} | {s['batch']}x{s['seq']} | {s['median_ms']:.2f} / "
                    f"{s['p90_ms']:.2f} | {run['resident_bytes'] / 1e9:.3f} | {s['peak_bytes'] / 1e9:.3f} | "
                    f"{run['resident_over_unique']:.4f} | {cos} | {placed} | {where.get('memcpy_nodes', '')} |")
    return rows


def _detail_lines(results: dict[str, Any]) -> list[str]:
    lines = ["", "### Fusion, hot path, stages", ""]
    for run in results["runs"]:
        if f := run.get("fusion"):
            ops = f["op_counts"]
            lines.append(f"- fused {run['variant']}: {f['fused_attention']} MultiHeadAttention, {f['unfused_softmax']} "
                         f"Softmax left, {sum(ops.values())} nodes; weights read from "
                         f"{', '.join(f['storage']['data_files']) or 'the graph file'} "
                         f"({f['storage']['external_bytes'] / 1e9:.3f} GB), graph file "
                         f"{f['storage']['graph_file_bytes'] / 1e6:.2f} MB")
        hot = (run.get("placement") or {}).get("hot_path")
        if hot:
            lines.append(f"- hot path, {run['backend']} ({run['variant']}): " + ", ".join(
                f"{e['op']} on {e['provider'].removesuffix('ExecutionProvider')} x{e['nodes']} "
                f"(up to {e['max_output_elements']} elements)" for e in hot[:8]) + (", ..." if len(hot) > 8 else ""))
    for e in results["errors"]:
        lines.append(f"- **not measured**: {e['backend']} ({e['variant']}): {e['error']}")
    stages = ", ".join(f"{s['variant']} {s['stage']} {s['seconds']} s" for s in results.get("stages", []))
    return lines + [f"- stages: {stages}"]


if __name__ == "__main__":
    sys.exit(main())
