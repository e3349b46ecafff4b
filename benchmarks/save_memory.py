"""Peak memory of the export's ONNX save, per stage: onnx_ir's in-memory save (before) vs the streamed one (after).

    python benchmarks/save_memory.py run --save streaming --save onnx_ir   # -> results/save-memory-cpu.json
    python benchmarks/save_memory.py form --case t5-1536 --external-data --quantize int4   # -> save-memory-cpu-forms.json

The model is the issue's 24-block T5 (d_model 1536, d_ff 4096, 24 heads of 64, T5-v1.1-XXL's vocabulary, random
weights) with the PixArt-Sigma 41.9 % plan, bf16, default flags, run through the CLI in a child process:
``skrr-export --plan recipes/pixart-sigma-41.9/plan.json --model FOLDER --random-weights --precision bf16 --out OUT
--no-dense-distance``. The child marks its stages on stderr (export_onnx and the save inside it); this process samples
the child's VmRSS from /proc every 0.05 s and keeps the peak of each stage. The import baseline is the RSS of a child
that only imports what the CLI's export imports. ``--save onnx_ir`` runs the save the export used before
(``onnx_ir.save``, what torch's ``ONNXProgram.save`` calls); ``streaming`` is ``graph.save``.

``form`` runs the export's own save (streaming) for one case and form, the issue's "same command, default flags":
``t5-1536`` (the model above), ``minilm`` (``--recipe minilm``: the embedded real model) or ``xxl`` (``--recipe
pixart-sigma-41.9 --model recipes/t5-v1_1-xxl --random-weights``: a config folder, nothing from the hub), optionally
``--external-data`` and ``--quantize int4``. Stages are the job's own log stages ("[skrr-export] load ...": load,
apply, pytorch reference, quantize, export, parity) with the save and its check marked inside the export; at every
stage change the child's VmHWM is read, so a stage's peak is exact between samples; RssFile (file-backed pages: a
mapped ONNX file) is recorded beside it. Runs merge into results/save-memory-cpu-forms.json by case and form, with
the commit and ``git status --short`` of the tree they ran on.
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
PLAN = ROOT / "recipes" / "pixart-sigma-41.9" / "plan.json"
CONFIG = {"architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": 1536, "d_ff": 4096, "d_kv": 64,
          "num_heads": 24, "num_layers": 24, "vocab_size": 32128, "feed_forward_proj": "gated-gelu",
          "is_encoder_decoder": False, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
          "layer_norm_epsilon": 1e-6, "dense_act_fn": "gelu_new", "is_gated_act": True, "tie_word_embeddings": False}
IMPORTS = "import torch, transformers, onnx, onnx_ir, onnxscript, onnxruntime, skrr_export.cli, skrr_export.export"
GIB = 2**30
FORMS = ROOT / "benchmarks" / "results" / "save-memory-cpu-forms.json"
XXL = ["--recipe", "pixart-sigma-41.9", "--model", str(ROOT / "recipes" / "t5-v1_1-xxl"), "--random-weights"]
STAGE = re.compile(r"\[skrr-export\] (.+?) \.\.\.$")


def child(save: str, argv: list[str]) -> int:
    """Inside the child: mark the stages on stderr, choose the save, run the CLI."""
    import onnx_ir as ir
    import torch

    import skrr_export.export as export

    torch.set_num_threads(int(os.environ.get("SAVE_MEMORY_THREADS", "1")))
    original_export, original_save = export.export_onnx, export.save_model

    def mark(stage: str) -> None:
        print(f"@@stage {stage}", file=sys.stderr, flush=True)

    def export_onnx(*args, **kwargs):
        mark("export")
        try:
            return original_export(*args, **kwargs)
        finally:
            mark("after export (parity, report)")

    def save_model(model, path, external_data):
        mark("save")
        if save == "onnx_ir" and not external_data:
            ir.save(model, str(path))
        else:
            original_save(model, path, external_data)
        mark("check (onnx.checker)")
        if no_reference:  # what the report would say, then stop: nothing after the save is measured
            stored = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
            files = {f.name: f.stat().st_size for f in Path(path).parent.glob(Path(path).name + "*")}
            print(f"@@saved {json.dumps({'initializer_bytes': stored, 'files': files})}", file=sys.stderr, flush=True)
            os._exit(0)

    export.export_onnx, export.save_model = export_onnx, save_model
    no_reference = save.endswith("-no-reference")
    import skrr_export.quantize as quantize

    original_store = quantize.store_quantized

    def store_quantized(*args, **kwargs):  # the quantized weights' storage in the graph, a stage of its own
        mark("store quantized (graph's integers and scales)")
        try:
            return original_store(*args, **kwargs)
        finally:
            mark("export after storing")

    quantize.store_quantized = store_quantized
    if no_reference:  # PyTorch's outputs are only parity's reference: skipped (bf16 on this CPU would take hours)
        import skrr_export.pipeline as pipeline

        pipeline.reference_outputs = lambda module, batches, fp32_arithmetic=False: {b.label: {} for b in batches}
    mark("load and apply")
    from skrr_export.cli import main

    return main(argv)


def status(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v.split()[0]) * 1024 for k, v in (l.split(":", 1) for l in text.splitlines())
            if k in ("VmRSS", "VmHWM", "RssFile", "RssAnon")}


def sampled(cmd: list[str]) -> tuple[int, dict[str, int], list[str], float, dict[str, dict[str, int]]]:
    """Run ``cmd``; (exit code, peak RSS per stage in order, the stderr lines, seconds, per stage: the peak of the
    file-backed and of the anonymous part (sampled; they need not peak together) and the RSS at its start).
    Stages: the "@@stage" marks and the job's "[skrr-export] NAME ..." log lines, whichever comes last; at each
    change the child's VmHWM, where it rose during the stage that ends, is that stage's peak."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    peaks: dict[str, int] = {"imports": 0}
    files: dict[str, int] = {"imports": 0}
    anon: dict[str, int] = {"imports": 0}
    starts: dict[str, int] = {"imports": 0}
    stage, hwm0, lines, lock = ["imports"], [0], [], threading.Lock()

    def enter(name: str) -> None:
        s = status(proc.pid)
        hwm = s.get("VmHWM", 0)
        with lock:
            if hwm > hwm0[0]:
                peaks[stage[0]] = max(peaks[stage[0]], hwm)
            stage[0], hwm0[0] = name, hwm
            peaks.setdefault(name, 0)
            files.setdefault(name, 0)
            anon.setdefault(name, 0)
            starts.setdefault(name, s.get("VmRSS", 0))

    def read() -> None:
        for line in proc.stderr:
            lines.append(line.rstrip())
            if line.startswith("@@stage "):
                enter(line.removeprefix("@@stage ").strip())
            elif m := STAGE.search(line.rstrip()):
                enter(m.group(1))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        s = status(proc.pid)
        with lock:
            peaks[stage[0]] = max(peaks[stage[0]], s.get("VmRSS", 0))
            files[stage[0]] = max(files[stage[0]], s.get("RssFile", 0))
            anon[stage[0]] = max(anon[stage[0]], s.get("RssAnon", 0))
        time.sleep(0.05)
    reader.join()
    return proc.returncode, peaks, lines, time.perf_counter() - start, {"file_backed": files, "anonymous": anon,
                                                                         "at_start": starts}


