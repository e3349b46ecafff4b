"""How much the calibrated plan changes when the padding positions count (issue 25, item 3).

SD3 and FLUX run T5 without a mask on prompts padded to 256 / 512 tokens, so the denoiser reads every padded position;
PixArt-Sigma masks. This calibrates the same model on the same prompts twice: D over real tokens (masked, prompts
padded to the longest) and D over every position (unmasked, padded to --length as SD3 pads), then scores each plan
under both objectives (how much worse the masked plan is where the pipeline runs unmasked).

    python benchmarks/padding_plan_change.py            # small T5 (random weights, 8 blocks, d_model 64) and MiniLM

Writes benchmarks/results/padding-plan-change.json. Both models read the prompts through MiniLM's tokenizer (the T5
has MiniLM's vocabulary size); pad id 0 in both.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from skrr_export.calibrate import CalibrationConfig, _prepare, _scorer, calibrate, schedule_of
from skrr_export.recipes import PipelineCall, default_model_path

RESULTS = Path(__file__).parent / "results" / "padding-plan-change.json"


def small_t5(folder: Path, vocab: int) -> Path:
    """T5 with random weights (Hugging Face init, seed 0): 8 blocks, d_model 64, MiniLM's tokenizer beside it."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=8, num_heads=4,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    T5EncoderModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (default_model_path() / name).is_file():
            shutil.copy(default_model_path() / name, folder / name)
    return folder


def plans_for(model: Path, out: Path, args: argparse.Namespace, sparsities: list[float]) -> dict[str, object]:
    """Calibrate masked and unmasked; score both plans under both objectives."""
    unmasked = PipelineCall("sd3-like", False, args.length, ("last_hidden_state",))
    calls = {"masked": replace(unmasked, name="pixart-like", attention_mask=True), "unmasked": unmasked}
    base = CalibrationConfig(out=out / "plan.json", sparsities=tuple(sparsities), model=model,
                             num_prompts=args.num_prompts, max_length=args.length, batch_size=args.batch_size, force=True)
    result: dict[str, object] = {}
    plans, scorers = {}, {}
    for name, call in calls.items():
        cfg = replace(base, out=out / f"{name}.json", pipeline=call)
        start = time.perf_counter()
        plans[name] = calibrate(cfg)
        result[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
        scorers[name] = _scorer(_prepare(cfg), cfg)
    for target in sparsities:
        result[str(target)] = compare(plans, scorers, target)
    return result


def compare(plans: dict, scorers: dict, target: float) -> dict[str, object]:
    m, u = plans["masked"][target], plans["unmasked"][target]
    both = set(m.skip) & set(u.skip)
    scored = {}
    for objective, scorer in scorers.items():
        n = scorer.num_slots
        scored[objective] = {plan: scorer.discrepancy(schedule_of(n, p.skip, p.reuse)) for plan, p in (("masked_plan", m),
                                                                                                     ("unmasked_plan", u))}
    return {
        "masked_plan": {"skip": list(m.skip), "reuse": m.reuse, "sparsity": m.sparsity},
        "unmasked_plan": {"skip": list(u.skip), "reuse": u.reuse, "sparsity": u.sparsity},
        "same_skip_set": set(m.skip) == set(u.skip),
        "skip_jaccard": round(len(both) / len(set(m.skip) | set(u.skip)), 3),
        "same_reuse": m.reuse == u.reuse,
        "D": scored,
        "unmasked_D_of_masked_plan_over_unmasked_plan": scored["unmasked"]["masked_plan"] / scored["unmasked"]["unmasked_plan"],
        "masked_D_of_unmasked_plan_over_masked_plan": scored["masked"]["unmasked_plan"] / scored["masked"]["masked_plan"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--length", type=int, default=256, help="the unmasked pipeline's padded length (SD3: 256)")
    p.add_argument("--batch-size", type=int, default=8)
    # the small T5's 30522 x 64 embedding is 85 % of its parameters: its sub-blocks reach 13.7 % at most
    p.add_argument("--t5-sparsity", type=float, nargs="+", default=[0.06, 0.1])
    p.add_argument("--minilm-sparsity", type=float, nargs="+", default=[0.1, 0.2])
    args = p.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(default_model_path()).vocab_size
    record: dict[str, object] = {"machine": f"{platform.machine()}, torch threads 1", "torch": torch.__version__,
                                 "settings": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"t5-8x64-random": (small_t5(Path(tmp) / "t5", vocab), args.t5_sparsity),
                  "minilm": (default_model_path(), args.minilm_sparsity)}
        for name, (model, sparsities) in models.items():
            (Path(tmp) / name).mkdir()
            record[name] = plans_for(model, Path(tmp) / name, args, sparsities)
            RESULTS.write_text(json.dumps(record, indent=2) + "\n")  # after each model: a partial run keeps the first
            print(name, json.dumps(record[name], indent=1), flush=True)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
