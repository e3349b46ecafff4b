"""Applying plans: the unrolled shared-weight module against independent references, for every family."""

from __future__ import annotations

import math

import pytest
import torch

from skrr_export.apply import apply_plan, dense_outputs_streamed, plan_cost, sub_block_parameters, unique_parameter_bytes
from skrr_export.errors import PlanError
from skrr_export.model import ModelSource, build_meta, load_config, load_encoder
from skrr_export.plan import Plan

from .helpers import FAMILIES, NUM_BLOCKS, build_reference_model, ids_and_mask, plan_family
from .reference import reference_forward

PLANS = {
    "dense": ((), {}),
    "skip-only": ((3, 4), {}),
    "skip-block0-attention": ((0,), {}),
    "heavy-reuse": ((1, 2, 3, 4), {1: 5, 2: 0, 3: 5, 4: 0}),
}


def make_plan(family: str, name: str) -> Plan:
    skip, reuse = PLANS[name]
    return Plan(plan_family(family), NUM_BLOCKS, skip=skip, reuse=reuse)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_plan_equals_hugging_face_forward(family, tiny_models):
    """The whole Hugging Face model, called as users call it, is the reference for the dense plan."""
    model, folder = tiny_models[family]
    plan = make_plan(family, "dense")
    module = apply_plan(load_encoder(ModelSource(folder), plan), plan)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        ours = dict(zip(module.output_names, module(ids, mask)))
        hf = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(ours["last_hidden_state"], hf.last_hidden_state, rtol=0, atol=1e-6)
    if family.startswith("clip"):
        torch.testing.assert_close(ours["penultimate_hidden_state"], hf.hidden_states[-2], rtol=0, atol=1e-6)
        pooled = hf.text_embeds if family == "clip-projection" else hf.pooler_output
        torch.testing.assert_close(ours[module.output_names[2]], pooled, rtol=0, atol=1e-6)


@pytest.mark.parametrize("plan_name", PLANS)
@pytest.mark.parametrize("family", FAMILIES)
def test_plan_matches_reference_loop(family, plan_name, tiny_models):
    model, folder = tiny_models[family]
    plan = make_plan(family, plan_name)
    module = apply_plan(load_encoder(ModelSource(folder), plan), plan)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        ours = dict(zip(module.output_names, module(ids, mask)))
    ref = reference_forward(plan_family(family), model, NUM_BLOCKS, plan.skip, plan.reuse, ids, mask)
    assert set(ours) == set(ref)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=1e-6, msg=f"{family} {plan_name} {name}")


def t5_bucket(distance: int, num_buckets: int, max_distance: int) -> int:
    """T5's relative-position bucket for a key ``distance`` tokens after the query (negative: before), bidirectional
    as in the encoder, from Mesh TensorFlow's definition: half the buckets for keys after the query; in each half,
    one bucket per distance below a quarter of all buckets, then logarithmic ones up to ``max_distance``, beyond
    which all share the last."""
    half = num_buckets // 2
    exact = half // 2
    n = abs(distance)
    if n < exact:
        bucket = n
    else:
        bucket = min(half - 1, exact + int(math.log(n / exact) / math.log(max_distance / exact) * (half - exact)))
    return bucket + (half if distance > 0 else 0)


