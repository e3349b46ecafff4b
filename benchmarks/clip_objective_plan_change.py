"""How much a CLIP plan changes when D scores what SD3 reads (issue 25, item 1).

SD3 reads its CLIP encoders' penultimate layer (hidden_states[-2]) at all 77 positions and the projected pooled
text_embeds, unmasked; a generic calibration scores the last hidden state over real tokens. This calibrates the same
CLIP (random weights, Hugging Face init, seed 0) on the same prompts under both objectives, then scores each plan under
both (how much worse the generic plan is for SD3).

    python benchmarks/clip_objective_plan_change.py     # 8-block CLIP with projection, hidden 128, MiniLM's tokenizer

Writes benchmarks/results/clip-objective-plan-change.json. The prompts go through MiniLM's WordPiece tokenizer ([CLS]
101 as bos, [SEP] 102 as eos, pad 0); the built-in prompts are longer than 77 tokens, so they are truncated as SD3
truncates and hold no padding: the empty prompt's 75 padded positions are where padding counts.
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
from skrr_export.recipes import CLIP_PIPELINES, default_model_path

RESULTS = Path(__file__).parent / "results" / "clip-objective-plan-change.json"


def small_clip(folder: Path) -> Path:
    """CLIPTextModelWithProjection, random weights (seed 0): 8 blocks, hidden 128, MiniLM's tokenizer beside it."""
    from transformers import AutoConfig, CLIPTextConfig, CLIPTextModelWithProjection

    vocab = AutoConfig.from_pretrained(default_model_path()).vocab_size
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=8,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=128, bos_token_id=101,
                            eos_token_id=102, pad_token_id=0, architectures=["CLIPTextModelWithProjection"])
    CLIPTextModelWithProjection(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (default_model_path() / name).is_file():
            shutil.copy(default_model_path() / name, folder / name)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.08, 0.15])
    args = p.parse_args()
    torch.set_num_threads(1)
    record: dict[str, object] = {"machine": f"{platform.machine()}, torch threads 1", "torch": torch.__version__,
                                 "settings": vars(args)}
    calls = {"generic": None, "sd3": CLIP_PIPELINES["sd3"]}
    with tempfile.TemporaryDirectory() as tmp:
        model = small_clip(Path(tmp) / "clip")
        base = CalibrationConfig(out=Path(tmp) / "plan.json", sparsities=tuple(args.sparsity), model=model,
                                 num_prompts=args.num_prompts, max_length=77, batch_size=8, force=True)
        plans, scorers = {}, {}
        for name, call in calls.items():
            cfg = replace(base, out=Path(tmp) / f"{name}.json", pipeline=call)
            start = time.perf_counter()
            plans[name] = calibrate(cfg)
            record[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
            scorers[name] = _scorer(_prepare(cfg), cfg)
        for target in args.sparsity:
            record[str(target)] = compare(plans, scorers, target)
            print(target, json.dumps(record[str(target)], indent=1), flush=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {RESULTS}")


def compare(plans: dict, scorers: dict, target: float) -> dict[str, object]:
    g, s = plans["generic"][target], plans["sd3"][target]
    scored = {objective: {plan: scorer.discrepancy(schedule_of(scorer.num_slots, p.skip, p.reuse))
                          for plan, p in (("generic_plan", g), ("sd3_plan", s))} for objective, scorer in scorers.items()}
    return {
        "generic_plan": {"skip": list(g.skip), "reuse": g.reuse, "sparsity": g.sparsity},
        "sd3_plan": {"skip": list(s.skip), "reuse": s.reuse, "sparsity": s.sparsity},
        "skip_jaccard": round(len(set(g.skip) & set(s.skip)) / len(set(g.skip) | set(s.skip)), 3),
        "same_reuse": g.reuse == s.reuse,
        "D": scored,
        "sd3_D_of_generic_plan_over_sd3_plan": scored["sd3"]["generic_plan"] / scored["sd3"]["sd3_plan"],
    }


if __name__ == "__main__":
    main()
