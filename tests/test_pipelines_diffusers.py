"""The exported graphs stand in for the encoders inside diffusers' own encode functions (issue 25, item 6).

SD3 (``_get_t5_prompt_embeds``, ``_get_clip_prompt_embeds``), FLUX (the same two) and PixArt-Sigma
(``encode_prompt``) feed the encoder what they feed it and read what they read; the stand-in hands ONNX Runtime
exactly those inputs (ONNX Runtime refuses a missing or an unknown one) and answers with the graph's outputs under
Hugging Face's output field names. The independent reference is the Hugging Face model itself through the same
function: its embeddings must come back at every position the pipeline hands the denoiser, padding included.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from skrr_export.apply import apply_plan
from skrr_export.export import ExportOptions, export_onnx
from skrr_export.model import load_encoder, model_source
from skrr_export.plan import Plan
from skrr_export.recipes import PIPELINES

from .helpers import build_reference_model

diffusers = pytest.importorskip("diffusers", reason="diffusers is in the test extra (pip install -e .[test])")

LENGTH = 16  # the pipelines' max_sequence_length / tokenizer_max_length, shortened for tiny models
PROMPTS = ["a red fox asleep in the snow", "an astronaut riding a horse"]
WORDS = "a red fox asleep in the snow an astronaut riding horse".split()
CPU = torch.device("cpu")


def refused():
    """ONNX Runtime's errors for a feed the graph does not take: a missing input (ValueError), an unknown one."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    return pytest.raises((ValueError, InvalidArgument), match="attention_mask")


