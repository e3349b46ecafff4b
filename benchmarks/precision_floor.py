"""Why the bf16 precision check cannot separate the weakest wiring faults (issue 23, item 5), measured.

  python benchmarks/precision_floor.py [--cases clip-bf16,bert-bf16] [--depths 1,2,4,12]

The precision check runs the graph as stored (``OrtHalfEmulationRunner``: each node in fp32, rounded where the graph
stores half) against PyTorch computing in that precision. Three measurements:

1. **Where the two differ** (one-block CLIP, bf16, no plan): every half tensor of the emulated graph against the
   bf16 output of each PyTorch sub-module (forward hooks), matched by shape and most equal elements. If the graph
   computed differently from PyTorch (another rounding point, another formula), a tensor would differ in most of
   its elements; single-ulp rounding flips (fp32 sums in another order, then rounded) differ in a few.
2. **How the noise grows with depth**: the precision check's token error of a correct export of 1, 2, 4 and 12
   blocks.
3. **Whether any statistic of the output separates the weakest faults**: for the correct export and each planted
   fault of parity_separation.py (same models, plans and faults), four statistics of emulation vs PyTorch: the
   token error (what the check uses), the fraction of unequal elements, the relative Frobenius error over the whole
   batch, and the median token error.

Writes benchmarks/results/precision-floor-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import parity_separation as ps  # noqa: E402  (the models, plans and faults of the separation table)

OUT = ROOT / "benchmarks" / "results" / "precision-floor-cpu.json"
BF16 = 16  # onnx.TensorProto.BFLOAT16


def dense(family: str, blocks: int) -> str:
    """Register a model of ``family`` with ``blocks`` blocks and no plan; its name in ps.MODELS."""
    base = {"clip": ps.CLIP, "bert": ps.BERT, "t5": ps.T5}[family]
    key = "num_layers" if family == "t5" else "num_hidden_layers"
    name = f"{family}-{blocks}-blocks"
    plan = {"format": "skrr-plan/1", "encoder": {"family": family, "num_blocks": blocks}, "skip": [], "reuse": {}}
    ps.MODELS[name] = (base | {key: blocks}, plan, 77)
    return name


def export(name: str, precision: str, work: Path) -> tuple[Any, Any, Any, Path]:
    """(plan, module, batches, model.onnx) of a registered model."""
    from skrr_export.export import ExportOptions, export_onnx

    source, plan, module, _, batches = ps._load(name, precision, None, work)
    folder = work / name
    folder.mkdir(exist_ok=True)
    path = export_onnx(module, folder / "model.onnx", ExportOptions(fixed_sequence=ps.MODELS[name][2]),
                       ps._config(source).vocab_size, None).path
    return plan, module, batches, path


def where_they_differ(work: Path) -> list[dict[str, Any]]:
    """Measurement 1: per PyTorch sub-module of a one-block CLIP, the best-matching emulated tensor."""
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort
    import torch

    from skrr_export.graph import passes
    from skrr_export.runners import OrtHalfEmulationRunner

    _, module, batches, path = export(dense("clip", 1), "bf16", work)
    names = {m: n for n, m in module.named_modules()}
    hooked: list[tuple[str, np.ndarray]] = []

    def hook(mod: Any, _: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16:
            hooked.append((names[mod], out.detach().float().numpy()))

    handles = [m.register_forward_hook(hook) for m in module.modules() if m is not module]
    with torch.no_grad():
        module(*module.args_of(batches[0].feed))
    for h in handles:
        h.remove()
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    halves = [v.name for v in (*inferred.graph.value_info, *inferred.graph.output)
              if v.type.tensor_type.elem_type == BF16]
    emulated = ir.from_proto(inferred)
    passes.run(emulated, OrtHalfEmulationRunner.rewrite)  # the precision check's own rewrite
    model = ir.to_proto(emulated)
    produced = {o for node in model.graph.node for o in node.output}
    halves = [h for h in halves if h in produced]
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(h, onnx.TensorProto.FLOAT, None) for h in halves)
    emulated_path = path.with_name("emulated-all.onnx")
    onnx.save(model, str(emulated_path))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(emulated_path), opts)
    inputs = {i.name for i in session.get_inputs()}
    values = dict(zip(halves, session.run(None, {k: v for k, v in batches[0].feed.items() if k in inputs})))
    rows = []
    for name, torch_value in hooked:
        matches = [(float((v == torch_value).mean()), h, float(np.abs(v - torch_value).max()))
                   for h, v in values.items() if v.shape == torch_value.shape]
        if matches:
            equal, tensor, max_abs = max(matches)
            rows.append({"module": name, "shape": list(torch_value.shape), "graph_tensor": tensor,
                         "equal_fraction": equal, "max_abs": max_abs})
    return rows


def growth(depths: list[int], work: Path) -> list[dict[str, Any]]:
    """Measurement 2: the precision check's token error of a correct CLIP export, by depth."""
    rows = []
    for blocks in depths:
        _, module, batches, path = export(dense("clip", blocks), "bf16", work)
        result = ps.Checks(module, batches, "bf16").run(path, "precision")["precision"]
        rows.append({"blocks": blocks, **result})
        print(f"  depth {blocks}: {json.dumps(result)}", flush=True)
    return rows


