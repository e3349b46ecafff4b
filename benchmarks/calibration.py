"""Calibration wall time, sub-block evaluations (fast vs naive) and peak memory, recorded with the machine.

CPU, real MiniLM weights, fast vs naive:   python benchmarks/calibration.py --num-prompts 32
CPU, all 512 built-in prompts (memory):    nice python benchmarks/calibration.py --num-prompts 512 --no-naive
GPU, T5-v1.1-XXL shapes:                   python benchmarks/calibration.py --model recipes/t5-v1_1-xxl --random-weights \
                                               --device cuda --precision bf16 --num-prompts 32 --sparsity 0.42 --no-naive
Writes benchmarks/results/calibration-<device>-<model>-<prompts>.json. Peak memory: on CPU the process's peak
resident set (VmHWM) above its resident set after the imports; on CUDA the allocator's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import skrr_export.calibrate  # noqa: F401 - imported before the baseline is taken
import transformers  # noqa: F401
from skrr_export.calibrate import CalibrationConfig, calibrate


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB, {torch.get_num_threads()} threads"


def resident(field: str) -> int:
    """VmRSS or VmHWM of this process, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path)
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--sparsity", type=float, default=0.16)
    p.add_argument("--no-naive", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    baseline = resident("VmRSS")
    runs = {}
    for naive in (False,) if args.no_naive else (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = CalibrationConfig(out=Path(tmp) / "plan.json", sparsities=(args.sparsity,), model=args.model,
                                    random_weights=args.random_weights, num_prompts=args.num_prompts, beam=args.beam,
                                    max_length=args.max_length, batch_size=args.batch_size, device=args.device,
                                    precision=args.precision, naive=naive)
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            plan = calibrate(cfg)[args.sparsity]
            prov = plan.provenance
            runs["naive" if naive else "fast"] = {
                "wall_seconds": round(time.perf_counter() - start, 1),
                "skip_seconds": prov["skip_seconds"],
                "subblock_evaluations": prov["subblock_evaluations"],
                "naive_subblock_evaluations": prov["naive_subblock_evaluations"],
                "skip_subblock_evaluations_per_second": prov["skip_subblock_evaluations_per_second"],
                "skip": list(plan.skip), "reuse": {str(k): v for k, v in plan.reuse.items()},
                "score": prov["score"], "sparsity": plan.sparsity,
                "memory_plan": prov["memory_plan"],
                "peak_bytes_above_baseline": (torch.cuda.max_memory_allocated() if args.device.startswith("cuda")
                                              else resident("VmHWM") - baseline),
            }
    name = (args.model.name if args.model else "minilm")
    result = {
        "device": device_name(args.device), "torch": torch.__version__, "python": platform.python_version(),
        "model": name, "random_weights": args.random_weights, "precision": args.precision,
        "num_prompts": args.num_prompts, "max_length": args.max_length, "batch_size": args.batch_size,
        "target_sparsity": args.sparsity, "beam": args.beam, "baseline_rss_bytes": baseline, "runs": runs,
    }
    if "naive" in runs:
        result["same_plan"] = (runs["fast"]["skip"], runs["fast"]["reuse"]) == (runs["naive"]["skip"], runs["naive"]["reuse"])
    out = Path(__file__).parent / "results" / f"calibration-{args.device.split(':')[0]}-{name}-{args.num_prompts}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
