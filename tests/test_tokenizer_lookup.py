"""The tokenizer a run tokenizes its prompts with: in a diffusers pipeline folder, the one model_index.json pairs with
the encoder's subfolder (text_encoder_3 -> tokenizer_3); ``--tokenizer DIR`` overrides; a folder without one is a
one-line error (exit 2) naming where it looked, unless random ids are asked for (``--random-ids``, implied by
``--random-weights``); report.json records which tokenizer was used."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from skrr_export.calibrate import read_prompts
from skrr_export.cli import main
from skrr_export.errors import ArgumentError, ModelError
from skrr_export.inputs import PROMPTS, find_tokenizer, load_tokenizer, prompt_batch
from skrr_export.model import ModelSource, load_config, model_source
from skrr_export.plan import Plan

from .helpers import NUM_BLOCKS, build_reference_model

SPECIAL = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5's vocabulary


def write_tokenizer(folder: Path, vocab: int, skip: int = 0) -> Path:
    """A word-level tokenizer of ``vocab`` ids saved as Hugging Face saves one (tokenizer.json and its config): the
    special tokens, then the most frequent words of the test and calibration prompts (``skip`` of them left out, so
    that two tokenizers give different ids); every sequence ends in </s>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    counts = Counter(w for text in (*PROMPTS, *read_prompts(None, 64)) for w in text.lower().replace(",", " ").replace(".", " ").split())
    words = [w for w, _ in counts.most_common()][skip:skip + vocab - len(SPECIAL)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate((*SPECIAL, *words))}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return folder