def baseline() -> int:
    out = subprocess.run([sys.executable, "-c", f"{IMPORTS}; print(open('/proc/self/status').read())"],
                         capture_output=True, text=True, check=True).stdout
    return next(int(l.split()[1]) * 1024 for l in out.splitlines() if l.startswith("VmRSS:"))


def run_one(save: str, folder: Path, work: Path) -> dict:
    out = work / f"out-{save}"
    argv = ["--plan", str(folder / "plan.json"), "--model", str(folder), "--random-weights", "--precision", "bf16",
            "--out", str(out), "--no-dense-distance"]
    if "--random-ids" in (ROOT / "skrr_export" / "cli.py").read_text():  # where the CLI asks for a tokenizer
        argv.append("--random-ids")
    code, peaks, lines, seconds, _ = sampled([sys.executable, __file__, "child", save, "--", *argv])
    report = json.loads((out / "report.json").read_text()) if code == 0 else {}
    weight_bytes = report.get("onnx", {}).get("weights", {}).get("bytes")
    return {"save": save, "exit_code": code, "seconds": round(seconds, 1), "weight_bytes": weight_bytes,
            "model_onnx_bytes": (out / "model.onnx").stat().st_size if code == 0 else None,
            "peaks_gib": {k: round(v / GIB, 3) for k, v in peaks.items()},
            "peak_gib": round(max(peaks.values()) / GIB, 3), "stderr_tail": [l for l in lines if "@@" not in l][-5:]}


def t5_1536(tmp: Path) -> Path:
    """The issue's 24-block, 1536-wide T5: a config folder and the PixArt 41.9 % plan beside it."""
    folder = tmp / "t5-1536"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    plan = json.loads(PLAN.read_text())
    plan.pop("sparsity", None)  # stated for T5-v1.1-XXL (41.92 %); this narrower model's is 40.1 %
    (folder / "plan.json").write_text(json.dumps(plan))
    return folder


