"""Every recipe checked against the config it expects; a recipe without a test here fails the suite."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from skrr_export.cli import main
from skrr_export.compare import DEFAULT_TOLERANCES
from skrr_export.errors import ModelError, UserError
from skrr_export.inspect_plan import inspect_plan
from skrr_export.plan import load_plan
from skrr_export.recipes import available_recipes, load_recipe

ROOT = Path(__file__).resolve().parents[1]
T5XXL = ROOT / "recipes" / "t5-v1_1-xxl"

# recipe -> (config folder, sparsity %, skipped, re-used): the numbers come from DESIGN.md's skip orders and
# the sub-block sizes there (attention 67,112,960, FFN 125,833,216 of 4,762,310,656 parameters)
EXPECTED = {
    "minilm": (None, 10.49, 3, 1),
    "pixart-sigma-41.9": (T5XXL, 41.92, 21, 9),
    "pixart-sigma-24.3": (T5XXL, 24.31, 12, 0),
    "sd3-40.5": (T5XXL, 40.52, 20, 0),
    "sd3-41.9": (T5XXL, 41.92, 21, 0),
    "flux-dev-40.5": (T5XXL, 40.52, 20, 0),
    "flux-dev-43.2": (T5XXL, 43.16, 21, 0),
}


def test_every_recipe_has_a_test():
    assert set(available_recipes()) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_matches_its_config_and_states_its_sparsity(name, minilm_path):
    recipe = load_recipe(name)
    folder, percent, skipped, reused = EXPECTED[name]
    plan = load_plan(recipe.plan)
    assert (len(plan.skip), len(plan.reuse)) == (skipped, reused)
    assert recipe.config_folder == folder  # the config shipped for planning without weights (none for MiniLM)
    model = folder or minilm_path
    info = inspect_plan(plan, model, None, recipe.export.get("precision", "fp32"))
    assert round(info["sparsity"] * 100, 2) == percent
    assert recipe.sparsity == pytest.approx(info["sparsity"], abs=5e-5)
    config = json.loads((Path(model) / "config.json").read_text())
    for key, value in recipe.checkpoint["config"].items():
        assert config[key] == value, key
    assert recipe.checkpoint["num_blocks"] == plan.num_blocks
    assert set(recipe.tolerances) <= set(DEFAULT_TOLERANCES)  # keys name checks; a recipe may only tighten them


def test_pixart_skip_orders_are_prefixes_of_the_published_orders():
    published = [46, 5, 6, 47, 44, 2, 11, 24, 23, 17, 18, 45, 10, 30, 29, 40, 39, 38, 37, 42, 25, 22, 43, 36]
    for name in ("pixart-sigma-41.9", "pixart-sigma-24.3"):
        skip = load_plan(load_recipe(name).plan).skip
        assert list(skip) == published[: len(skip)]


def test_running_a_recipe_uses_its_settings_and_checks_the_model(tmp_path, tiny_models, capsys):
    out = tmp_path / "out"
    assert main(["--recipe", "minilm", "--out", str(out), "--no-dense-distance", "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["plan"]["sha256"] == load_plan(load_recipe("minilm").plan).digest()
    wiring = [p for p in report["parity"] if p["check"] == "wiring"]
    assert wiring and all(p["outputs"][0]["tolerance"] == load_recipe("minilm").tolerances["wiring"] for p in wiring)
    _, t5 = tiny_models["t5"]
    assert main(["--recipe", "pixart-sigma-41.9", "--model", str(t5), "--out", str(tmp_path / "x"), "-q"]) == 2
    assert "recipe pixart-sigma-41.9 expects d_model=4096 (PixArt-alpha/PixArt-Sigma-XL-2-1024-MS), the model has " \
           "d_model=32" in capsys.readouterr().err
    with pytest.raises(ModelError, match="recipe minilm expects hidden_size=384"):
        from skrr_export.model import ModelSource, load_config

        load_recipe("minilm").check_config(load_config(ModelSource(tiny_models["bert"][1])))
    assert main(["--recipe", "nope", "-q"]) == 2
    assert "no recipe 'nope'; available: flux-dev-40.5" in capsys.readouterr().err


def test_recipes_are_the_installations_not_the_working_folders(tmp_path, monkeypatch):
    """A recipes/ folder in the working folder neither adds nor shadows recipes; a folder path still loads one."""
    from skrr_export.recipes import recipe_root

    fake = tmp_path / "recipes" / "minilm"
    fake.mkdir(parents=True)
    (fake / "recipe.json").write_text('{"name": "impostor", "sparsity": 0.5}')
    monkeypatch.chdir(tmp_path)
    assert load_recipe("minilm").folder == recipe_root() / "minilm" != fake
    assert set(available_recipes()) == set(EXPECTED)
    assert load_recipe(str(fake)).name == "impostor"
    (fake / "recipe.json").write_text('{"name": "broken"')
    with pytest.raises(UserError, match=r"recipe.json is not JSON"):
        load_recipe(str(fake))
    (fake / "recipe.json").write_text('{"name": "no sparsity"}')
    with pytest.raises(UserError, match=r"recipe.json is not a recipe: missing or malformed field 'sparsity'"):
        load_recipe(str(fake))


PIPELINE_BLOCK = {"name": "sd3", "encoder": "text_encoder_3", "attention_mask": False, "max_length": 256,
                  "outputs": ["last_hidden_state"], "negative_prompt": ""}


def test_each_recipe_declares_how_its_pipeline_calls_the_encoder():
    """SD3 and FLUX call T5 unmasked at 256 and 512, PixArt-Sigma masked at 300 (DESIGN.md section 6; diffusers'
    own calls are exercised in test_pipelines_diffusers.py); a fixed export sequence is the pipeline's length, and
    every declared output is one the family's adapter exports."""
    from skrr_export.adapters import ADAPTERS
    from skrr_export.model import ModelSource, build_meta, load_config

    expected = {"sd3": (False, 256), "flux-dev": (False, 512), "pixart-sigma": (True, 300), "minilm": (True, None)}
    for name in EXPECTED:
        recipe = load_recipe(name)
        call = recipe.pipeline
        assert (call.attention_mask, call.max_length) == next(v for k, v in expected.items() if name.startswith(k))
        assert recipe.export.get("fixed_sequence") in (None, call.max_length)
        config = load_config(ModelSource(recipe.config_folder)) if recipe.config_folder else None
        if config is not None:
            assert set(call.outputs) <= set(ADAPTERS[recipe.checkpoint["family"]].output_names(build_meta(config).config))


