"""Peak memory of the export's ONNX save, per stage: onnx_ir's in-memory save (before) vs the streamed one (after).

    python benchmarks/save_memory.py run --save streaming --save onnx_ir   # -> results/save-memory-cpu.json

The model is the issue's 24-block T5 (d_model 1536, d_ff 4096, 24 heads of 64, T5-v1.1-XXL's vocabulary, random
weights) with the PixArt-Sigma 41.9 % plan, bf16, default flags, run through the CLI in a child process:
``skrr-export --plan recipes/pixart-sigma-41.9/plan.json --model FOLDER --random-weights --precision bf16 --out OUT
--no-dense-distance``. The child marks its stages on stderr (export_onnx and the save inside it); this process samples
the child's VmRSS from /proc every 0.05 s and keeps the peak of each stage. The import baseline is the RSS of a child
that only imports what the CLI's export imports. ``--save onnx_ir`` runs the save the export used before
(``onnx_ir.save``, what torch's ``ONNXProgram.save`` calls); ``streaming`` is ``graph.save``.
"""

from __future__ import annotations

import argparse
import json
import platform
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


def child(save: str, argv: list[str]) -> int:
    """Inside the child: mark the stages on stderr, choose the save, run the CLI."""
    import onnx_ir as ir
    import torch

    import skrr_export.export as export

    torch.set_num_threads(1)
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

    export.export_onnx, export.save_model = export_onnx, save_model
    mark("load and apply")
    from skrr_export.cli import main

    return main(argv)


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def sampled(cmd: list[str]) -> tuple[int, dict[str, int], list[str], float]:
    """Run ``cmd``; (exit code, peak RSS per stage in order, the stderr lines, seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    peaks: dict[str, int] = {"imports": 0}
    stage, lines = ["imports"], []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line.rstrip())
            if line.startswith("@@stage "):
                stage[0] = line.removeprefix("@@stage ").strip()
                peaks.setdefault(stage[0], 0)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        peaks[stage[0]] = max(peaks[stage[0]], rss(proc.pid))
        time.sleep(0.05)
    reader.join()
    return proc.returncode, peaks, lines, time.perf_counter() - start


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
    code, peaks, lines, seconds = sampled([sys.executable, __file__, "child", save, "--", *argv])
    report = json.loads((out / "report.json").read_text()) if code == 0 else {}
    weight_bytes = report.get("onnx", {}).get("weights", {}).get("bytes")
    return {"save": save, "exit_code": code, "seconds": round(seconds, 1), "weight_bytes": weight_bytes,
            "model_onnx_bytes": (out / "model.onnx").stat().st_size if code == 0 else None,
            "peaks_gib": {k: round(v / GIB, 3) for k, v in peaks.items()},
            "peak_gib": round(max(peaks.values()) / GIB, 3), "stderr_tail": [l for l in lines if "@@" not in l][-5:]}


def run(saves: list[str], out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="save-memory-") as tmp:
        folder = Path(tmp) / "t5-1536"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(CONFIG))
        plan = json.loads(PLAN.read_text())
        plan.pop("sparsity", None)  # stated for T5-v1.1-XXL (41.92 %); this narrower model's is 40.1 %
        (folder / "plan.json").write_text(json.dumps(plan))
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


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "onnx", "onnx-ir", "onnxscript", "protobuf")}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        return child(sys.argv[2], sys.argv[4:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run"])
    p.add_argument("--save", action="append", choices=["streaming", "onnx_ir"], help="save paths to run, in order")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "save-memory-cpu.json")
    args = p.parse_args()
    run(args.save or ["streaming", "onnx_ir"], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