def run(saves: list[str], out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="save-memory-") as tmp:
        folder = t5_1536(Path(tmp))
        base = baseline()
        runs = [run_one(save, folder, Path(tmp)) for save in saves]
    for r in runs:
        if r["weight_bytes"]:
            target = base + 1.1 * r["weight_bytes"] + 0.6 * GIB
            r["target_gib"] = round(target / GIB, 3)
            r["save_within_target"] = r["peaks_gib"].get("save", 0) * GIB <= target
            r["run_within_target"] = r["peak_gib"] * GIB <= target
    result = {"model": "t5 24 blocks, d_model 1536, d_ff 4096, 24 heads, vocab 32128, random weights",
              "plan": str(PLAN.relative_to(ROOT)), "precision": "bf16", "import_baseline_gib": round(base / GIB, 3),
              "target": "peak <= import baseline + 1.1 x exported weight bytes + 0.6 GiB",
              "machine": {"cpus": len(__import__("os").sched_getaffinity(0)), "python": platform.python_version(),
                          "platform": platform.platform()},
              "versions": _versions(), "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def form(case: str, external: bool, quantize: str | None, keep: Path | None, no_reference: bool) -> None:
    """One case and form through the export's own save; merged into FORMS by (case, form). ``keep``: write the
    export there (it stays) instead of into the temporary folder. ``no_reference``: the PyTorch reference returns
    nothing and the child exits right after the save (load, apply, quantize, export and save measured)."""
    with tempfile.TemporaryDirectory(prefix="save-memory-", dir=os.environ.get("SAVE_MEMORY_TMP")) as tmp:
        out = keep or Path(tmp) / "out"
        argv = {"t5-1536": lambda: ["--plan", str(t5_1536(Path(tmp)) / "plan.json"), "--model",
                                    str(Path(tmp) / "t5-1536"), "--random-weights", "--precision", "bf16"],
                "minilm": lambda: ["--recipe", "minilm"], "xxl": lambda: list(XXL)}[case]()
        argv += ["--out", str(out), "--no-dense-distance"]
        argv += ["--external-data"] if external else []
        argv += ["--quantize", quantize] if quantize else []
        base = baseline()
        save = "streaming-no-reference" if no_reference else "streaming"
        code, peaks, lines, seconds, parts = sampled([sys.executable, __file__, "child", save, "--", *argv])
        report = json.loads((out / "report.json").read_text()) if code == 0 and not no_reference else {}
        sizes = {p.name: p.stat().st_size for p in sorted(out.glob("model.onnx*"))} if report else {}
    weights = report.get("onnx", {}).get("weights", {}).get("bytes")
    saved = next((json.loads(l.removeprefix("@@saved ")) for l in lines if l.startswith("@@saved ")), None)
    if saved:  # no report: the initializers' bytes (weights and the few small constants) and the files written
        weights, sizes = saved["initializer_bytes"], saved["files"]
    name = "+".join(["external data" if external else "single file", *([quantize] if quantize else []),
                     *(["no reference, stopped after the save"] if no_reference else [])])
    r = {"case": case, "form": name, "argv": argv, "exit_code": code, "seconds": round(seconds, 1),
         "commit": _git("rev-parse", "HEAD"), "tree_changes": _git("status", "--short").splitlines(),
         "load_average": os.getloadavg()[0], "import_baseline_gib": round(base / GIB, 3), "weight_bytes": weights,
         "files": sizes, "peaks_gib": {k: round(v / GIB, 3) for k, v in peaks.items()},
         **{f"{name}_gib": {k: round(v / GIB, 3) for k, v in values.items()} for name, values in parts.items()},
         "peak_gib": round(max(peaks.values()) / GIB, 3), "stderr_tail": [l for l in lines if "@@" not in l][-5:]}
    if weights:
        target = base + 1.1 * weights + 0.6 * GIB
        r["target_gib"] = round(target / GIB, 3)  # import baseline + 1.1 x exported weight bytes + 0.6 GiB
        r["save_within_target"] = peaks.get("save", 0) <= target
        r["run_within_target"] = max(peaks.values()) <= target
    print(json.dumps(r, indent=2), flush=True)
    results = json.loads(FORMS.read_text()) if FORMS.is_file() else {"runs": []}
    results["runs"] = [x for x in results["runs"] if (x["case"], x["form"]) != (case, name)] + [r]
    results |= {"what": "peak RSS per stage of the main job (no engine), the export's streaming save, per case and "
                "form; target: peak <= import baseline + 1.1 x exported weight bytes + 0.6 GiB",
                "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                            "platform": platform.platform(), "memory_gib": round(os.sysconf("SC_PHYS_PAGES") *
                                                                                os.sysconf("SC_PAGE_SIZE") / GIB, 1)},
                "versions": _versions()}
    FORMS.write_text(json.dumps(results, indent=2) + "\n")