def word_tokenizer(bos: bool):
    """A word-level tokenizer over the tiny vocabulary: pad 1 (CLIP's) or 0 (T5's), eos 4 at the end, bos 3 first
    for CLIP; built in memory (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0 if not bos else 1, "<unk>": 2, "<bos>": 3, "<eos>": 4} | {w: 5 + i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "<bos> $A <eos>" if bos else "$A <eos>"
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<bos>", 3), ("<eos>", 4)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   bos_token="<bos>" if bos else None)


class OnnxStandIn(nn.Module):
    """The exported graph as a pipeline's text encoder: feeds ONNX Runtime exactly the tensors the pipeline passes
    and answers with Hugging Face's output class for the graph's output names. ``hidden_states`` holds only what
    the export offers: index -2, the penultimate layer (any other index reads None or fails)."""

    def __init__(self, path: Path):
        super().__init__()
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        self.fed: list[list[str]] = []
        self.dtype, self.device = torch.float32, CPU

    def calls(self) -> list[list[str]]:
        """The input names of every call since the last time asked."""
        fed, self.fed = self.fed, []
        return fed

    def forward(self, input_ids, attention_mask=None, output_hidden_states=None):
        feed = {"input_ids": input_ids.numpy()} | ({} if attention_mask is None else {"attention_mask": attention_mask.numpy()})
        self.fed.append(sorted(feed))
        out = dict(zip(self.names, (torch.from_numpy(v) for v in self.session.run(None, feed))))
        hidden = (out["penultimate_hidden_state"], None) if output_hidden_states else None
        return hf_output(out, hidden)


def hf_output(out: dict[str, torch.Tensor], hidden: tuple | None):
    from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
    from transformers.models.clip.modeling_clip import CLIPTextModelOutput

    if "text_embeds" in out:
        return CLIPTextModelOutput(text_embeds=out["text_embeds"], last_hidden_state=out["last_hidden_state"],
                                   hidden_states=hidden)
    if "pooler_output" in out:
        return BaseModelOutputWithPooling(out["last_hidden_state"], out["pooler_output"], hidden_states=hidden)
    return BaseModelOutput(out["last_hidden_state"], hidden_states=hidden)


def exported(tiny_models, family: str, folder: Path, attention_mask: bool, plan: Plan | None = None) -> OnnxStandIn:
    """The family's tiny model exported the way ``attention_mask`` says, at the pipelines' fixed length."""
    _, model_dir = tiny_models[family]
    source = model_source(model_dir, random_weights=False)
    plan = plan or Plan.dense(family.split("-")[0], 3)
    enc = load_encoder(source, plan, "fp32")
    module = apply_plan(enc, plan, attention_mask)
    path = folder / f"{family}-{'mask' if attention_mask else 'nomask'}.onnx"
    export_onnx(module, path, ExportOptions(fixed_sequence=LENGTH), enc.adapter.sizes(enc.config).vocab)
    return OnnxStandIn(path)


def pipeline(cls, **parts):
    """A pipeline object without __init__ (no hub, no transformer): only the parts its encode functions read."""
    pipe = cls.__new__(cls)
    for name, value in parts.items():
        object.__setattr__(pipe, name, value)
    return pipe


def hf(family: str) -> nn.Module:
    """The independent reference: the same tiny Hugging Face model (seed 0), fully in memory."""
    return build_reference_model(family)


@pytest.fixture(scope="module")
def t5_standins(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5-pipelines")
    return {mask: exported(tiny_models, "t5", folder, mask) for mask in (False, True)}


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_unmasked_t5_export_is_what_sd3_and_flux_feed_and_read(name, t5_standins):
    """SD3 and FLUX call T5 with input_ids only, padded to max_sequence_length: the export without the mask takes
    exactly that, and the embeddings equal the Hugging Face model's at every position (the padding the joint
    transformer reads included). The export with the mask cannot stand in: ONNX Runtime refuses the call."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    call = PIPELINES[name]
    assert call.attention_mask is False and call.outputs == ("last_hidden_state",)
    cls, attr, tok_attr = ((StableDiffusion3Pipeline, "text_encoder_3", "tokenizer_3") if name == "sd3"
                           else (FluxPipeline, "text_encoder_2", "tokenizer_2"))
    tokenizer = word_tokenizer(bos=False)

    def embeds(encoder):
        pipe = pipeline(cls, **{attr: encoder, tok_attr: tokenizer, "text_encoder": encoder, "tokenizer_max_length": LENGTH})
        return pipe._get_t5_prompt_embeds(PROMPTS + [""], max_sequence_length=LENGTH, device=CPU, dtype=torch.float32)

    with torch.no_grad():
        reference = embeds(hf("t5"))
    standin = t5_standins[False]
    standin.calls()  # forget the calls of earlier tests
    got = embeds(standin)
    assert standin.calls() == [["input_ids"]]
    assert got.shape == reference.shape == (3, LENGTH, 32)
    padded = (tokenizer(PROMPTS + [""], padding="max_length", max_length=LENGTH, return_tensors="pt").attention_mask == 0)
    assert padded.sum() > LENGTH  # most positions are padding, and they are compared too
    np.testing.assert_allclose(got.numpy(), reference.numpy(), rtol=0, atol=2e-5)
    with refused():
        embeds(t5_standins[True])


def test_masked_t5_export_is_what_pixart_sigma_feeds_and_reads(t5_standins):
    """PixArt-Sigma passes the mask (prompt and negative prompt, padded to max_sequence_length): the masked export
    takes both inputs and matches the Hugging Face model on the real tokens (the transformer masks the rest)."""
    from diffusers import PixArtSigmaPipeline

    assert PIPELINES["pixart-sigma"].attention_mask is True
    tokenizer = word_tokenizer(bos=False)

    def encode(encoder):
        pipe = pipeline(PixArtSigmaPipeline, text_encoder=encoder, tokenizer=tokenizer, transformer=None)
        return pipe.encode_prompt(PROMPTS, negative_prompt="", device=CPU, max_sequence_length=LENGTH)

    with torch.no_grad():
        ref_embeds, ref_mask, ref_neg, ref_neg_mask = encode(hf("t5"))
    standin = t5_standins[True]
    standin.calls()  # forget the calls of earlier tests
    embeds, mask, neg, neg_mask = encode(standin)
    assert standin.calls() == [["attention_mask", "input_ids"]] * 2  # prompts, then the negative prompt
    for got, ref, m in ((embeds, ref_embeds, mask), (neg, ref_neg, neg_mask)):
        real = m.bool()
        np.testing.assert_allclose(got[real].numpy(), ref[real].numpy(), rtol=0, atol=2e-5)
    with refused():
        encode(t5_standins[False])


