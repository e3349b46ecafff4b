"""T5-v1.1-XXL-size exports from sharded synthetic checkpoints, skrr-export (default flags) vs the simple script.

    python benchmarks/t5xxl_export.py write --dir /tmp/t5xxl    # bf16 (2 shards) and fp32 (4 shards), random values
    python benchmarks/t5xxl_export.py run --dir /tmp/t5xxl      # the matrix, measured with /usr/bin/time -v
    python benchmarks/t5xxl_export.py run --only bf16/pixart-41.9/skrr-export --quantize int4   # -> ...-cpu-int4.json

Each run exports bf16 (external data); skrr-export also runs its parity check (bf16 computed in fp32 on ONNX
Runtime's CPU provider) and the distance to the dense model (streamed). Results: benchmarks/results/t5xxl-export-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "t5-v1_1-xxl" / "config.json"
PLANS = {"dense": None, "pixart-41.9": ROOT / "recipes" / "t5-v1_1-xxl" / "pixart-sigma-41.9.json"}
SHARDS = {"bf16": (torch.bfloat16, 2), "fp32": (torch.float32, 4)}


def write(folder: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, T5EncoderModel

    config = AutoConfig.from_pretrained(CONFIG.parent)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    tensors = [(n, tuple(p.shape)) for n, p in model.state_dict().items() if n != "encoder.embed_tokens.weight"]
    g = torch.Generator().manual_seed(0)
    for name, (dtype, count) in SHARDS.items():
        out = folder / name
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(CONFIG, out / "config.json")
        per = -(-len(tensors) // count)
        weight_map, total = {}, 0
        for i in range(count):
            file = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            shard = {n: (torch.randn(s, generator=g) * 0.02).to(dtype) for n, s in tensors[i * per:(i + 1) * per]}
            save_file(shard, out / file, metadata={"format": "pt"})
            weight_map.update({n: file for n in shard})
            total += sum(t.numel() * t.element_size() for t in shard.values())
            del shard
            print(f"{name}: wrote {file}", flush=True)
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def timed(cmd: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024
    return {"exit": proc.returncode, "wall_seconds": round(wall, 1), "peak_rss_bytes": rss,
            "stderr_tail": proc.stderr.strip().splitlines()[-25:-23] if proc.returncode else None}


def dense_plan(tmp: Path) -> Path:
    path = tmp / "dense.json"
    path.write_text(json.dumps({"format": "skrr-plan/1", "encoder": {"family": "t5", "num_blocks": 24}}))
    return path


def run(folder: Path, only: str | None, quantize: str | None = None) -> None:
    from skrr_export.artifacts import onnx_weight_bytes

    work = folder / "out"
    results = []
    for ckpt in SHARDS:
        for plan_name, plan in PLANS.items():
            plan = plan or dense_plan(folder)
            for tool in ("skrr-export", "simple"):
                if only and only not in f"{ckpt}/{plan_name}/{tool}":
                    continue
                shutil.rmtree(work, ignore_errors=True)
                if tool == "skrr-export":
                    cmd = [sys.executable, "-m", "skrr_export.cli", "--plan", str(plan), "--model", str(folder / ckpt),
                           "--precision", "bf16", "--random-ids", "--out", str(work), "-q"]  # dense distance on
                    cmd += ["--quantize", quantize] if quantize else []
                else:
                    cmd = [sys.executable, str(ROOT / "benchmarks" / "simple_export.py"), "--plan", str(plan),
                           "--model", str(folder / ckpt), "--out", str(work)]
                row = {"checkpoint": ckpt, "plan": plan_name, "tool": tool, **timed(cmd)}
                onnx = work / "model.onnx"
                if onnx.is_file():
                    row["initializer_bytes"] = onnx_weight_bytes(onnx)
                    row["data_file_bytes"] = sum(p.stat().st_size for p in work.glob("*.data"))
                print(json.dumps(row), flush=True)
                results.append(row)
    shutil.rmtree(work, ignore_errors=True)
    import transformers

    out = ROOT / "benchmarks" / "results" / f"t5xxl-export-cpu{'-' + quantize if quantize else ''}.json"
    previous = json.loads(out.read_text())["runs"] if out.is_file() and only else []
    keep = [r for r in previous if not any(r["checkpoint"] == n["checkpoint"] and r["plan"] == n["plan"] and r["tool"] == n["tool"] for n in results)]
    out.write_text(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "export_precision": "bf16", "runs": keep + results}, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=("write", "run"))
    p.add_argument("--dir", type=Path, default=Path("/tmp/t5xxl"))
    p.add_argument("--only", help="substring of 'checkpoint/plan/tool' to run a part of the matrix")
    p.add_argument("--quantize", choices=("int8", "int4"), help="skrr-export runs with --quantize (default block)")
    args = p.parse_args()
    write(args.dir) if args.command == "write" else run(args.dir, args.only, args.quantize)


if __name__ == "__main__":
    main()
