"""Peak host memory of the main job with an engine (issue 26), per stage, before and after the engine stage's rework.

    python benchmarks/engine_memory.py run --case minilm --code before --code after
    python benchmarks/engine_memory.py run --case xxl-bf16 --code after      # one large case at a time
    python benchmarks/engine_memory.py export --model recipes/t5-v1_1-xxl --plan recipes/pixart-sigma-41.9/plan.json --out OUT
    python benchmarks/engine_memory.py build --onnx OUT/model.onnx --label xxl-bf16 --code before --code after
    python benchmarks/engine_memory.py summarize                              # the table for benchmarks/README.md

Each run is the CLI in a child process (``skrr-export ... --engine trt-rtx``); this process samples the child's VmRSS
(and its file-backed part, RssFile: the mapped ONNX data) from /proc every 0.1 s, tags each sample with the stage the
child's log is in ("[skrr-export] engine ..." to "engine done"), and takes the child's VmHWM at every stage change,
so a stage's peak is exact even between samples. ``--code before`` runs the tree of commit BEFORE, ``after`` the HEAD
commit (each from ``git archive`` into a temporary folder: uncommitted changes are not measured). The import baseline is a
child that imports what the job imports (torch, transformers, onnx, onnxruntime, tensorrt_rtx, skrr_export.cli).

Cases: MiniLM (the embedded real model, recipe plan, fp32, dynamic sequence 1,64,128); T5-v1.1-XXL config with
random weights, PixArt-Sigma 41.9 % (bf16, and int4 weight-only), fixed sequence 300, batch 1,1,4 (the recipe's):
built in memory (``--random-weights``), or ``*-checkpoint`` read from a bf16 checkpoint on disk, as users run it.
Results: benchmarks/results/engine-memory-cpu.json (runs are merged in by case and code).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "engine-memory-cpu.json"
BEFORE = "26278fc"  # main before issue 26
GIB = 2**30
IMPORTS = "import torch, transformers, onnx, onnxruntime, tensorrt_rtx, skrr_export.cli"
XXL = ["--recipe", "pixart-sigma-41.9", "--model", str(ROOT / "recipes" / "t5-v1_1-xxl"), "--random-weights"]
# As the user ran it: a bf16 checkpoint on disk (t5xxl_export.py write: random values, 2 safetensors shards;
# --checkpoint, default below), no tokenizer (seeded random ids)
CHECKPOINT = Path("/tmp/t5xxl/bf16")
XXL_CHECKPOINT = ["--recipe", "pixart-sigma-41.9", "--model", "{checkpoint}", "--random-ids"]
CASES = {
    "minilm": ["--plan", str(ROOT / "recipes" / "minilm" / "plan.json"), "--sequence", "1,64,128"],
    "xxl-bf16": XXL,
    "xxl-int4": [*XXL, "--quantize", "int4"],
    "xxl-bf16-checkpoint": XXL_CHECKPOINT,
    "xxl-int4-checkpoint": [*XXL_CHECKPOINT, "--quantize", "int4"],
}
STAGE = re.compile(r"\[skrr-export\] (.+?) (\.\.\.|done in)")
ESTIMATE = re.compile(r"memory estimate: ([\d.]+) GiB")


def status(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v.split()[0]) * 1024 for k, v in (l.split(":", 1) for l in text.splitlines())
            if k in ("VmRSS", "VmHWM", "RssFile", "RssAnon")}


def sampled(cmd: list[str], env: dict[str, str]) -> tuple[int, dict[str, dict[str, int]], list[str], float]:
    """Run ``cmd``; (exit code, per stage {peak, peak file-backed, seconds}, stderr lines, seconds)."""
    start = time.perf_counter()
    # cwd: not the repository, whose folder would come first on sys.path and shadow PYTHONPATH's tree
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd="/")
    stages: dict[str, dict[str, int]] = {"startup": {"peak": 0, "file": 0, "anon": 0, "entry": 0}}
    current, lines, lock = ["startup"], [], threading.Lock()

    def enter(name: str) -> None:
        s = status(proc.pid)
        hwm = s.get("VmHWM", 0)
        with lock:
            stages[current[0]]["peak"] = max(stages[current[0]]["peak"], hwm if hwm > stages[current[0]].get("hwm0", 0) else 0)
            current[0] = name
            st = stages.setdefault(name, {"peak": 0, "file": 0, "anon": 0, "entry": s.get("VmRSS", 0)})
            st["hwm0"] = hwm

    def read() -> None:
        for line in proc.stderr:
            lines.append(line.rstrip())
            m = STAGE.search(line)
            if m:
                enter(m.group(1) if m.group(2) == "..." else f"after {m.group(1)}")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        s = status(proc.pid)
        with lock:
            st = stages[current[0]]
            st["peak"] = max(st["peak"], s.get("VmRSS", 0))
            st["file"] = max(st["file"], s.get("RssFile", 0))
            st["anon"] = max(st["anon"], s.get("RssAnon", 0))
        time.sleep(0.1)
    reader.join()
    for st in stages.values():
        st.pop("hwm0", None)
    return proc.returncode, stages, lines, time.perf_counter() - start


def baseline(env: dict[str, str]) -> int:
    out = subprocess.run([sys.executable, "-c", f"{IMPORTS}; print(open('/proc/self/status').read())"],
                         capture_output=True, text=True, check=True, env=env, cwd="/").stdout
    return next(int(l.split()[1]) * 1024 for l in out.splitlines() if l.startswith("VmRSS:"))


def tree(code: str, tmp: Path) -> tuple[Path, str]:
    """The code a run imports and its commit: BEFORE, or ("after") the HEAD commit as the run starts; each from
    ``git archive`` into ``tmp``, so editing the working tree while a run goes on cannot change what it imports."""
    commit = BEFORE if code == "before" else _git("rev-parse", "HEAD")
    folder = tmp / f"tree-{commit[:7]}"
    if not folder.is_dir():
        folder.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder, commit


def run_one(case: str, code: str, tmp: Path, extra: list[str], checkpoint: Path = CHECKPOINT) -> dict:
    source, commit = tree(code, tmp)
    env = dict(os.environ, PYTHONPATH=str(source), HF_HUB_OFFLINE="1")
    out = tmp / f"out-{case}-{code}"
    argv = [a.replace("{checkpoint}", str(checkpoint)) for a in CASES[case]]
    argv += [*extra, "--engine", "trt-rtx", "--out", str(out), "--no-dense-distance"]
    base = baseline(env)
    code_, stages, lines, seconds = sampled([sys.executable, "-m", "skrr_export.cli", *argv], env)
    report = json.loads((out / "report.json").read_text()) if code_ == 0 else {}
    weights = (report.get("onnx") or {}).get("weights", {}).get("bytes")
    engine = report.get("engine") or {}
    peak = max(s["peak"] for s in stages.values())
    estimate = next((float(m.group(1)) for l in lines if (m := ESTIMATE.search(l))), None)
    result = {
        "case": case, "code": "HEAD" if code == "after" else BEFORE, "label": code, "argv": argv, "exit_code": code_,
        "seconds": round(seconds, 1), "import_baseline_gib": round(base / GIB, 3),
        "onnx_weight_bytes": weights, "engine_bytes": engine.get("serialized_bytes"),
        "engine_weights": engine.get("weights"),
        "peak_gib": round(peak / GIB, 3), "peak_above_baseline_gib": round((peak - base) / GIB, 3),
        "stages_gib": _stages(stages), "estimate_gib": estimate,
        "commit": commit, "load_average_at_end": os.getloadavg()[0], "stderr_tail": [l for l in lines if "[skrr-export]" not in l][-4:],
    }
    if weights:
        bound = 1.1 * weights + 0.6 * GIB
        result["bound_gib"] = round(bound / GIB, 3)  # 1.1 x exported ONNX weight bytes + 0.6 GiB above the baseline
        result["within_bound"] = peak - base <= bound
    return result


BUILD_CHILD = """
import sys, json, time
from pathlib import Path
import skrr_export.trt as trt_module
from skrr_export.trt import EngineOptions, ShapeRange, build_engine
import skrr_export
START = time.perf_counter()