def t5_position_bias(model, seq: int) -> torch.Tensor:
    """(1, heads, query, key): block 0's table read at the buckets above."""
    attention = model.encoder.block[0].layer[0].SelfAttention
    cfg = model.config
    buckets = torch.tensor([[t5_bucket(k - q, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
                             for k in range(seq)] for q in range(seq)])
    return attention.relative_attention_bias.weight[buckets].permute(2, 0, 1).unsqueeze(0)


def test_skipping_block0_attention_keeps_position_bias(tiny_models):
    """The T5 trap: replacing the block list would silently drop the relative-position bias. The reference: Hugging
    Face's layers given the bias computed above; without it, the output differs (the bias matters here)."""
    model, folder = tiny_models["t5"]
    plan = make_plan("t5", "skip-block0-attention")
    module = apply_plan(load_encoder(ModelSource(folder), plan), plan)
    ids, mask = ids_and_mask()
    ext = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min

    def blocks_without_block0_attention(bias):
        h = model.shared(ids)
        for b in range(NUM_BLOCKS):
            if b > 0:
                h = model.encoder.block[b].layer[0](h, attention_mask=ext, position_bias=bias)[0]
            h = model.encoder.block[b].layer[1](h)
        return model.encoder.final_layer_norm(h)

    with torch.no_grad():
        ours = module(ids, mask)[0]
        expected = blocks_without_block0_attention(t5_position_bias(model, ids.shape[1]))
        naive = blocks_without_block0_attention(None)  # blocks' own forward: the bias becomes zero
        long_ids = torch.zeros(1, 40, dtype=torch.long)  # distances beyond max_distance (16): the last buckets
        long_bias = module.stem(long_ids, torch.ones_like(long_ids))[1].position_bias
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert (ours - naive).abs().max() > 1e-3
    torch.testing.assert_close(long_bias, t5_position_bias(model, 40), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_reused_sub_blocks_share_parameters(family, tiny_models):
    _, folder = tiny_models[family]
    plan = make_plan(family, "heavy-reuse")
    enc = load_encoder(ModelSource(folder), plan)
    module = apply_plan(enc, plan)
    assert len(module.schedule) == 2 * NUM_BLOCKS
    assert set(module.kept) == {"0", "5"}
    # an independent count: kept sub-blocks' own tensors + everything outside the blocks
    per_block = sub_block_parameters(enc)
    kept = sum(p.numel() * p.element_size() for i in (0, 5) for _, p in per_block[i])
    in_blocks = {id(p) for block in per_block for _, p in block}
    always = sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in in_blocks)
    assert unique_parameter_bytes(module) == kept + always
    skip_only = Plan(plan.family, NUM_BLOCKS, skip=plan.skip)
    assert unique_parameter_bytes(module) == unique_parameter_bytes(apply_plan(enc, skip_only)), "re-use adds no bytes"


@pytest.mark.parametrize("family", FAMILIES)
def test_only_kept_tensors_are_read(family, tiny_models):
    _, folder = tiny_models[family]
    plan = make_plan(family, "heavy-reuse")
    enc = load_encoder(ModelSource(folder), plan)
    skipped_names = {n for i in (1, 2, 3, 4) for n, _ in sub_block_parameters(build_meta(load_config(ModelSource(folder))))[i]}
    kept_names = {n for i in (0, 5) for n, _ in sub_block_parameters(enc)[i]}
    read = set(enc.tensors_read)
    strip = lambda k: k.removeprefix("text_model.")  # noqa: E731  (CLIP checkpoints may carry the prefix)
    assert not {strip(k) for k in read} & {strip(n) for n in skipped_names}
    assert {strip(n) for n in kept_names} <= {strip(k) for k in read}
    for i in (1, 2, 3, 4):
        assert all(p.is_meta for _, p in sub_block_parameters(enc)[i]), "skipped sub-blocks must stay unallocated"


def test_random_weights_allocate_only_kept(tiny_models):
    _, folder = tiny_models["t5"]
    plan = make_plan("t5", "skip-only")
    enc = load_encoder(ModelSource(folder, random_weights=True), plan, "bf16")
    module = apply_plan(enc, plan)
    assert enc.tensors_read == ()
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    assert unique_parameter_bytes(module) == plan_cost(enc, plan).kept_weight_bytes


def test_fp16_keeps_t5_ffn_output_in_fp32(tiny_models):
    _, folder = tiny_models["t5"]
    plan = make_plan("t5", "dense")
    module = apply_plan(load_encoder(ModelSource(folder), plan, "fp16"), plan)
    dtypes = {n: p.dtype for n, p in module.named_parameters()}
    assert {d for n, d in dtypes.items() if n.endswith("wo.weight")} == {torch.float32}
    assert {d for n, d in dtypes.items() if not n.endswith("wo.weight")} == {torch.float16}


def test_plan_for_another_model_is_refused(tiny_models):
    _, folder = tiny_models["t5"]
    with pytest.raises(PlanError, match="num_blocks: plan has 24 blocks but the model has 3"):
        load_encoder(ModelSource(folder), Plan("t5", 24))
    with pytest.raises(PlanError, match="family: plan is for 'bert' but the model is 't5'"):
        load_encoder(ModelSource(folder), Plan("bert", NUM_BLOCKS))


def test_stated_sparsity_must_match(tiny_models):
    _, folder = tiny_models["bert"]
    plan = Plan("bert", NUM_BLOCKS, skip=(3,), sparsity=0.5)
    with pytest.raises(PlanError, match="sparsity: plan states 0.5000 but it removes"):
        apply_plan(load_encoder(ModelSource(folder), plan), plan)


def test_sharded_checkpoint_in_a_pipeline_subfolder(tiny_models, tmp_path):
    """A diffusers-style folder (text_encoder_3/) with sharded safetensors and an index loads the same tensors."""
    model, _ = tiny_models["t5"]
    folder = tmp_path / "pipeline" / "text_encoder_3"
    model.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 2
    plan = make_plan("t5", "heavy-reuse")
    module = apply_plan(load_encoder(ModelSource(tmp_path / "pipeline", subfolder="text_encoder_3"), plan), plan)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        ours = module(ids, mask)[0]
    ref = reference_forward("t5", model, NUM_BLOCKS, plan.skip, plan.reuse, ids, mask)["last_hidden_state"]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_broken_checkpoints_are_clear_errors(tiny_models, tmp_path):
    from skrr_export.errors import ModelError

    model, _ = tiny_models["bert"]
    plan = make_plan("bert", "dense")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    shards = sorted(sharded.glob("*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(ModelError, match=f"names {shards[-1].name}, which does not exist"):
        load_encoder(ModelSource(sharded), plan)
    single = tmp_path / "single"
    model.save_pretrained(single)
    data = (single / "model.safetensors").read_bytes()
    (single / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="model.safetensors"):
        load_encoder(ModelSource(single), plan)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((single / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ModelError, match="holds only pickle weights"):
        load_encoder(ModelSource(pickled), plan)


def test_missing_extra_and_quantized_tensors_are_refused(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    from skrr_export.errors import ModelError

    model, _ = tiny_models["t5"]
    model.save_pretrained(tmp_path / "ref")
    tensors = load_file(tmp_path / "ref" / "model.safetensors")
    plan = make_plan("t5", "heavy-reuse")  # block 1 is skipped: its tensors are never read, but must exist

    def folder_with(name, changed):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
        save_file(changed, folder / "model.safetensors", metadata={"format": "pt"})
        return ModelSource(folder)

    extra = dict(tensors, **{"encoder.block.7.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)})
    with pytest.raises(ModelError, match="has 1 tensors this t5 model does not have, e.g. 'encoder.block.7"):
        load_encoder(folder_with("extra", extra), plan)
    missing = {k: v for k, v in tensors.items() if k != "encoder.block.1.layer.1.DenseReluDense.wo.weight"}
    with pytest.raises(ModelError, match="has no tensor 'encoder.block.1.layer.1.DenseReluDense.wo.weight'"):
        load_encoder(folder_with("missing", missing), plan)
    quantized = dict(tensors, **{"encoder.block.0.layer.0.SelfAttention.q.weight":
                                 tensors["encoder.block.0.layer.0.SelfAttention.q.weight"].to(torch.int8)})
    with pytest.raises(ModelError, match="is torch.int8 \\(quantized\\?\\)"):
        load_encoder(folder_with("quantized", quantized), plan)
    decoder = dict(tensors, **{"decoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)})
    load_encoder(folder_with("with-decoder", decoder), plan)  # a full T5 checkpoint: the decoder is someone else's


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("family", ["t5", "clip-projection"])
def test_sharded_checkpoints_read_only_kept_tensors_and_match_the_full_model(family, dtype, tiny_models, tmp_path):
    """Issue 5's check, small: sharded bf16/fp32 checkpoints, a recording loader, the fully loaded model as reference."""
    from skrr_export.export import ExportOptions, export_onnx
    from skrr_export.runners import OrtRunner, TorchRunner

    import copy

    model, _ = tiny_models[family]
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    folder = tmp_path / "ckpt"
    copy.deepcopy(model).to(torch_dtype).save_pretrained(folder, max_shard_size="16KB")
    assert len(list(folder.glob("*.safetensors"))) > 2
    plan = make_plan(family, "heavy-reuse")
    enc = load_encoder(ModelSource(folder), plan, "fp32")
    module = apply_plan(enc, plan)
    skipped = {n.removeprefix("text_model.") for i in (1, 2, 3, 4) for n, _ in sub_block_parameters(build_meta(load_config(ModelSource(folder))))[i]}
    assert not {k.removeprefix("text_model.") for k in enc.tensors_read} & skipped
    full = load_whole(build_reference_model(family, seed=1), _read_all(folder))  # another seed: only the load can match
    ids, mask = ids_and_mask()
    ref = reference_forward(plan_family(family), full, NUM_BLOCKS, plan.skip, plan.reuse, ids, mask)
    with torch.no_grad():
        ours = dict(zip(module.output_names, module(ids, mask)))
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=1e-6)
    art = export_onnx(module, tmp_path / "model.onnx", ExportOptions(external_data=True), vocab_size=96)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    with OrtRunner(art.path) as ort_runner, TorchRunner(module, module.output_names) as torch_runner:
        a, b = ort_runner.infer(feed), torch_runner.infer(feed)
    for name in a:
        assert abs(a[name] - b[name]).max() < 1e-4


def load_whole(model, tensors):
    """``model`` with every tensor of the checkpoint loaded: none missing but T5's tied input embedding, none
    unexpected, and every one changed by the load."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    tied = {"encoder.embed_tokens.weight"} if hasattr(model, "shared") else set()
    assert (set(result.missing_keys), set(result.unexpected_keys)) == (tied, set())
    if tied:
        assert model.encoder.embed_tokens.weight is model.shared.weight  # tied: loaded as shared.weight
    after = model.state_dict()
    for name, value in tensors.items():
        assert torch.equal(after[name], value.float()) and not torch.equal(before[name], after[name]), name
    return model.eval()


def _read_all(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_dense_outputs_equal_hugging_face_forward(family, tiny_models):
    """The dense model run one sub-block at a time (for the distance to dense) is the Hugging Face model."""
    model, folder = tiny_models[family]
    feeds = [ids_and_mask(seed=0), ids_and_mask(seed=1)]
    streamed = dense_outputs_streamed(ModelSource(folder), "fp32", feeds)
    for (ids, mask), outputs in zip(feeds, streamed):
        with torch.no_grad():
            hf = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        torch.testing.assert_close(outputs[0], hf.last_hidden_state, rtol=0, atol=1e-6)
        if family.startswith("clip"):
            torch.testing.assert_close(outputs[1], hf.hidden_states[-2], rtol=0, atol=1e-6)


def test_streaming_holds_one_part_and_drops_its_pages(tiny_models, monkeypatch):
    """While a sub-block runs, only it (plus stem and head) is materialized; after it, its tensors are back on the
    meta device and every tensor read was released."""
    from skrr_export.checkpoint import Checkpoint
    from skrr_export.model import PartStreamer

    _, folder = tiny_models["t5"]
    released = []
    release = Checkpoint.release
    monkeypatch.setattr(Checkpoint, "release", lambda self, names: (released.append(names[0]), release(self, names))[1])
    streamer = PartStreamer(ModelSource(folder), "fp32")
    blocks = streamer.enc.sub_blocks
    live = []
    with streamer.part([streamer.enc.stem, streamer.enc.head]):
        for block in blocks:
            with streamer.part([block]):
                live.append([i for i, b in enumerate(blocks) if not all(p.is_meta for _, p in sub_block_parameters(streamer.enc)[i])])
    assert live == [[i] for i in range(len(blocks))]
    assert all(p.is_meta for p in streamer.enc.model.parameters())
    assert sorted(released) == sorted(streamer.ckpt.reads)
