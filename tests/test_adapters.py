"""Adapters declare each family's sizes; shared code reads them instead of the config's own attribute names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoConfig, CLIPConfig

from skrr_export.adapters import ADAPTERS, Sizes, complete_feed, sizes_of, text_config_of

from .helpers import NUM_BLOCKS, tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("folder, expected", [
    ("recipes/t5-v1_1-xxl", Sizes(24, 4096, 64, 10240, 32128, None)),  # relative positions: no limit
    ("benchmarks/configs/clip-vit-l-text", Sizes(12, 768, 12, 3072, 49408, 77)),
    ("benchmarks/configs/clip-vit-bigg-text", Sizes(32, 1280, 20, 5120, 49408, 77)),
])
def test_real_configs_read_under_one_set_of_names(folder, expected):
    raw = json.loads((ROOT / folder / "config.json").read_text())
    assert sizes_of(AutoConfig.for_model(**raw)) == expected


@pytest.mark.parametrize("family", ["t5", "umt5", "bert", "clip"])
def test_tiny_configs_match_their_own_attribute_names(family):
    config = tiny_config(family)
    own = config.to_dict()
    names = {"t5": ("num_layers", "d_model", "num_heads", "d_ff"), "umt5": ("num_layers", "d_model", "num_heads", "d_ff")}
    blocks, hidden, heads, ffn = (own[n] for n in names.get(family, ("num_hidden_layers", "hidden_size",
                                                                      "num_attention_heads", "intermediate_size")))
    sizes = sizes_of(config)
    assert (sizes.blocks, sizes.hidden, sizes.heads, sizes.ffn, sizes.vocab) == (blocks, hidden, heads, ffn, own["vocab_size"])
    assert sizes.blocks == NUM_BLOCKS
    assert sizes.positions == (own["max_position_embeddings"] if family in ("bert", "clip") else None)


def test_a_whole_clip_config_is_read_at_its_text_tower():
    text = tiny_config("clip").to_dict()
    whole = CLIPConfig(text_config=text, vision_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                                        "intermediate_size": 32, "image_size": 32, "patch_size": 16})
    assert text_config_of(whole) is whole.text_config
    assert sizes_of(whole).hidden == text["hidden_size"] != whole.vision_config.hidden_size


def test_inputs_are_declared_per_family_and_feeds_completed_from_the_declaration():
    declared = {family: tuple((i.name, i.optional, i.axes) for i in a.inputs) for family, a in ADAPTERS.items()}
    ids_and_mask = (("input_ids", False, ("batch", "sequence")), ("attention_mask", False, ("batch", "sequence")))
    assert declared == {"t5": ids_and_mask, "umt5": ids_and_mask, "clip": ids_and_mask,
                        "bert": (*ids_and_mask, ("token_type_ids", True, ("batch", "sequence")))}
    ids = np.array([[5, 6, 7]], dtype=np.int32)
    tokenized = {"attention_mask": np.ones_like(ids), "input_ids": ids, "special_tokens_mask": ids * 0}
    bert = complete_feed(ADAPTERS["bert"].inputs, tokenized)
    assert list(bert) == ["input_ids", "attention_mask", "token_type_ids"]
    assert bert["token_type_ids"].dtype == np.int32 and not bert["token_type_ids"].any()
    segments = complete_feed(ADAPTERS["bert"].inputs, {**tokenized, "token_type_ids": ids})["token_type_ids"]
    assert segments is ids
    assert list(complete_feed(ADAPTERS["t5"].inputs, tokenized)) == ["input_ids", "attention_mask"]
    with pytest.raises(KeyError, match="attention_mask"):
        complete_feed(ADAPTERS["clip"].inputs, {"input_ids": ids})