PARITY_CHILD = """
import ctypes, gc, json, sys, time
from pathlib import Path
import numpy as np
from skrr_export.checks import parity_checks
from skrr_export.runners import OrtRunner  # noqa: F401  (what the job imports before parity)

def mem():
    s = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
    out = {k: round(int(s[k].split()[0]) / 2**20, 3) for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
    mapped, current = 0, False  # resident pages of mappings of the export's files (/proc/self/smaps)
    for line in open("/proc/self/smaps"):
        if not line[0].isupper():  # a mapping's header line: address range, ..., path
            current = line.rstrip().endswith(str(onnx.resolve()))
        elif current and line.startswith("Rss:"):
            mapped += int(line.split()[1])
    return out | {"mapped_from_export": round(mapped / 2**20, 3)}

def reset_peak():
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS

def feed_for(name, dims):
    shape = [d if isinstance(d, int) else (3 if n == 0 else seq) for n, d in enumerate(dims)]
    return (np.random.default_rng(0).integers(5, 1000, shape) if "ids" in name else np.ones(shape)).astype(np.int64)

onnx, precision, seq = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
trim = ctypes.CDLL("libc.so.6").malloc_trim
rows = [{"phase": "imports", **mem()}]
for check in parity_checks(precision, cuda=False):
    runner = check.runner(onnx)
    reset_peak(); t = time.perf_counter()
    runner.activate()
    rows.append({"phase": f"{check.kind}: session created ({runner.name})", "seconds": round(time.perf_counter() - t, 1),
                 **mem()})
    feed = {i.name: feed_for(i.name, i.shape) for i in runner.session.get_inputs()}  # no NodeArg left behind
    reset_peak(); t = time.perf_counter()
    runner.infer(feed)
    rows.append({"phase": f"{check.kind}: one run, batch 3 x {seq}", "seconds": round(time.perf_counter() - t, 1), **mem()})
    runner.deactivate(); del runner; gc.collect(); trim(0)
    rows.append({"phase": f"{check.kind}: session closed", **mem()})
print(json.dumps(rows))
"""


def parity(onnx: Path, precision: str, sequence: int) -> None:
    """The parity stage's ONNX Runtime sessions alone, in a child: RSS (anonymous and file-backed) and the peak
    around creating each check's session, one run, and closing it. Merged into FORMS under "parity_sessions"."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", PARITY_CHILD, str(onnx), precision, str(sequence)], capture_output=True,
                         text=True, env=env, cwd="/")
    if out.returncode:
        sys.exit(out.stderr[-2000:])
    rows = json.loads(out.stdout.splitlines()[-1])
    sizes = {p.name: p.stat().st_size for p in sorted(onnx.parent.glob(onnx.name + "*"))}
    r = {"onnx": sizes, "precision": precision, "sequence": sequence, "commit": _git("rev-parse", "HEAD"),
         "tree_changes": _git("status", "--short").splitlines(), "load_average": os.getloadavg()[0],
         "units": "GiB; VmHWM: the peak since the previous row; mapped_from_export: resident pages of mappings of "
                  "the export's files (/proc/self/smaps)", "phases": rows}
    print(json.dumps(r, indent=2))
    results = json.loads(FORMS.read_text()) if FORMS.is_file() else {"runs": []}
    key = "+".join(sorted(sizes))
    results["parity_sessions"] = [x for x in results.get("parity_sessions", []) if "+".join(sorted(x["onnx"])) != key
                                  or x["precision"] != precision] + [r]
    FORMS.write_text(json.dumps(results, indent=2) + "\n")


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "onnx", "onnx-ir", "onnxscript", "protobuf")}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        return child(sys.argv[2], sys.argv[4:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "form", "parity"])
    p.add_argument("--save", action="append", choices=["streaming", "onnx_ir"], help="save paths to run, in order")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "save-memory-cpu.json")
    p.add_argument("--case", choices=["t5-1536", "minilm", "xxl"], default="t5-1536", help="form: the model")
    p.add_argument("--external-data", action="store_true", help="form: the export's --external-data")
    p.add_argument("--quantize", choices=["int4", "int8"], help="form: the export's --quantize")
    p.add_argument("--no-reference", action="store_true", help="form: skip the PyTorch reference, stop after the "
                   "save (for T5-XXL: bf16 matmuls on a CPU without bf16 units take hours)")
    p.add_argument("--keep", type=Path, help="form: write the export to this folder and keep it")
    p.add_argument("--onnx", type=Path, help="parity: an export's model.onnx")
    p.add_argument("--precision", default="bf16", help="parity: the export's precision")
    p.add_argument("--sequence", type=int, default=12, help="parity: the sequence of a dynamic graph (the job's "
                   "random ids: 12)")
    args = p.parse_args()
    if args.command == "form":
        form(args.case, args.external_data, args.quantize, args.keep, args.no_reference)
        return 0
    if args.command == "parity":
        parity(args.onnx, args.precision, args.sequence)
        return 0
    run(args.save or ["streaming", "onnx_ir"], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
