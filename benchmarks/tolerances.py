"""Parity errors of correct exports, and of exports with a planted wiring error, per precision: where the
default tolerances come from.

  python benchmarks/tolerances.py [--only t5] [--precisions fp32,fp16,bf16]

Models: the real all-MiniLM-L6-v2 (recipes/minilm); 24-block T5, UMT5 (T5-v1.1-base width: d_model 768,
d_ff 2048, 12 heads) and CLIP text (CLIP-L width: 768, 3072, 12 heads) with random weights from their
initializers. Plans: the PixArt-Sigma 41.9 % plan (T5, UMT5), a re-use-heavy plan (CLIP), the recipe's (MiniLM).
Batches: the main job's (tokenized prompts for MiniLM, seeded random ids with padding otherwise, each with the
empty prompt apart); T5/UMT5 at a fixed sequence of 300, CLIP at 77, as their recipes export.

Each check runs as the main job runs it on a machine without CUDA: fp32 and fp16 on ONNX Runtime's CPU provider
against PyTorch in the same precision; bf16 as "bf16-as-fp32" (the graph and PyTorch both compute in fp32 on
the bf16 weights). The planted error rewires the last MatMul that reads a re-used weight to the same weight of
another sub-block (tests/helpers.py: plant_wiring_error). Writes benchmarks/results/tolerances-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIDE = {"d_model": 768, "d_ff": 2048, "num_heads": 12, "d_kv": 64, "vocab_size": 32128}
T5 = {"architectures": ["T5EncoderModel"], "model_type": "t5", "num_layers": 24, "feed_forward_proj": "gated-gelu",
      "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "is_encoder_decoder": False,
      "use_cache": False, "layer_norm_epsilon": 1e-6, "eos_token_id": 1, "pad_token_id": 0, **WIDE}
UMT5 = T5 | {"architectures": ["UMT5EncoderModel"], "model_type": "umt5"}
CLIP = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 768,
        "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 24, "max_position_embeddings": 77,
        "vocab_size": 49408, "hidden_act": "quick_gelu", "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1}
PIXART = json.loads((ROOT / "recipes" / "pixart-sigma-41.9" / "plan.json").read_text())
CLIP_PLAN = {"format": "skrr-plan/1", "encoder": {"family": "clip", "num_blocks": 24},
             "skip": [20, 21, 22, 23, 30, 31, 40, 41, 9, 13], "reuse": {"20": 18, "22": 24, "31": 29, "41": 39, "9": 7}}
MODELS = {  # name -> (config or None for MiniLM, plan, fixed sequence)
    "minilm": (None, json.loads((ROOT / "recipes" / "minilm" / "plan.json").read_text()), None),
    "t5": (T5, PIXART, 300),
    "umt5": (UMT5, PIXART | {"encoder": {"family": "umt5", "num_blocks": 24}}, 300),
    "clip": (CLIP, CLIP_PLAN, 77),
}


def stats(result: dict) -> list[dict]:
    """Per output: the errors (not the verdict, which depends on the tolerance used here)."""
    keys = ("name", "max_abs", "mean_abs", "max_rel", "min_cosine", "mean_cosine", "max_token_error")
    return [{k: o[k] for k in keys} for o in result["outputs"]]


def run_case(name: str, precision: str, work: Path) -> dict:
    from skrr_export.apply import apply_plan
    from skrr_export.compare import Tolerance, runner_parity
    from skrr_export.export import ExportOptions, export_onnx
    from skrr_export.inputs import load_tokenizer, prompt_batch
    from skrr_export.model import ModelSource, default_model_path, load_encoder
    from skrr_export.pipeline import ort_check, reference_outputs
    from skrr_export.plan import parse_plan
    from tests.helpers import plant_wiring_error

    config, plan_json, seq = MODELS[name]
    folder = work / name
    folder.mkdir(exist_ok=True)
    if config is None:
        source = ModelSource(default_model_path())
    else:
        (folder / "config.json").write_text(json.dumps(config))
        source = ModelSource(folder, random_weights=True)
    plan = parse_plan({k: v for k, v in plan_json.items() if k != "sparsity"})  # stated for the full-width model
    module = apply_plan(load_encoder(source, plan, precision), plan)
    tokenizer = load_tokenizer(source)  # None with random weights: random ids
    batches = prompt_batch(tokenizer, _config(source), "int64", seq)
    check = ort_check(precision)
    reference = reference_outputs(module, batches, fp32_arithmetic=check.fp32_arithmetic)
    out = folder / precision
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    onnx_path = export_onnx(module, out / "model.onnx", ExportOptions(fixed_sequence=seq), _config(source).vocab_size).path
    del module
    everything = {"*": Tolerance(atol=1e9, rtol=0.0, min_cosine=-1.0)}  # record errors, judge nothing
    correct = runner_parity(reference, check.runner(onnx_path), batches, everything, check.reference)
    planted_what = plant_wiring_error(onnx_path)
    planted = runner_parity(reference, check.runner(onnx_path), batches, everything, check.reference)
    scale = {b.label: {n: float(np.abs(v).max()) for n, v in reference[b.label].items()} for b in batches}
    shutil.rmtree(out, ignore_errors=True)
    return {"model": name, "precision": precision, "check": check.name,
            "method": check.method, "reference_max_abs": scale, "planted": planted_what,
            "correct": {r["batch"]: stats(r) for r in correct}, "wiring_error": {r["batch"]: stats(r) for r in planted}}


def _config(source):  # type: ignore[no-untyped-def]
    from skrr_export.model import load_config

    config = load_config(source)
    return getattr(config, "text_config", config)


def main() -> None:
    import onnxruntime
    import torch
    import transformers

    p = argparse.ArgumentParser()
    p.add_argument("--only", help="comma-separated models (default: all)")
    p.add_argument("--precisions", default="fp32,fp16,bf16")
    args = p.parse_args()
    names = args.only.split(",") if args.only else list(MODELS)
    out = ROOT / "benchmarks" / "results" / "tolerances-cpu.json"
    previous = json.loads(out.read_text())["runs"] if out.is_file() else []
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for precision in args.precisions.split(","):
                row = run_case(name, precision, Path(tmp))
                print(json.dumps({k: row[k] for k in ("model", "check", "correct", "wiring_error")}), flush=True)
                runs.append(row)
    done = {(r["model"], r["precision"]) for r in runs}
    record = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU", "python": platform.python_version(),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "onnxruntime": onnxruntime.__version__,
              "runs": [r for r in previous if (r["model"], r["precision"]) not in done] + runs}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
