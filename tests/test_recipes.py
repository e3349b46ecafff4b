"""Every recipe checked against the config it expects; a recipe without a test here fails the suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from skrr_export.cli import main
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
    assert recipe.export["precision"] in recipe.tolerances


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
    assert report["parity"][0]["outputs"][0]["tolerance"] == load_recipe("minilm").tolerances["fp32"]
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