@pytest.mark.parametrize("change, message", [
    ({"attention_mask": "no"}, "attention_mask must be true or false"),
    ({"max_length": 0}, "max_length must be a positive integer or null"),
    ({"outputs": ["hidden_states"]}, "outputs must be a non-empty list of last_hidden_state"),
    ({"outputs": []}, "outputs must be a non-empty list"),
    ({"mask": True}, "unknown field mask"),
    ({"encoder": 3}, "encoder must be a string or null"),
    ({"negative_prompt": None}, "negative_prompt must be a string"),
    ({"max_length": 300}, "export fixed_sequence 256 differs from the pipeline's max_length 300"),
])
def test_a_malformed_pipeline_block_is_refused_with_what_to_fix(tmp_path, change, message):
    folder = tmp_path / "r"
    folder.mkdir()
    recipe = {"name": "r", "sparsity": 0.4, "export": {"fixed_sequence": 256}, "pipeline": PIPELINE_BLOCK | change}
    (folder / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(UserError, match=message):
        load_recipe(str(folder))
    del recipe["pipeline"]["name"]
    (folder / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(UserError, match="must be an object with name, attention_mask, max_length and outputs"):
        load_recipe(str(folder))


@pytest.mark.parametrize("export, message", [
    ({"precision": "fp8"}, "export precision must be one of fp32, fp16, bf16"),
    ({"input_dtype": "int16"}, "export input_dtype must be one of int64, int32"),
    ({"fixed_sequence": "300"}, "export fixed_sequence must be a positive integer or null"),
    ({"fixed_seq": 300}, "export unknown setting fixed_seq"),
    ({"batch": "1,8,4"}, "export batch profile min=1 opt=8 max=4 must satisfy"),
    ({"fixed_sequence": 300, "sequence": "1,300,512"}, r"--sequence 1,300,512: .*fixed_sequence 300\) is fixed at sequence 300"),
])
def test_a_recipes_export_settings_are_checked_when_it_is_read(tmp_path, export, message):
    """A recipe's export block is checked once, when it is read, against what the flags accept (recipes._export_of):
    one line naming the setting; a sequence profile that contradicts its fixed sequence is refused, not replaced."""
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "recipe.json").write_text(json.dumps({"name": "r", "sparsity": 0.4, "export": export}))
    with pytest.raises(UserError, match=message):
        load_recipe(str(folder))


def test_a_recipes_profile_may_be_a_number(tmp_path):
    """A profile written as a JSON number ("batch": 4) means what --batch 4 means: one fixed batch. It was checked as
    a string when read and then parsed raw by the CLI (AttributeError: 'int' object has no attribute 'split')."""
    from skrr_export.cli import _engine_options, _recipe_shape
    from skrr_export.config import ShapeRange
    from skrr_export.model import ModelSource, default_model_path, load_config
    from skrr_export.recipes import merge_settings

    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "recipe.json").write_text(json.dumps({"name": "r", "sparsity": 0.4,
                                                    "export": {"fixed_sequence": 300, "batch": 4}}))
    recipe = load_recipe(str(folder))
    assert _recipe_shape(recipe) == (4, 300)
    settings = merge_settings({}, recipe, ("fixed_sequence", "batch", "sequence"))
    options = _engine_options(settings, load_config(ModelSource(default_model_path())))
    assert options.batch == ShapeRange(4, 4, 4)


