"""Every shipped recipe, exported as users run it: its own plan and export settings (precision, input dtype,
fixed sequence, tolerances) on a small checkpoint of its family with the recipe's block count, with an executed
parity check. T5 recipes run on T5-v1.1-XXL's config scaled down 64x in width (same proportions, so the plan's
stated sparsity still holds); MiniLM on its real weights. The PixArt-Sigma 41.9 % recipe also builds a
TensorRT-RTX engine at its fixed sequence and runs with default flags (distance to the dense model included)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from skrr_export.pipeline import ExportConfig, run_export
from skrr_export.recipes import available_recipes, load_recipe

SCALE = 64


@pytest.fixture(scope="module")
def small_t5_checkpoint(tmp_path_factory) -> Path:
    """A 24-block T5 checkpoint (safetensors, seeded values) with T5-v1.1-XXL's config narrowed SCALE times."""
    from transformers import T5Config, T5EncoderModel

    config = json.loads((load_recipe("pixart-sigma-41.9").config_folder / "config.json").read_text())
    config.update(d_model=config["d_model"] // SCALE, d_ff=config["d_ff"] // SCALE,
                  num_heads=config["num_heads"] // SCALE * 4, d_kv=config["d_kv"] // 4,
                  vocab_size=config["vocab_size"] // SCALE)
    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(**config)).eval()
    with torch.no_grad():  # random init leaves norms at 1; perturb so that every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("t5-24-blocks")
    model.save_pretrained(folder)
    return folder


def small_checkpoint(recipe, small_t5_checkpoint: Path, minilm_path: Path) -> Path:  # type: ignore[no-untyped-def]
    return {"t5": small_t5_checkpoint, "bert": minilm_path}[recipe.checkpoint["family"]]


@pytest.mark.parametrize("name", sorted(available_recipes()))
def test_recipe_exports_with_executed_parity(name, small_t5_checkpoint, minilm_path, tmp_path):
    recipe = load_recipe(name)
    settings = recipe.export
    flagship = name == "pixart-sigma-41.9"
    cfg = ExportConfig(
        plan=recipe.plan,
        out=tmp_path / "out",
        model=small_checkpoint(recipe, small_t5_checkpoint, minilm_path),
        random_ids=recipe.checkpoint["family"] == "t5",  # the small T5 checkpoint has no tokenizer; MiniLM has its own
        precision=settings["precision"],
        input_dtype=settings["input_dtype"],
        fixed_sequence=settings.get("fixed_sequence"),
        recipe=replace(recipe, checkpoint={}),  # its tolerances; the full-size config check is the recipe test's
        dense_distance=flagship or recipe.checkpoint["family"] == "bert",
        engine="trt-rtx" if flagship else "onnx",
        engine_options=_engine_options(settings) if flagship else None,
    )
    report = run_export(cfg)
    executed = [p for p in report["parity"] if p["test"].startswith("onnxruntime")]
    assert executed and all(p["passed"] for p in executed), report["parity"]
    onnx = report["onnx"]
    assert onnx["weights"]["bytes"] == onnx["unique_parameter_bytes"] == sum(report["cost"]["kept_bytes"].values())
    assert onnx["export_options"]["fixed_sequence"] == settings.get("fixed_sequence")
    if flagship:
        engine = report["engine"]
        assert engine["profiles"][0]["input_ids"][0][1] == settings["fixed_sequence"]
        assert engine["static_sequence_table_bytes"] == 4 * settings["fixed_sequence"] ** 2
        assert engine["weights"]["total_bytes"] <= engine["onnx_weight_bytes_aligned"] * 1.02 + 4 * 300**2
        assert report["distance_to_dense"]["prompts"]["last_hidden_state"]["mse"] > 0


def _engine_options(settings: dict):  # type: ignore[no-untyped-def]
    from skrr_export.trt import EngineOptions, ShapeRange

    return EngineOptions(batch=ShapeRange.parse(settings["batch"], "batch"))