@pytest.fixture(scope="module")
def clip_standins(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip-pipelines")
    return {family: exported(tiny_models, family, folder, False) for family in ("clip", "clip-projection")}


def test_clip_export_is_what_sd3_reads_penultimate_and_projected(clip_standins):
    """SD3's CLIP call: input_ids only, hidden_states[-2] (the penultimate layer) and output [0] (the projected
    pooled text_embeds of CLIPTextModelWithProjection); both equal the Hugging Face model's."""
    from diffusers import StableDiffusion3Pipeline

    tokenizer = word_tokenizer(bos=True)

    def embeds(encoder):
        pipe = pipeline(StableDiffusion3Pipeline, text_encoder=encoder, text_encoder_2=encoder, tokenizer=tokenizer,
                        tokenizer_2=tokenizer, tokenizer_max_length=LENGTH)
        return pipe._get_clip_prompt_embeds(PROMPTS, device=CPU, clip_model_index=0)

    with torch.no_grad():
        ref_states, ref_pooled = embeds(hf("clip-projection"))
    standin = clip_standins["clip-projection"]
    standin.calls()  # forget the calls of earlier tests
    states, pooled = embeds(standin)
    assert standin.calls() == [["input_ids"]]
    assert pooled.shape == ref_pooled.shape == (2, 16) and states.shape == (2, LENGTH, 32)
    np.testing.assert_allclose(states.numpy(), ref_states.numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(pooled.numpy(), ref_pooled.numpy(), rtol=0, atol=2e-5)


def test_clip_export_is_what_flux_reads_pooler_output(clip_standins):
    """FLUX reads CLIPTextModel's pooler_output only, from input_ids padded to tokenizer_max_length."""
    from diffusers import FluxPipeline

    tokenizer = word_tokenizer(bos=True)

    def embeds(encoder):
        pipe = pipeline(FluxPipeline, text_encoder=encoder, tokenizer=tokenizer, tokenizer_max_length=LENGTH)
        return pipe._get_clip_prompt_embeds(PROMPTS, device=CPU)

    with torch.no_grad():
        reference = embeds(hf("clip"))
    standin = clip_standins["clip"]
    standin.calls()  # forget the calls of earlier tests
    got = embeds(standin)
    assert standin.calls() == [["input_ids"]]
    np.testing.assert_allclose(got.numpy(), reference.numpy(), rtol=0, atol=2e-5)


def test_clip_export_of_a_plan_skipping_the_last_block_gives_sd3_the_pruned_models_hidden_states_minus_2(
        tiny_models, tmp_path):
    """The penultimate layer of a pruned CLIP (apply.penultimate_boundary): with block 2 of 3 skipped whole, SD3's
    hidden_states[-2] is what Hugging Face gives for the model without that block, the output of block 0 (not the
    input of the skipped block, which would be block 1's output), and text_embeds is that model's too."""
    from diffusers import StableDiffusion3Pipeline

    tokenizer = word_tokenizer(bos=True)
    standin = exported(tiny_models, "clip-projection", tmp_path, False, Plan("clip", 3, skip=(4, 5)))
    reference = hf("clip-projection")
    reference.text_model.encoder.layers = reference.text_model.encoder.layers[:2]

    def embeds(encoder):
        pipe = pipeline(StableDiffusion3Pipeline, text_encoder=encoder, text_encoder_2=encoder, tokenizer=tokenizer,
                        tokenizer_2=tokenizer, tokenizer_max_length=LENGTH)
        return pipe._get_clip_prompt_embeds(PROMPTS, device=CPU, clip_model_index=0)

    with torch.no_grad():
        ref_states, ref_pooled = embeds(reference)
    states, pooled = embeds(standin)
    np.testing.assert_allclose(states.numpy(), ref_states.numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(pooled.numpy(), ref_pooled.numpy(), rtol=0, atol=2e-5)


# ------------------------------------------------ the negative prompt in calibration's D, as the pipeline encodes it

CLIP_SD3 = "clip-sd3"  # SD3's CLIP call on CLIPTextModelWithProjection; "clip-flux": FLUX's on CLIPTextModel


@pytest.fixture(scope="module")
def calibration_folders(tiny_models, tmp_path_factory):
    """The tiny T5, CLIP and CLIP-with-projection folders with their word tokenizer and a prompt file beside them."""
    out = {}
    for family in ("t5", "clip", "clip-projection"):
        folder = tmp_path_factory.mktemp(f"{family}-calib") / family
        shutil.copytree(tiny_models[family][1], folder)
        word_tokenizer(bos=family != "t5").save_pretrained(folder)
        (folder.parent / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        out[family] = folder
    return out


def negative_reference(folder, call, negative: str) -> list[torch.Tensor]:
    """Calibration's dense reference for D's second term: each output the pipeline reads, at the scored positions."""
    from skrr_export.calibrate import CalibrationConfig, _prepare, _scorer

    cfg = CalibrationConfig(out=folder.parent / "plan.json", sparsities=(0.2,), model=folder,
                            prompts=folder.parent / "prompts.txt", max_length=LENGTH,
                            pipeline=replace(call, max_length=LENGTH), negative_prompt=negative, force=True)
    return _scorer(_prepare(cfg), cfg).feeds[-1].reference


@pytest.mark.parametrize("case, negative", [("sd3", ""), ("flux", "the snow"), ("pixart-sigma", ""),
                                            ("pixart-sigma", "the snow"), ("clip-sd3", ""), ("clip-flux", "the snow")])
def test_calibration_encodes_the_negative_prompt_as_the_pipeline_does(case, negative, calibration_folders, tiny_models):
    """D's second term runs the empty (or a given negative) prompt through the encoder exactly as diffusers' own
    encode function does: SD3/FLUX padded to max length without a mask, every position scored; PixArt-Sigma with
    the mask, its real tokens scored; SD3's CLIP the penultimate layer at every position and text_embeds, FLUX's CLIP
    pooler_output. The Hugging Face model through the pipeline's function is the reference."""
    from diffusers import FluxPipeline, PixArtSigmaPipeline, StableDiffusion3Pipeline

    from skrr_export.recipes import CLIP_PIPELINES

    family = {"clip-sd3": "clip-projection", "clip-flux": "clip"}.get(case, "t5")
    call = CLIP_PIPELINES[case[5:]] if case.startswith("clip") else PIPELINES[case]
    got = negative_reference(calibration_folders[family], call, negative)
    model, tokenizer = tiny_models[family][0], word_tokenizer(bos=family != "t5")
    with torch.no_grad():
        if case in ("sd3", "flux"):
            cls, attr, tok_attr = ((StableDiffusion3Pipeline, "text_encoder_3", "tokenizer_3") if case == "sd3"
                                   else (FluxPipeline, "text_encoder_2", "tokenizer_2"))
            pipe = pipeline(cls, **{attr: model, tok_attr: tokenizer, "text_encoder": model})
            expected = [pipe._get_t5_prompt_embeds([negative], max_sequence_length=LENGTH, device=CPU,
                                                   dtype=torch.float32)[0]]
        elif case == "pixart-sigma":
            pipe = pipeline(PixArtSigmaPipeline, text_encoder=model, tokenizer=tokenizer, transformer=None)
            _, _, neg, neg_mask = pipe.encode_prompt(PROMPTS, negative_prompt=negative, device=CPU,
                                                     max_sequence_length=LENGTH)
            expected = [neg[0][neg_mask[0].bool()]]
        elif case == "clip-sd3":
            pipe = pipeline(StableDiffusion3Pipeline, text_encoder=model, text_encoder_2=model, tokenizer=tokenizer,
                            tokenizer_2=tokenizer, tokenizer_max_length=LENGTH)
            states, pooled = pipe._get_clip_prompt_embeds([negative], device=CPU, clip_model_index=0)
            expected = [states[0], pooled]
        else:
            pipe = pipeline(FluxPipeline, text_encoder=model, tokenizer=tokenizer, tokenizer_max_length=LENGTH)
            expected = [pipe._get_clip_prompt_embeds([negative], device=CPU)]
    assert [tuple(g.shape) for g in got] == [tuple(e.shape) for e in expected]
    if case in ("sd3", "flux", "clip-sd3"):
        assert got[0].shape[0] == LENGTH  # every padded position is scored
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=0, atol=1e-5)
