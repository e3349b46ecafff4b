"""Device memory and latency, dense vs plan, per backend: the measurement matrix of the CUDA issue.

  python benchmarks/measure_cuda.py plans                  # (CPU) write the whole-block plans to benchmarks/plans/
  python benchmarks/measure_cuda.py run CASE [CASE ...]    # (GPU) skrr-export measure per case, into --out-root
  python benchmarks/measure_cuda.py table [--root DIR]     # markdown rows from DIR/measure-*/results.json

T5-v1.1-XXL, CLIP-L and CLIP-bigG text encoders use their real configs with random weights (memory and time do
not depend on the values); MiniLM uses its real weights. Every case measures torch, ONNX Runtime CUDA with our
settings and with ONNX Runtime's stock settings, in bf16 (`--precision fp32|fp16` for parity in the other
precisions: `run minilm --precision fp16 --backends torch,ort-cuda`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLANS = ROOT / "benchmarks" / "plans"
TARGET_SPARSITY = 0.419  # the PixArt-Sigma plan's; whole-block plans get as close as whole blocks allow


@dataclass(frozen=True)
class Case:
    model: str | None  # None: the embedded MiniLM (real weights)
    family: str
    plan: str
    seq: str
    batch: str = "1,4"

    @property
    def random_weights(self) -> bool:
        return self.model is not None


CASES = {
    "t5xxl-pixart-41.9": Case("recipes/t5-v1_1-xxl", "t5", "recipes/pixart-sigma-41.9/plan.json", "256,512"),
    "t5xxl-whole-block": Case("recipes/t5-v1_1-xxl", "t5", "benchmarks/plans/t5xxl-whole-block.json", "256,512"),
    "clip-l-whole-block": Case("benchmarks/configs/clip-vit-l-text", "clip", "benchmarks/plans/clip-l-whole-block.json", "77"),
    "clip-bigg-whole-block": Case("benchmarks/configs/clip-vit-bigg-text", "clip", "benchmarks/plans/clip-bigg-whole-block.json", "77"),
    "minilm": Case(None, "bert", "recipes/minilm/plan.json", "256,512"),
}


def whole_block_plan(model: Path, family: str, target: float) -> dict:
    """Skip whole blocks from the second-to-last backwards (first and last kept) until closest to ``target``."""
    from skrr_export.apply import plan_cost
    from skrr_export.model import ModelSource, build_meta, load_config
    from skrr_export.plan import Plan

    meta = build_meta(load_config(ModelSource(model)))
    n = len(meta.sub_blocks) // 2
    best = None
    for k in range(1, n - 1):
        blocks = list(range(n - 2, n - 2 - k, -1))
        plan = Plan(family, n, skip=tuple(s for b in blocks for s in (2 * b, 2 * b + 1)))
        sparsity = plan_cost(meta, plan).sparsity
        if best is None or abs(sparsity - target) < abs(best[1] - target):
            best = (plan, sparsity, blocks)
    assert best is not None
    plan, sparsity, blocks = best
    return plan.to_json() | {"sparsity": round(sparsity, 4), "provenance": {
        "by": "benchmarks/measure_cuda.py", "how": f"whole blocks {blocks} skipped (the latest blocks but the last, "
        f"no scores): a plan without re-use whose sparsity is the closest whole blocks get to {target}"}}


def write_plans() -> None:
    PLANS.mkdir(exist_ok=True)
    for name, case in CASES.items():
        if case.plan.startswith("benchmarks/plans/"):
            plan = whole_block_plan(ROOT / case.model, case.family, TARGET_SPARSITY)  # type: ignore[operator]
            (ROOT / case.plan).write_text(json.dumps(plan, indent=2) + "\n")
            print(f"{name}: {case.plan} skips {len(plan['skip'])} sub-blocks, sparsity {plan['sparsity']}")


def run(names: list[str], out_root: Path, backends: str, iterations: int, precision: str) -> None:
    for name in names:
        case = CASES[name]
        suffix = "" if precision == "bf16" else f"-{precision}"
        cmd = [sys.executable, "-m", "skrr_export.cli", "measure", "--plan", str(ROOT / case.plan), "--precision", precision,
               "--batch", case.batch, "--seq", case.seq, "--backends", backends, "--iterations", str(iterations),
               "--out", str(out_root / f"measure-{name}{suffix}"), "--force"]
        if case.model:
            cmd += ["--model", str(ROOT / case.model), "--random-weights"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def table(root: Path) -> None:
    print("| case | backend | variant | unique GB | resident GB | shape | peak GB | median ms | p90 ms | plan/dense | FLOP fraction |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in sorted(root.glob("measure-*/results.json")):
        r = json.loads(path.read_text())
        ratios = {(s["backend"], s["batch"], s["seq"]): s for s in r["summary"]}
        for run_ in r["runs"]:
            for row in run_["shapes"]:
                s = ratios.get((run_["backend"], row["batch"], row["seq"]))
                extra = f"{s['latency_ratio']:.3f} | {s['flop_fraction']:.3f}" if s and run_["variant"] == "plan" else " | "
                print(f"| {path.parent.name.removeprefix('measure-')} | {run_['backend']} | {run_['variant']} | "
                      f"{run_['unique_weight_bytes'] / 1e9:.3f} | {run_['resident_bytes'] / 1e9:.3f} | {row['batch']}x{row['seq']} | "
                      f"{row['peak_bytes'] / 1e9:.3f} | {row['median_ms']:.2f} | {row['p90_ms']:.2f} | {extra} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("plans")
    r = sub.add_parser("run")
    r.add_argument("cases", nargs="+", choices=sorted(CASES))
    r.add_argument("--out-root", type=Path, default=ROOT / "benchmarks" / "results")
    r.add_argument("--backends", default="torch,ort-cuda,ort-cuda-stock")
    r.add_argument("--iterations", type=int, default=20)
    r.add_argument("--precision", default="bf16", help="bf16 for the matrix; fp32 / fp16 for parity on the device")
    t = sub.add_parser("table")
    t.add_argument("--root", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    if args.command == "plans":
        write_plans()
    elif args.command == "run":
        run(args.cases, args.out_root, args.backends, args.iterations, args.precision)
    else:
        table(args.root)


if __name__ == "__main__":
    main()
