"""Calibration for a pipeline's encoder call (issue 25, item 3): SD3/FLUX run T5 unmasked on prompts padded to the
pipeline's length, so D covers every position; PixArt-Sigma masks, so D covers real tokens. The reference is the
Hugging Face model itself with one feed-forward sub-block replaced by the identity, run as the pipeline runs it."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
from torch import nn

from skrr_export.calibrate import CalibrationConfig, _prepare, _scorer, branched, calibrate, schedule_of
from skrr_export.cli import main
from skrr_export.recipes import CLIP_PIPELINES, PipelineCall

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


# ----------------------------------------------------------------- CLIP: what SD3 and FLUX read (issue 25 item 1)

SD3_CLIP = replace(CLIP_PIPELINES["sd3"], max_length=LENGTH)
FLUX_CLIP = replace(CLIP_PIPELINES["flux"], max_length=LENGTH)


@pytest.fixture(scope="module")
def clip_folders(tiny_models, tmp_path_factory):
    """The tiny CLIPTextModelWithProjection (SD3's) and CLIPTextModel (FLUX's), 3 blocks = 6 slots each, with a word
    tokenizer (bos 3, eos 4, pad 1)."""
    out = {}
    for family in ("clip-projection", "clip"):
        folder = tmp_path_factory.mktemp(f"{family}-tok") / family
        shutil.copytree(tiny_models[family][1], folder)
        word_tokenizer(bos=True).save_pretrained(folder)
        (folder.parent / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        out[family] = folder
    return out


def clip_scorer(folder, tmp_path, pipeline):
    return _scorer(_prepare(cfg := config(folder, tmp_path / "p.json", pipeline)), cfg)


def sd3_clip_reference(folder, pruned) -> float:
    """SD3's D by hand from Hugging Face: MSE of hidden_states[-2] over all LENGTH positions + MSE of text_embeds,
    on the prompts and on "", padded to LENGTH as _get_clip_prompt_embeds pads them (no mask)."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    tokenizer = AutoTokenizer.from_pretrained(folder)
    dense = CLIPTextModelWithProjection.from_pretrained(folder).eval()
    total = 0.0
    for texts in (PROMPTS, [""]):
        ids = tokenizer(texts, padding="max_length", max_length=LENGTH, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            a, b = (m(ids, output_hidden_states=True) for m in (dense, pruned))
        total += float(((a.hidden_states[-2] - b.hidden_states[-2]).double() ** 2).mean())
        total += float(((a.text_embeds - b.text_embeds).double() ** 2).mean())
    return total


def hf_pruned(folder, drop_last_block: bool = False, identity_slot: int | None = None):
    """The Hugging Face model pruned by hand: the last block removed (its layer list one shorter, so hidden_states
    ends one earlier), or one sub-block's body made zero (attention or MLP output 0 = the slot skipped)."""
    from transformers import CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection.from_pretrained(folder).eval()
    layers = model.text_model.encoder.layers
    if drop_last_block:
        model.text_model.encoder.layers = layers[:-1]
    if identity_slot is not None:
        layer = layers[identity_slot // 2]
        if identity_slot % 2:
            layer.mlp.forward = lambda x: torch.zeros_like(x)
        else:
            layer.self_attn.forward = lambda hidden_states, **kw: (torch.zeros_like(hidden_states), None)
    return model


def test_sd3_clip_d_is_the_penultimate_layer_and_text_embeds_as_sd3_reads_them(clip_folders, tmp_path):
    """D of SD3's CLIP call equals the hand-computed sum over hidden_states[-2] (every padded position) and
    text_embeds; with the whole last block skipped the penultimate layer is Hugging Face's hidden_states[-2] of the
    model without that block (the output of block 0), and the search's branch scoring agrees with running it whole."""
    folder = clip_folders["clip-projection"]
    scorer = clip_scorer(folder, tmp_path, SD3_CLIP)
    n = scorer.num_slots
    assert scorer.discrepancy(schedule_of(n, (1,))) == pytest.approx(
        sd3_clip_reference(folder, hf_pruned(folder, identity_slot=1)), rel=1e-5)
    assert scorer.discrepancy(schedule_of(n, (4, 5))) == pytest.approx(
        sd3_clip_reference(folder, hf_pruned(folder, drop_last_block=True)), rel=1e-5)
    base = schedule_of(n, (4,))  # block 2 runs only its MLP; skipping slot 5 too moves the penultimate layer
    branches = [(5, None), (3, None), (1, None), (4, 2)]
    fast = scorer.score(base, branches)
    assert fast == pytest.approx(scorer.score_full([branched(base, b) for b in branches]), rel=1e-6)


@pytest.fixture(scope="module")
def clip_scorers(clip_folders, tmp_path_factory):
    """One scorer per CLIP call, shared: SD3's on CLIPTextModelWithProjection, FLUX's on CLIPTextModel."""
    tmp = tmp_path_factory.mktemp("clip-scorers")
    return {"sd3": clip_scorer(clip_folders["clip-projection"], tmp, SD3_CLIP),
            "flux": clip_scorer(clip_folders["clip"], tmp, FLUX_CLIP)}


@contextmanager
def planted_head(scorer, output: str, where: str, eps: float = 0.1):
    """After the dense reference is taken: the head adds ``eps`` to one output (at every position, or only where
    every prompt is padding), a difference nothing upstream of it makes; restored on leaving."""
    names = scorer.model.output_names
    head = scorer.model.head
    original = head.forward

    def forward(hidden, penultimate, ctx):
        outs = list(original(hidden, penultimate, ctx))
        i = names.index(output)
        delta = torch.full_like(outs[i], eps)
        if where == "padding":
            delta[:, :LENGTH // 2] = 0  # every prompt here is shorter than LENGTH // 2 tokens
        outs[i] = outs[i] + delta
        return tuple(outs)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward  # the class's forward again


@pytest.mark.parametrize("pipeline, output, where, seen", [
    (SD3_CLIP, "penultimate_hidden_state", "padding", True),  # the joint transformer reads the padded positions
    (SD3_CLIP, "text_embeds", "all", True),
    (SD3_CLIP, "last_hidden_state", "all", False),  # SD3 does not read it
    (FLUX_CLIP, "pooler_output", "all", True),
    (FLUX_CLIP, "penultimate_hidden_state", "all", False),
], ids=["sd3-penultimate-padding", "sd3-pooled", "sd3-last", "flux-pooled", "flux-penultimate"])
def test_clip_d_sees_exactly_the_outputs_its_pipeline_reads(clip_scorers, pipeline, output, where, seen):
    """A difference planted in one output only: D sees it (by exactly its share of MSE) where the pipeline reads that
    output, and not at all where it does not."""
    scorer = clip_scorers[pipeline.name]
    dense = schedule_of(scorer.num_slots, ())
    assert scorer.discrepancy(dense) == 0.0
    share = 0.5 if where == "padding" else 1.0  # the padded half of the positions
    expected = 2 * 0.1 ** 2 * share if seen else 0.0  # the prompts' term and the empty prompt's
    with planted_head(scorer, output, where):
        assert scorer.discrepancy(dense) == pytest.approx(expected, rel=1e-4, abs=1e-12)


@pytest.fixture(scope="module")
def clip77(tmp_path_factory):
    """A tiny CLIPTextModel with CLIP's 77 positions (the length SD3 and FLUX pad their CLIP prompts to)."""
    from transformers import CLIPTextModel

    from .helpers import tiny_config

    config = tiny_config("clip")
    config.max_position_embeddings = 77
    folder = tmp_path_factory.mktemp("clip77") / "text_encoder"
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(folder)
    word_tokenizer(bos=True).save_pretrained(folder)
    (folder.parent / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return folder


@pytest.mark.parametrize("extra, message", [
    (["--pipeline", "pixart-sigma"], "the pixart-sigma pipeline calls no clip encoder"),
    (["--pipeline", "sd3"], "the sd3 pipeline reads text_embeds from its clip encoder, which this model does not output"),
    (["--pipeline", "flux", "--max-length", "16"], "the flux pipeline pads its prompts to 77"),
    (["--pipeline", "flux", "--random-ids", "--negative-prompt", "ugly"], "token ids for it need a tokenizer"),
], ids=["no-clip-in-pixart", "sd3-needs-projection", "flux-length", "negative-needs-tokenizer"])
def test_clip_pipeline_requests_it_cannot_serve_are_one_line_and_exit_2(clip77, tmp_path, capsys, extra, message):
    args = ["calibrate", "--model", str(clip77), "--prompts", str(clip77.parent / "prompts.txt"),
            "--out", str(tmp_path / "p.json"), "--sparsity", "0.2", "-q", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_the_cli_calibrates_fluxs_clip_call_with_a_negative_prompt(clip77, tmp_path):
    """--pipeline flux on a CLIP model: FLUX's CLIP call (unmasked, 77 positions, pooler_output only), the negative
    prompt in D's second term, both in the plan's provenance."""
    out = tmp_path / "plan.json"
    assert main(["calibrate", "--model", str(clip77.parent), "--subfolder", "text_encoder", "--prompts",
                 str(clip77.parent / "prompts.txt"), "--out", str(out), "--sparsity", "0.2", "--pipeline", "flux",
                 "--negative-prompt", "the snow", "-q"]) == 0
    provenance = json.loads(out.read_text())["provenance"]
    assert provenance["pipeline"] == CLIP_PIPELINES["flux"].to_json()
    assert provenance["negative_prompt"] == "the snow" and provenance["max_length"] == 77
    assert provenance["metric"].startswith("MSE(dense, pruned) of pooler_output over every position (padded to 77")


@pytest.mark.parametrize("family", ["t5", "clip"])
def test_candidates_stacked_on_the_batch_axis_score_as_run_alone_without_a_mask(family, t5_with_tokenizer, clip_folders,
                                                                                tmp_path):
    """The GPU path (candidates stacked on the batch axis) on an unmasked call: SD3's T5 (no mask at all) and SD3's
    CLIP (a causal mask with one row) give every candidate the D it has when run alone from the stem."""
    folder, pipeline = (t5_with_tokenizer, UNMASKED) if family == "t5" else (clip_folders["clip-projection"], SD3_CLIP)
    scorer = _scorer(_prepare(cfg := config(folder, tmp_path / "p.json", pipeline)), cfg)
    scorer.width = 3
    base = schedule_of(scorer.num_slots, (2,))
    branches = [(j, None) for j in range(scorer.num_slots) if j != 2]
    expected = scorer.score_full([branched(base, b) for b in branches])
    assert scorer.score(base, branches) == pytest.approx(expected, rel=1e-5)
