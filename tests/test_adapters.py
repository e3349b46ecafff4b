"""Adapters declare each family's sizes; shared code reads them instead of the config's own attribute names."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoConfig, CLIPConfig

from skrr_export.adapters import ADAPTERS, Sizes, complete_feed, sizes_of, text_config_of

from .helpers import FAMILIES, NUM_BLOCKS, plan_family, tiny_config

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


# ------------------------------------------------------------------------------ counts from the config alone
# `inspect` counts parameters, bytes and matmul FLOPs from the config (skrr_export.counts, no torch); the oracle is
# the model Hugging Face builds on the meta device: apply.plan_cost over its parameters and workload.executed_flops
# (torch's FlopCounterMode over a forward of the plan).

REAL_CONFIGS = ["recipes/t5-v1_1-xxl", "benchmarks/configs/clip-vit-l-text", "benchmarks/configs/clip-vit-bigg-text",
                "minilm"]


def variant_config(name: str):
    """Config variants the families' counts branch on, beyond tests/helpers.py's tiny ones."""
    from transformers import T5Config

    if name == "t5-relu":  # T5 v1.0's FFN: one input projection, no gate (derived from feed_forward_proj)
        t5 = {k: v for k, v in tiny_config("t5").to_dict().items() if k not in ("is_gated_act", "dense_act_fn")}
        config = T5Config(**{**t5, "feed_forward_proj": "relu"})
        assert not config.is_gated_act
        return config
    text = tiny_config("clip").to_dict()  # a whole CLIPModel: the text tower nested, projected
    vision = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "image_size": 32, "patch_size": 16}
    return CLIPConfig(text_config={**text, "projection_dim": 24}, vision_config=vision, projection_dim=24,
                      architectures=["CLIPModel"])


def config_folder(name: str, tmp_path: Path) -> Path:
    if name in REAL_CONFIGS:
        if name != "minilm":
            return ROOT / name
        from skrr_export.errors import ModelError
        from skrr_export.model import default_model_path

        try:
            return default_model_path()
        except ModelError as exc:
            pytest.skip(str(exc))
    (tiny_config(name) if name in FAMILIES else variant_config(name)).save_pretrained(tmp_path)
    return tmp_path


@functools.cache
def meta_built(folder: Path):
    from skrr_export.model import ModelSource, build_meta, load_config

    return build_meta(load_config(ModelSource(folder)))


def plans_for(name: str, family: str, blocks: int) -> list:
    """The dense plan, and plans that skip and re-use (block 0's attention, which holds T5's position table, too)."""
    from skrr_export.plan import Plan

    from .test_apply import make_plan

    if name in FAMILIES:
        return [make_plan(name, "dense"), make_plan(name, "heavy-reuse"), make_plan(name, "skip-block0-attention")]
    return [Plan.dense(family, blocks), Plan(family, blocks, skip=(0, 3, 5), reuse={0: 2, 5: 1}),
            Plan(family, blocks, skip=tuple(range(2, 2 * blocks)))]


@pytest.mark.parametrize("name", [*FAMILIES, "t5-relu", "clip-whole", *REAL_CONFIGS])
def test_config_counts_equal_the_meta_built_models(name, tmp_path):
    from skrr_export import counts
    from skrr_export.apply import plan_cost, sub_block_parameters
    from skrr_export.model import DTYPES
    from skrr_export.workload import Shape, executed_flops

    folder = config_folder(name, tmp_path)
    config, enc = counts.read_config(folder), meta_built(folder)
    parts = counts.counting_for(config).parts(config, 2, 13)
    assert parts.stem.params == sum(p.numel() for p in enc.stem.parameters())
    assert parts.head.params == sum(p.numel() for p in enc.head.parameters())
    assert [p.params for p in parts.sub_blocks] == [sum(p.numel() for _, p in b) for b in sub_block_parameters(enc)]
    dense, *pruned = plans_for(name, enc.adapter.family, len(enc.sub_blocks) // 2)
    dense_flops = executed_flops(enc, dense, Shape(2, 13))
    for plan in (dense, *pruned):
        flops = executed_flops(enc, plan, Shape(2, 13)) if plan.skip else dense_flops
        for precision in ("fp32", "fp16", "bf16"):
            enc.dtype = DTYPES[precision]
            ours, oracle = counts.plan_cost(config, plan, precision, 2, 13), plan_cost(enc, plan)
            assert (ours.total_params, ours.kept_params, ours.total_bytes, ours.kept_bytes, ours.executed_slots,
                    ours.num_slots, ours.compute_fraction, ours.sparsity) == (
                oracle.total_params, oracle.kept_params, oracle.total_bytes, oracle.kept_bytes, oracle.executed_slots,
                oracle.num_slots, oracle.compute_fraction, oracle.sparsity), (plan, precision)
            assert (ours.flops, ours.dense_flops) == (flops, dense_flops), plan


def test_every_adapter_reads_its_familys_declaration():
    """One torch-free declaration per family (counts.COUNTINGS): each adapter is found through it, by model type."""
    from skrr_export.adapters import adapter_for
    from skrr_export.counts import COUNTINGS

    assert set(COUNTINGS) == set(ADAPTERS)
    for family, adapter in ADAPTERS.items():
        assert type(adapter.counting) is type(COUNTINGS[family]) and adapter.family == family
    for family in [*FAMILIES, "t5-relu", "clip-whole"]:
        config = tiny_config(family) if family in FAMILIES else variant_config(family)
        assert adapter_for(config) is ADAPTERS[plan_family(family)]