def _memory():
    s = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
    return [round(int(s[k].split()[0]) / 2**20, 3) for k in ("VmRSS", "RssAnon", "RssFile")]  # GiB

def _tapped(make=trt_module._make_logger):
    logger = make()
    keep = logger.log

    def log(severity, msg):  # the builder's own messages (INFO and above), each with this process's memory then
        keep(severity, msg)
        if int(severity) <= 3:
            print("@@trt " + json.dumps([round(time.perf_counter() - START, 1), *_memory(), msg[:300]]),
                  file=sys.stderr, flush=True)
    logger.log = log
    return logger

trt_module._make_logger = _tapped
print("[skrr-export] engine ...", skrr_export.__file__, file=sys.stderr, flush=True)
onnx, seq = Path(sys.argv[1]), sys.argv[2]
art = build_engine(onnx, "trt-rtx", EngineOptions(batch=ShapeRange(1, 1, 4), sequence=ShapeRange.parse(seq, "seq")),
                   Path(sys.argv[3]), {})
print("[skrr-export] engine done in 0 s", file=sys.stderr, flush=True)
print(json.dumps({k: art.metadata.get(k) for k in ("serialized_bytes", "onnx_weight_bytes", "weights")}), file=sys.stderr)
"""


def build_only(onnx: Path, sequence: str, code: str, label: str) -> None:
    """The engine stage alone (build_engine in a child) on an existing export: before/after without the export."""
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": []}
    with tempfile.TemporaryDirectory(prefix="engine-memory-", dir=os.environ.get("ENGINE_MEMORY_TMP")) as tmp:
        source, commit = tree(code, Path(tmp))
        env = dict(os.environ, PYTHONPATH=str(source))
        base = subprocess.run([sys.executable, "-c", "import onnx, tensorrt_rtx, skrr_export.trt; "
                               "print(open('/proc/self/status').read())"], capture_output=True, text=True, env=env,
                              check=True, cwd="/").stdout
        base = next(int(l.split()[1]) * 1024 for l in base.splitlines() if l.startswith("VmRSS:"))
        code_, stages, lines, seconds = sampled([sys.executable, "-c", BUILD_CHILD, str(onnx), sequence,
                                                  str(Path(tmp) / "engine.plan")], env)
    meta = json.loads(lines[-1]) if code_ == 0 else {}
    builder_log = [json.loads(l.removeprefix("@@trt ")) for l in lines if l.startswith("@@trt ")]
    lines = [l for l in lines if not l.startswith("@@trt ")]
    weights = meta.get("onnx_weight_bytes")
    peak = stages.get("engine", {"peak": 0})["peak"]
    r = {"case": label, "code": "HEAD" if code == "after" else BEFORE, "label": f"build-only {code}", "exit_code": code_,
         "seconds": round(seconds, 1), "import_baseline_gib": round(base / GIB, 3), "onnx_weight_bytes": weights,
         "engine_bytes": meta.get("serialized_bytes"), "engine_weights": meta.get("weights"),
         "peak_gib": round(peak / GIB, 3), "peak_above_baseline_gib": round((peak - base) / GIB, 3),
         "engine_file_backed_gib": round(stages.get("engine", {"file": 0})["file"] / GIB, 3),
         "stages_gib": _stages(stages), "estimate_gib": None, "stderr_tail": lines[-3:],
         "commit": commit, "load_average_at_end": os.getloadavg()[0],
         "builder_log": {"columns": ["seconds", "rss_gib", "anonymous_gib", "file_backed_gib", "message"],
                         "rows": builder_log}}
    if weights:
        r["bound_gib"] = round((1.1 * weights + 0.6 * GIB) / GIB, 3)
        r["within_bound"] = peak - base <= 1.1 * weights + 0.6 * GIB
    print(json.dumps(r, indent=2), flush=True)
    results["runs"] = [x for x in results["runs"] if (x["case"], x["label"]) != (label, r["label"])] + [r]
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def export_only(model: Path, plan: Path, out: Path, quantize: str | None) -> None:
    """An export without the parity reference (what ``build`` measures on): random weights, bf16, fixed sequence
    300, external data; the stages before the engine are what ``run`` measures."""
    import torch

    from skrr_export.apply import apply_plan
    from skrr_export.export import ExportOptions, export_onnx
    from skrr_export.model import ModelSource, load_encoder
    from skrr_export.plan import load_plan

    torch.set_grad_enabled(False)
    enc = load_encoder(ModelSource(model, random_weights=True), load_plan(plan), "bf16")
    module = apply_plan(enc, load_plan(plan))
    quantized = None
    if quantize:
        from skrr_export.quantize import quantization, quantize_module

        quantized = quantize_module(module, quantization(quantize, None))
    out.mkdir(parents=True, exist_ok=True)
    art = export_onnx(module, out / "model.onnx", ExportOptions("int64", 300, True),
                      enc.adapter.sizes(enc.config).vocab, quantized)
    print(json.dumps(art.to_json(), default=str)[:400])


def run(case: str, codes: list[str], extra: list[str], checkpoint: Path = CHECKPOINT) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": []}
    with tempfile.TemporaryDirectory(prefix="engine-memory-", dir=os.environ.get("ENGINE_MEMORY_TMP")) as tmp:
        for code in codes:
            r = run_one(case, code, Path(tmp), extra, checkpoint)
            print(json.dumps(r, indent=2), flush=True)
            results["runs"] = [x for x in results["runs"] if (x["case"], x["label"]) != (case, code)] + [r]
    results |= {"what": __doc__.split("\n\n")[0], "machine": {"cpus": len(os.sched_getaffinity(0)),
                "python": platform.python_version(), "platform": platform.platform()}, "versions": _versions()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def summarize() -> None:
    runs = json.loads(RESULTS.read_text())["runs"]
    print("| case | code | ONNX weights GB | peak above import baseline GiB | bound GiB | estimate GiB | "
          "load / quantize / reference / export / parity / engine peak GiB | engine file-backed / anonymous GiB | "
          "TensorRT CPU allocators MiB | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(runs, key=lambda r: (r["case"], r["label"] not in ("before", "build-only before"), r["label"])):
        st = r["stages_gib"]
        parts = " / ".join(f"{st[k]['peak']:.2f}" if k in st else "-"
                           for k in ("load", "quantize", "pytorch reference", "export", "parity", "engine"))
        engine = st.get("engine", {})
        split = f"{engine['file_backed']:.2f} / {engine['anonymous']:.2f}" if "anonymous" in engine else (
            f"{engine['file_backed']:.2f} / -" if engine else "-")
        allocators = next((m.group(1) for *_, msg in (r.get("builder_log") or {}).get("rows", [])
                           if (m := re.search(r"allocators: CPU (\d+) MiB", msg))), "-")
        w = r["onnx_weight_bytes"]
        print(f"| {r['case']} | {r['label']} ({r.get('commit', r['code'])[:7]}) | {w / 1e9:.2f} | {r['peak_above_baseline_gib']:.2f} | "
              f"{r.get('bound_gib', '-')} | {r['estimate_gib'] or '-'} | {parts} | {split} | {allocators} | "
              f"{r['seconds']} |" if w else
              f"| {r['case']} | {r['label']} | exit {r['exit_code']} | | | {r['estimate_gib'] or '-'} | {parts} | | | "
              f"{r['seconds']} |")


def _stages(stages: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """Per stage, GiB: the peak RSS, the peak of its file-backed part (mapped files) and of its anonymous part
    (sampled every 0.1 s; they need not peak together), and the RSS the stage started with."""
    return {k: {"peak": round(v["peak"] / GIB, 3), "file_backed": round(v["file"] / GIB, 3),
                "anonymous": round(v.get("anon", 0) / GIB, 3), "at_start": round(v.get("entry", 0) / GIB, 3)}
            for k, v in stages.items()}


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "onnx", "onnxruntime", "tensorrt-rtx")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "export", "build", "summarize"])
    p.add_argument("--model", type=Path, help="export: a model folder (config.json; random weights)")
    p.add_argument("--plan", type=Path, help="export: the plan")
    p.add_argument("--quantize", help="export: int4 / int8")
    p.add_argument("--out", type=Path, help="export: the folder to write")
    p.add_argument("--onnx", type=Path, help="build: an existing export's model.onnx")
    p.add_argument("--sequence", default="300", help="build: the sequence profile (the export's fixed sequence)")
    p.add_argument("--label", help="build: the case name to record it under")
    p.add_argument("--case", choices=list(CASES))
    p.add_argument("--code", action="append", choices=["before", "after"])
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help=f"the *-checkpoint cases' model folder "
                   f"(default {CHECKPOINT}: python benchmarks/t5xxl_export.py write --dir {CHECKPOINT.parent})")
    p.add_argument("extra", nargs="*", help="more CLI flags after --")
    args = p.parse_args()
    if args.command == "summarize":
        summarize()
        return 0
    if args.command == "export":
        export_only(args.model, args.plan, args.out, args.quantize)
        return 0
    if args.command == "build":
        for code in args.code or ["before", "after"]:
            build_only(args.onnx, args.sequence, code, args.label)
        return 0
    run(args.case, args.code or ["before", "after"], args.extra, args.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