def test_flags_are_merged_over_a_recipes_settings_once():
    """recipes.merge_settings: a flag given wins, the recipe fills what is left out (only the settings the command
    takes from a recipe; the mask from its pipeline's call), and a sequence fixed by a flag drops the recipe's
    sequence profile."""
    from skrr_export.recipes import merge_settings

    sd3, minilm = load_recipe("sd3-40.5"), load_recipe("minilm")
    names = ("precision", "fixed_sequence", "attention_mask", "sequence")
    assert merge_settings({"precision": "fp16"}, sd3, names) == {"precision": "fp16", "fixed_sequence": 256,
                                                                 "attention_mask": False}
    assert merge_settings({}, sd3, ("fixed_sequence",)) == {"fixed_sequence": 256}
    assert merge_settings({}, minilm, names) == {"precision": "fp32", "attention_mask": True, "sequence": "1,128,512"}
    assert merge_settings({"fixed_sequence": 64}, minilm, names) == {"precision": "fp32", "attention_mask": True,
                                                                     "fixed_sequence": 64}
    assert merge_settings({"precision": "bf16"}, None, names) == {"precision": "bf16"}


def _unmasked_recipe(tmp_path, tiny_models):
    """A recipe for the tiny T5 that declares SD3's call at 16 tokens, and a copy of the model with a tokenizer."""
    import shutil

    from .test_pipelines_diffusers import word_tokenizer

    model = tmp_path / "t5"
    shutil.copytree(tiny_models["t5"][1], model)
    word_tokenizer(bos=False).save_pretrained(model)
    folder = tmp_path / "recipe"
    folder.mkdir()
    (folder / "plan.json").write_text(json.dumps({"format": "skrr-plan/1", "encoder": {"family": "t5", "num_blocks": 3},
                                                  "skip": [3], "reuse": {}}))
    recipe = {"name": "tiny-sd3", "checkpoint": {"family": "t5", "config": {"d_model": 32}}, "sparsity": 0.0,
              "export": {"precision": "fp32", "fixed_sequence": 16}, "pipeline": PIPELINE_BLOCK | {"max_length": 16}}
    (folder / "recipe.json").write_text(json.dumps(recipe))
    return folder, model


def test_an_unmasked_recipe_exports_input_ids_only_and_scores_every_position(tmp_path, tiny_models, capsys):
    """The recipe's pipeline block drops the mask from the graph; parity and the distance to dense cover every
    position, padding included: the reported MSE is the Hugging Face model's (unmasked) against the exported graph
    over all positions. Triton's config and the trtexec script carry the breaking-change note."""
    import onnxruntime as ort
    import torch
    from transformers import T5EncoderModel

    from skrr_export.inputs import PROMPTS
    from skrr_export.recipes import NO_MASK_NOTE

    folder, model = _unmasked_recipe(tmp_path, tiny_models)
    out = tmp_path / "out"
    assert main(["--recipe", str(folder), "--model", str(model), "--out", str(out), "--no-measure", "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["inputs"] == ["input_ids"]
    assert report["pipeline"]["attention_mask"] is False and report["pipeline"]["note"] == NO_MASK_NOTE
    assert all(p["passed"] for p in report["parity"])
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    ids = word_tokenizer_ids(model, list(PROMPTS))
    with torch.no_grad():
        dense = T5EncoderModel.from_pretrained(model).eval()(torch.from_numpy(ids))[0].numpy().astype(np.float64)
    pruned = session.run(None, {"input_ids": ids})[0].astype(np.float64)
    assert report["distance_to_dense"]["prompts"]["last_hidden_state"]["mse"] == pytest.approx(
        ((dense - pruned) ** 2).mean(), rel=1e-4)
    assert "**Inputs changed**" in (out / "report.md").read_text()
    assert main(["triton", "--artifacts", str(out), "--repo", str(tmp_path / "repo"), "-q"]) == 0
    config = (tmp_path / "repo" / "t5_skrr" / "config.pbtxt").read_text()
    assert config.startswith(f"# {NO_MASK_NOTE}\n") and "attention_mask" not in config.split("\n", 1)[1]
    assert main(["trtexec", "--artifacts", str(out), "--batch", "1,1,4", "--sequence", "16,16,16"]) == 0
    assert NO_MASK_NOTE in (out / "build_engine.sh").read_text()


def word_tokenizer_ids(model, prompts):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="np")["input_ids"]


def test_no_attention_mask_flag_exports_input_ids_only_for_a_plan_without_recipe(tmp_path, tiny_models):
    folder, model = _unmasked_recipe(tmp_path, tiny_models)
    out = tmp_path / "out"
    args = ["--plan", str(folder / "plan.json"), "--model", str(model), "--fixed-sequence", "16", "--no-dense-distance",
            "--no-measure", "-q"]
    assert main([*args, "--out", str(out), "--no-attention-mask"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["inputs"] == ["input_ids"] and report["pipeline"]["call"] is None
    assert report["pipeline"]["scored"] == "every position (padding included)"
    # without the flag the same plan keeps the mask: test_export's exports (input names) and every masked recipe