def write_pipeline(root: Path, index: dict | None = None) -> Path:
    """A diffusers-style pipeline folder: a tiny T5 (config + safetensors) in text_encoder_3, its tokenizer in
    tokenizer_3, and another tokenizer (other ids) in tokenizer, as SD3 lays them out."""
    model = build_reference_model("t5")
    model.save_pretrained(root / "text_encoder_3")
    vocab = model.config.vocab_size
    write_tokenizer(root / "tokenizer_3", vocab)
    write_tokenizer(root / "tokenizer", vocab, skip=20)
    if index is None:
        index = {"_class_name": "StableDiffusion3Pipeline", "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "text_encoder_3": ["transformers", "T5EncoderModel"],
                 "tokenizer_3": ["transformers", "T5TokenizerFast"]}
    if index:
        (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return write_pipeline(tmp_path_factory.mktemp("pipeline"))


def own_ids(folder: Path, texts: tuple[str, ...]) -> np.ndarray:
    """The independent reference: the tokenizer folder loaded by transformers itself, padded as the runs pad."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(folder)(list(texts), padding=True, return_tensors="np")["input_ids"]


def test_the_pipelines_tokenizer_for_the_subfolder_is_found_and_used(pipeline):
    source = ModelSource(pipeline, "text_encoder_3")
    assert find_tokenizer(source) == pipeline / "tokenizer_3"
    assert find_tokenizer(ModelSource(pipeline / "text_encoder_3")) == pipeline / "tokenizer_3", "--model PIPE/text_encoder_3"
    prompts, empty = prompt_batch(load_tokenizer(source), load_config(source), "int64", None)
    assert prompts.source == "tokenizer"
    np.testing.assert_array_equal(prompts.feed["input_ids"], own_ids(pipeline / "tokenizer_3", PROMPTS))
    assert not np.array_equal(own_ids(pipeline / "tokenizer", PROMPTS), own_ids(pipeline / "tokenizer_3", PROMPTS)), \
        "the two tokenizers must differ, or using the wrong one could not be seen"
    np.testing.assert_array_equal(empty.feed["input_ids"], [[1]])  # "" is </s> alone


def test_the_naming_rule_pairs_them_without_model_index(tmp_path):
    root = write_pipeline(tmp_path, index={})
    assert not (root / "model_index.json").exists()
    assert find_tokenizer(ModelSource(root, "text_encoder_3")) == root / "tokenizer_3"


def test_model_index_decides_which_tokenizer_belongs_to_the_encoder(tmp_path):
    """An index that lists no tokenizer_3 ([null, null]) means the pipeline has none for it: the folder beside it
    is not taken, and the error names where it looked."""
    root = write_pipeline(tmp_path, index={"text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": [None, None]})
    with pytest.raises(ModelError, match="no tokenizer files") as info:
        find_tokenizer(ModelSource(root, "text_encoder_3"))
    assert str(root / "text_encoder_3") in str(info.value) and str(root / "tokenizer_3") not in str(info.value)
    assert find_tokenizer(ModelSource(root, "text_encoder_3", tokenizer=root / "tokenizer_3")) == root / "tokenizer_3"


def test_tokenizer_flag_overrides_and_random_ids_need_none(pipeline, tiny_models):
    assert find_tokenizer(ModelSource(pipeline, "text_encoder_3", tokenizer=pipeline / "tokenizer")) == pipeline / "tokenizer"
    with pytest.raises(ModelError, match=f"no tokenizer files .* in {pipeline / 'text_encoder_3'}; pass --tokenizer"):
        find_tokenizer(ModelSource(pipeline, "text_encoder_3", tokenizer=pipeline / "text_encoder_3"))
    folder = tiny_models["t5"][1]  # config and weights only
    with pytest.raises(ModelError, match=f"in {folder}; pass --tokenizer DIR, or --random-ids"):
        load_tokenizer(ModelSource(folder))
    for source in (ModelSource(folder, random_ids=True), ModelSource(folder, random_weights=True)):
        assert find_tokenizer(source) is None and load_tokenizer(source) is None
    with pytest.raises(ArgumentError, match="--random-ids"):
        model_source(folder, tokenizer=pipeline / "tokenizer_3", random_ids=True)


def test_random_ids_are_seeded_ids_not_an_empty_tokenizer(tiny_models):
    """transformers 5 builds an empty T5 tokenizer (every word <unk>) from a folder with only a config: the
    prompts would all be the same ids. Random ids are seeded random ids instead."""
    folder = tiny_models["t5"][1]
    source = ModelSource(folder, random_ids=True)
    prompts, _ = prompt_batch(load_tokenizer(source), load_config(source), "int64", None)
    assert prompts.source.startswith("random ids") and len(np.unique(prompts.feed["input_ids"])) > 10


def export_args(pipeline: Path, out: Path, *extra: str) -> list[str]:
    plan = out.parent / "plan.json"
    plan.write_text(json.dumps(Plan("t5", NUM_BLOCKS, skip=(3,)).to_json()))
    return ["--plan", str(plan), "--model", str(pipeline), "--subfolder", "text_encoder_3", "--out", str(out),
            "--no-dense-distance", "-q", *extra]


def test_export_uses_the_pipelines_tokenizer_and_reports_it(pipeline, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(export_args(pipeline, out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["tokenizer"] == str(pipeline / "tokenizer_3")
    assert {p["batch"] for p in report["parity"]} == {"prompts, tokenizer", "empty prompt, tokenizer"}


def test_a_folder_without_tokenizer_is_exit_2_unless_random_ids(tmp_path, capsys):
    root = write_pipeline(tmp_path / "pipe", index={"text_encoder_3": ["transformers", "T5EncoderModel"],
                                                   "tokenizer_3": [None, None]})
    capsys.readouterr()  # save_pretrained's progress bar
    out = tmp_path / "out"
    assert main(export_args(root, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no tokenizer files (tokenizer.json, tokenizer_config.json, ...) in {root / 'text_encoder_3'}" \
        in err[0] and "--random-ids" in err[0], err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "nothing half-written"
    assert main(export_args(root, out, "--random-ids")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["tokenizer"] is None
    assert {p["batch"] for p in report["parity"]} == {"prompts, random ids (seed 0)", "empty prompt, end-of-sequence token only"}
    assert main(export_args(root, tmp_path / "o2", "--random-ids", "--tokenizer", str(root / "tokenizer_3"))) == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_calibration_tokenizes_with_the_pipelines_tokenizer(pipeline, tmp_path):
    """calibrate --model PIPE --subfolder text_encoder_3: the prompts' ids are tokenizer_3's (nothing is scored here:
    the job is prepared, no weights read)."""
    from transformers import PreTrainedTokenizerFast

    from skrr_export.calibrate import CalibrationConfig, _prepare

    cfg = CalibrationConfig(out=tmp_path / "p.json", sparsities=(0.2,), model=pipeline, subfolder="text_encoder_3",
                            num_prompts=4, max_length=24)
    job = _prepare(cfg)
    own = PreTrainedTokenizerFast.from_pretrained(pipeline / "tokenizer_3")
    assert job.ids == own(read_prompts(None, 4), truncation=True, max_length=24)["input_ids"]
    assert job.empty == [1]
