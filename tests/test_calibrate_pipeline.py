"""Calibration for a pipeline's encoder call (issue 25, item 3): SD3/FLUX run T5 unmasked on prompts padded to the
pipeline's length, so D covers every position; PixArt-Sigma masks, so D covers real tokens. The reference is the
Hugging Face model itself with one feed-forward sub-block replaced by the identity, run as the pipeline runs it."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from torch import nn

from skrr_export.calibrate import CalibrationConfig, _prepare, _scorer, calibrate, schedule_of
from skrr_export.cli import main
from skrr_export.recipes import PipelineCall

from .test_pipelines_diffusers import word_tokenizer

LENGTH = 16
UNMASKED = PipelineCall("sd3", False, LENGTH, ("last_hidden_state",), "text_encoder_3")
PROMPTS = ["a red fox asleep in the snow", "an astronaut riding a horse", "the snow", "a horse in the snow asleep"]


@pytest.fixture(scope="module")
def t5_with_tokenizer(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5-tok") / "t5"
    shutil.copytree(tiny_models["t5"][1], folder)
    word_tokenizer(bos=False).save_pretrained(folder)
    (folder.parent / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return folder


def config(folder, out, pipeline, batch_size=4):
    return CalibrationConfig(out=out, sparsities=(0.2,), model=folder, prompts=folder.parent / "prompts.txt",
                             max_length=LENGTH, batch_size=batch_size, pipeline=pipeline, force=True)


def reference_d(folder, skipped_block: int, masked: bool) -> float:
    """D by hand: the Hugging Face model with block ``skipped_block``'s feed-forward replaced by the identity against
    the dense one, on the prompts and the empty prompt padded as the pipeline pads them (masked: to the longest
    prompt, real tokens scored; unmasked: to LENGTH, every position scored)."""
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(folder)
    dense = T5EncoderModel.from_pretrained(folder).eval()
    pruned = T5EncoderModel.from_pretrained(folder).eval()
    pruned.encoder.block[skipped_block].layer[1] = nn.Identity()
    total = 0.0
    for texts in (PROMPTS, [""]):
        enc = tokenizer(texts, truncation=True, max_length=LENGTH, return_tensors="pt",
                        padding=True if masked else "max_length")
        mask = enc["attention_mask"] if masked else None
        with torch.no_grad():
            a, b = (m(enc["input_ids"], attention_mask=mask)[0].double() for m in (dense, pruned))
        keep = enc["attention_mask"].bool() if masked else torch.ones_like(enc["input_ids"], dtype=torch.bool)
        total += float(((a - b)[keep] ** 2).mean())
    return total


@pytest.mark.parametrize("pipeline", [UNMASKED, replace(UNMASKED, name="pixart-sigma", attention_mask=True)],
                         ids=["unmasked", "masked"])
def test_d_follows_the_pipelines_call_and_does_not_depend_on_the_batching(t5_with_tokenizer, tmp_path, pipeline):
    folder = t5_with_tokenizer
    ds = []
    for batch_size in (4, 1):
        scorer = _scorer(_prepare(cfg := config(folder, tmp_path / "p.json", pipeline, batch_size)), cfg)
        ds.append(scorer.discrepancy(schedule_of(scorer.num_slots, (3,))))  # slot 3: block 1's feed-forward
    expected = reference_d(folder, 1, pipeline.attention_mask)
    assert ds[0] == pytest.approx(expected, rel=1e-5)
    assert ds[1] == pytest.approx(ds[0], rel=1e-6)
    other = reference_d(folder, 1, not pipeline.attention_mask)
    assert abs(other - expected) > 1e-3 * expected  # the two objectives differ: the test can tell them apart


def test_plans_carry_the_pipeline_and_the_cli_picks_it(t5_with_tokenizer, tmp_path, capsys):
    folder = t5_with_tokenizer
    plan = calibrate(config(folder, tmp_path / "plan.json", UNMASKED))[0.2]
    assert plan.provenance["pipeline"] == UNMASKED.to_json()
    assert "every position (padded to 16" in plan.provenance["metric"]
    out = tmp_path / "cli.json"
    args = ["calibrate", "--model", str(folder), "--prompts", str(folder.parent / "prompts.txt"), "--out", str(out),
            "--sparsity", "0.2", "-q"]
    assert main([*args, "--pipeline", "sd3", "--max-length", "16"]) == 2
    assert "the sd3 pipeline pads its prompts to 256 and runs the encoder unmasked" in capsys.readouterr().err
    assert main([*args, "--pipeline", "pixart-sigma", "--max-length", "16"]) == 0
    provenance = json.loads(out.read_text())["provenance"]
    assert provenance["pipeline"]["name"] == "pixart-sigma" and "every real token" in provenance["metric"]