def statistics(path: Path, reference: dict[str, Any], batches: Any, precision: str) -> dict[str, float]:
    """Emulation vs PyTorch: four statistics, worst over batches and outputs (real tokens only)."""
    from skrr_export.runners import OrtHalfEmulationRunner

    worst = {"token_error": 0.0, "unequal_fraction": 0.0, "frobenius": 0.0, "median_token_error": 0.0}
    with OrtHalfEmulationRunner(path, precision) as runner:
        for batch in batches:
            got = runner.infer(batch.feed)
            for name, ref in reference[batch.label].items():
                r, g = np.asarray(ref, np.float64), np.asarray(got[name], np.float64)
                if r.ndim == 3 and batch.mask is not None:
                    real = np.asarray(batch.mask).astype(bool)
                    r, g = r[real], g[real]
                r, g = r.reshape(-1, r.shape[-1]), g.reshape(-1, g.shape[-1])
                token = np.linalg.norm(g - r, axis=-1) / np.linalg.norm(r, axis=-1)
                for key, value in (("token_error", token.max()), ("unequal_fraction", (g != r).mean()),
                                   ("frobenius", np.linalg.norm(g - r) / np.linalg.norm(r)),
                                   ("median_token_error", np.median(token))):
                    worst[key] = max(worst[key], float(value))
    return worst


def separation(case: str, work: Path) -> dict[str, Any]:
    """Measurement 3: the four statistics for the correct export and each planted fault of a separation case."""
    model, precision = case.rsplit("-", 1)
    plan, module, batches, path = export(model, precision, work)
    checks = ps.Checks(module, batches, precision)
    wiring = {"correct": checks.run(path, "wiring")["wiring"]["token_error"]}
    rows = {"correct": statistics(path, checks.precision_ref, batches, precision)}
    print(f"  {case} correct: {json.dumps(rows['correct'])}", flush=True)
    for fault, plant in ps.faults(path, plan, precision, None):
        copy = path.with_name(f"{fault}.onnx")
        shutil.copyfile(path, copy)
        plant(copy)
        wiring[fault] = checks.run(copy, "wiring")["wiring"]["token_error"]
        rows[fault] = statistics(copy, checks.precision_ref, batches, precision)
        copy.unlink()
        print(f"  {case} {fault}: {json.dumps(rows[fault])}", flush=True)
    correct = rows["correct"]
    ratios = {key: min(r[key] for f, r in rows.items() if f != "correct") / correct[key] if correct[key] else math.inf
              for key in correct}
    return {"case": case, "statistics": rows, "wiring_token_error": wiring,
            "smallest_fault_over_correct": ratios}


def main() -> None:
    import onnxruntime
    import torch
    import transformers

    from skrr_export.compare import Tolerance

    ps.EVERYTHING = Tolerance(atol=1e9, rtol=0.0, min_cosine=-1.0)
    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="clip-bf16,bert-bf16")
    p.add_argument("--depths", default="1,2,4,12")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        record = {"commit": commit, "machine": f"{platform.machine()}, no GPU; ONNX Runtime CPU and torch on 1 thread",
                  "python": platform.python_version(), "torch": torch.__version__,
                  "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
                  "where_they_differ": where_they_differ(work),
                  "growth": growth([int(d) for d in args.depths.split(",")], work),
                  "separation": [separation(c, work) for c in args.cases.split(",")]}
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    for row in record["where_they_differ"]:
        print(f"{row['module']:40s} equal {row['equal_fraction']:.4f}  max abs {row['max_abs']:.3g}")
    for case in record["separation"]:
        print(case["case"], {k: round(v, 2) for k, v in case["smallest_fault_over_correct"].items()})


if __name__ == "__main__":
    main()
