"""The real all-MiniLM-L6-v2 weights: kept-only loading and the dense plan against Hugging Face's own forward."""

from __future__ import annotations

import torch

from skrr_export.apply import apply_plan
from skrr_export.inputs import load_tokenizer, prompt_batch
from skrr_export.model import ModelSource, load_encoder
from skrr_export.plan import Plan, load_plan

from .test_cli import MINILM_PLAN


def test_dense_plan_equals_hugging_face_on_real_weights(minilm_path):
    from transformers import AutoModel

    source = ModelSource(minilm_path)
    dense = Plan.dense("bert", 6)
    enc = load_encoder(source, dense)
    module = apply_plan(enc, dense)
    prompts, _ = prompt_batch(load_tokenizer(source), enc.config, "int64", None)
    ids = torch.from_numpy(prompts.feed["input_ids"])
    mask = torch.from_numpy(prompts.feed["attention_mask"])
    assert (mask == 0).any(), "the batch must contain padding"
    hf = AutoModel.from_pretrained(minilm_path, local_files_only=True, attn_implementation="eager").eval()
    with torch.no_grad():
        ours = module(ids, mask)[0]
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=0, atol=2e-5)


def test_recipe_plan_reads_only_kept_tensors(minilm_path):
    plan = load_plan(MINILM_PLAN)
    enc = load_encoder(ModelSource(minilm_path), plan)
    read = set(enc.tensors_read)
    assert not any(k.startswith("encoder.layer.3.") for k in read)  # block 3 skipped whole
    assert not any(k.startswith("encoder.layer.4.attention.") for k in read)  # slot 8 re-uses slot 4
    assert any(k.startswith("encoder.layer.4.intermediate.") for k in read)
    assert "pooler.dense.weight" not in read
