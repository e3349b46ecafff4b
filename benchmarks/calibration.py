"""Calibration wall time and sub-block evaluations, fast vs naive, recorded with the machine.

CPU, real MiniLM weights:   python benchmarks/calibration.py --num-prompts 32
GPU, T5-v1.1-XXL shapes:    python benchmarks/calibration.py --model recipes/t5-v1_1-xxl --random-weights \
                                --device cuda --precision bf16 --num-prompts 32 --sparsity 0.42 --no-naive
Writes benchmarks/results/calibration-<device>-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from skrr_export.calibrate import CalibrationConfig, calibrate


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path)
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--sparsity", type=float, default=0.16)
    p.add_argument("--no-naive", action="store_true")
    args = p.parse_args()
    runs = {}
    for naive in (False,) if args.no_naive else (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = CalibrationConfig(out=Path(tmp) / "plan.json", sparsities=(args.sparsity,), model=args.model,
                                    random_weights=args.random_weights, num_prompts=args.num_prompts,
                                    max_length=args.max_length, device=args.device, precision=args.precision,
                                    naive=naive)
            start = time.perf_counter()
            plan = calibrate(cfg)[args.sparsity]
            runs["naive" if naive else "fast"] = {
                "wall_seconds": round(time.perf_counter() - start, 1),
                "subblock_evaluations": plan.provenance["subblock_evaluations"],
                "naive_subblock_evaluations": plan.provenance["naive_subblock_evaluations"],
                "skip": list(plan.skip), "reuse": {str(k): v for k, v in plan.reuse.items()},
                "score": plan.provenance["score"], "sparsity": plan.sparsity,
            }
    name = (args.model.name if args.model else "minilm")
    result = {
        "device": device_name(args.device), "torch": torch.__version__, "python": platform.python_version(),
        "model": name, "random_weights": args.random_weights, "precision": args.precision,
        "num_prompts": args.num_prompts, "max_length": args.max_length, "target_sparsity": args.sparsity,
        "beam": 3, "runs": runs,
    }
    if "naive" in runs:
        result["same_plan"] = (runs["fast"]["skip"], runs["fast"]["reuse"]) == (runs["naive"]["skip"], runs["naive"]["reuse"])
    out = Path(__file__).parent / "results" / f"calibration-{args.device.split(':')[0]}-{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
