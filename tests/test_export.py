"""ONNX export: ONNX Runtime matches PyTorch, every weight is stored once, options do what they say."""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from skrr_export.adapters import complete_feed
from skrr_export.apply import apply_plan, computed_in_fp32, unique_parameter_bytes
from skrr_export.compare import DEFAULT_TOLERANCES, compare
from skrr_export.errors import ArtifactError
from skrr_export.artifacts import SMALL_CONSTANT_BYTES, onnx_initializer_sizes, onnx_weight_bytes
from skrr_export.export import ExportOptions, export_onnx
from skrr_export.graph.half_scalars import rounded_scalars
from skrr_export.model import ModelSource, load_encoder
from skrr_export.runners import OrtFp32ArithmeticRunner, OrtRunner, TorchRunner

from .helpers import FAMILIES, NUM_BLOCKS, ids_and_mask, plant_wiring_error
from .test_apply import make_plan


_EXPORTS: dict[tuple, tuple] = {}  # one export per (family, plan, precision, options) in this process


def exported(tiny_models, family, tmp_path, plan_name="heavy-reuse", precision="fp32", **options):
    """The module and its export, copied into ``tmp_path`` (each test may edit its own file). Exported once per
    process for the same arguments; the module is the one exported, shared by the tests (none changes it)."""
    key = (family, plan_name, precision, tuple(sorted(options.items())))
    if key not in _EXPORTS:
        _, folder = tiny_models[family]
        plan = make_plan(family, plan_name)
        module = apply_plan(load_encoder(ModelSource(folder), plan, precision), plan)
        where = Path(tempfile.mkdtemp(prefix="skrr-test-export-"))
        atexit.register(shutil.rmtree, where, True)
        _EXPORTS[key] = module, export_onnx(module, where / "model.onnx", ExportOptions(**options), vocab_size=96)
    module, art = _EXPORTS[key]
    copies = [shutil.copy(f, tmp_path / f.name) for f in (art.path, art.data_path) if f is not None]
    return module, dataclasses.replace(art, path=Path(copies[0]), data_path=Path(copies[1]) if len(copies) > 1 else None)


def feed(dtype="int64", seed=0, module=None):
    """A padded batch; with ``module``, every input it takes (BERT's token_type_ids: zeros)."""
    ids, mask = ids_and_mask(seed=seed)
    batch = {"input_ids": ids.numpy().astype(dtype), "attention_mask": mask.numpy().astype(dtype)}
    return complete_feed(module.inputs, batch) if module is not None else batch


def parity(module, art, batch, precision="fp32"):
    batch = complete_feed(module.inputs, batch)  # BERT's token_type_ids: zeros
    with TorchRunner(module, module.output_names) as t, OrtRunner(art.path) as o:
        return compare(("pytorch", t.infer(batch)), ("onnxruntime", o.infer(batch)), batch["attention_mask"],
                       {"*": DEFAULT_TOLERANCES["wiring" if precision == "fp32" else f"precision-{precision}"]})


def initializer_digests(path):
    model = onnx.load(str(path))
    return [hashlib.sha256(onnx.numpy_helper.to_array(i).tobytes()).hexdigest() + str(i.dims) for i in model.graph.initializer]


@pytest.mark.parametrize("family", FAMILIES)
def test_heavy_reuse_export_matches_pytorch_and_stores_weights_once(family, tiny_models, tmp_path):
    module, art = exported(tiny_models, family, tmp_path)
    result = parity(module, art, feed())
    assert result, str(result)
    assert [o.name for o in result.outputs] == list(module.output_names)
    # read back from the file, independently of the exporter's own count: one initializer per parameter, named as
    # the Hugging Face model (the checkpoint) names it and holding its values, exactly the module's unique parameter
    # bytes in all; the rest are small constants
    model = onnx.load(str(art.path))
    sizes = dict(zip((i.name for i in model.graph.initializer), onnx_initializer_sizes(art.path)))
    reference = dict(tiny_models[family][0].named_parameters())  # the checkpoint's names (a tied weight: its first)
    stored = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name in reference}
    assert len(stored) == len({id(p) for p in module.parameters()}) == len(sizes) - art.initializers.constant_count
    for name, values in stored.items():
        np.testing.assert_array_equal(values, reference[name].detach().numpy(), err_msg=name)
    assert not [n for n in sizes if n.startswith(("kept.", "stem.", "head."))]  # no module path left
    assert sum(sizes[n] for n in stored) == unique_parameter_bytes(module) == art.initializers.weight_bytes
    assert sum(sizes[n] for n in sizes if n not in stored) == art.initializers.constant_bytes <= SMALL_CONSTANT_BYTES
    assert onnx_weight_bytes(art.path) == art.initializer_bytes
    assert model.ir_version <= 10


def test_bert_segment_ids_are_an_input_wired_as_hugging_face_wires_them(tiny_models, tmp_path):
    """BERT's token_type_ids are the graph's third input, with the same dynamic axes, and ONNX Runtime given segment
    ids matches BertModel given them; left out in PyTorch, every token is segment 0, as in BertModel."""
    model, _ = tiny_models["bert"]
    module, art = exported(tiny_models, "bert", tmp_path, plan_name="dense")
    graph = onnx.load(str(art.path)).graph
    assert art.input_names == tuple(i.name for i in graph.input) == ("input_ids", "attention_mask", "token_type_ids")
    assert {tuple(d.dim_param for d in i.type.tensor_type.shape.dim) for i in graph.input} == {("batch", "sequence")}
    ids, mask = ids_and_mask()
    segments = torch.zeros_like(ids)
    segments[:, 4:] = 1
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask, token_type_ids=segments).last_hidden_state
        theirs_without = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours_without = module(ids, mask)[0]
    with OrtRunner(art.path) as runner:
        ours = runner.infer({"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": segments.numpy()})
    np.testing.assert_allclose(ours["last_hidden_state"], theirs.numpy(), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_without, theirs_without, rtol=0, atol=1e-6)
    assert (theirs - theirs_without).abs().max() > 0.1, "segment 1 must change the embeddings"


def test_a_reused_weight_is_read_through_one_transpose(tiny_models, tmp_path):
    """The exporter wrote a folded, transposed copy of a re-used weight per call site (DESIGN.md); now the weight
    stays one named initializer and every slot reads the same Transpose of it."""
    module, art = exported(tiny_models, "t5", tmp_path)
    model = onnx.load(str(art.path))
    reused = "encoder.block.0.layer.0.SelfAttention.q.weight"  # heavy-reuse runs attention 0 in slots 0, 2 and 4
    readers = [n for n in model.graph.node if reused in n.input]
    assert [n.op_type for n in readers] == ["Transpose"]
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and readers[0].output[0] in n.input]
    assert len(matmuls) == 3


def test_parameters_with_equal_values_stay_two_weights(tiny_models, tmp_path):
    """Deduplication is by identity: two different parameters that happen to hold the same numbers are two named
    weights (refit and weight-stripped engines address each parameter by name)."""
    plan = make_plan("bert", "dense")
    module = apply_plan(load_encoder(ModelSource(tiny_models["bert"][1]), plan), plan)
    with torch.no_grad():
        for sub_block in module.kept.values():  # every sub-block's norm bias holds the same values
            for name, p in sub_block.named_parameters():
                if name.endswith("LayerNorm.bias"):
                    p.fill_(0.25)
    art = export_onnx(module, tmp_path / "model.onnx", ExportOptions(), vocab_size=96)
    names = {i.name for i in onnx.load(str(art.path)).graph.initializer}
    biases = {module.checkpoint_name(n) for n, _ in module.named_parameters()
              if n.endswith("LayerNorm.bias") and n.startswith("kept.")}
    assert len(biases) == 2 * NUM_BLOCKS and biases <= names
    assert art.initializers.weight_bytes == unique_parameter_bytes(module)


@pytest.mark.parametrize("family, seq", [("t5", 300), ("umt5", 256), ("clip", 64), ("bert", 64)])
def test_fixed_sequence_stores_weights_once_and_matches(family, seq, tiny_models, tmp_path):
    """The recipes' fixed sequences: T5's position buckets stay computed in the graph instead of [S, S] tables."""
    module, art = exported(tiny_models, family, tmp_path, fixed_sequence=seq)
    assert art.initializers.weight_bytes == unique_parameter_bytes(module)
    assert art.initializers.constant_bytes < 8 * seq * seq  # less than one [S, S] int64 table
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 96, size=(2, seq))
    mask = np.ones_like(ids)
    mask[1, seq // 3:] = 0
    ids[:, -1] = 4
    result = parity(module, art, {"input_ids": ids, "attention_mask": mask})
    assert result, str(result)


def test_dynamic_batch_and_sequence(tiny_models, tmp_path):
    module, art = exported(tiny_models, "clip", tmp_path)
    rng = np.random.default_rng(3)
    for batch, seq in ((1, 4), (5, 17)):
        ids = rng.integers(5, 96, size=(batch, seq))
        ids[:, -1] = 4
        result = parity(module, art, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        assert result, str(result)


def test_int32_inputs_and_fixed_sequence(tiny_models, tmp_path):
    module, art = exported(tiny_models, "t5", tmp_path, input_dtype="int32", fixed_sequence=9)
    model = onnx.load(str(art.path))
    ids_type = model.graph.input[0].type.tensor_type
    assert ids_type.elem_type == onnx.TensorProto.INT32
    assert [d.dim_value for d in ids_type.shape.dim][1] == 9
    assert parity(module, art, feed("int32"))


def test_external_data_file_is_written_and_required(tiny_models, tmp_path):
    module, art = exported(tiny_models, "bert", tmp_path, external_data=True)
    assert art.data_path is not None and art.data_path.is_file()
    assert art.data_path.stat().st_size >= art.initializer_bytes * 0.9
    assert parity(module, art, feed())
    art.data_path.unlink()
    with pytest.raises(ArtifactError, match="needs its external data file 'model.onnx.data', which is missing"):
        OrtRunner(art.path).activate()


def test_fp16_t5_export_matches_pytorch(tiny_models, tmp_path):
    module, art = exported(tiny_models, "t5", tmp_path, precision="fp16")
    result = parity(module, art, feed(), precision="fp16")
    assert result, str(result)


@pytest.mark.parametrize("family, precision", [(f, "bf16") for f in FAMILIES] + [("t5", "fp16"), ("clip", "fp16")])
def test_half_export_is_executed_in_fp32_arithmetic_and_catches_a_wiring_error(family, precision, tiny_models, tmp_path):
    """On ONNX Runtime's CPU provider a half-precision graph runs in fp32 on its own weights, against PyTorch
    computing in fp32 on the same weights. The weights keep their precision in the rewritten graph (no fp32 copy);
    a planted wiring error (a re-used slot reading another sub-block's weight) fails the check."""
    module, art = exported(tiny_models, family, tmp_path, precision=precision)
    assert rounded_scalars(ir.load(str(art.path))) == []  # test_half_scalars walks the other pairs
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    batch = complete_feed(module.inputs, feed())
    with computed_in_fp32(module), TorchRunner(module, module.output_names) as torch_runner:
        reference = torch_runner.infer(batch)
    dtypes = {n: p.dtype for n, p in module.named_parameters()}
    assert set(dtypes.values()) <= {half, torch.float32} and half in dtypes.values(), "weights restored after the run"
    tolerances = {"*": DEFAULT_TOLERANCES["wiring"]}
    with OrtFp32ArithmeticRunner(art.path, precision) as runner:
        result = compare(("pytorch", reference), ("onnxruntime", runner.infer(batch)), batch["attention_mask"], tolerances)
        rewritten = onnx.load(str(runner.copy))
    assert result, str(result)
    assert not runner.copy.exists()
    weights = {module.checkpoint_name(n) for n, _ in module.named_parameters(remove_duplicate=False)}  # the file's names
    stored = {i.name: i.data_type for i in onnx.load(str(art.path)).graph.initializer if i.name in weights}
    assert {i.name: i.data_type for i in rewritten.graph.initializer if i.name in weights} == stored
    halves = {n for n, dtype in stored.items() if dtype != onnx.TensorProto.FLOAT}  # T5's fp16 wo stays fp32
    readers = [n for n in rewritten.graph.node if set(n.input) & halves]
    produced = {o: n for n in rewritten.graph.node for o in n.output}
    assert readers and all(n.op_type == "Reshape" for n in readers), "a half weight is read only to be widened"
    # ... and widened only once the activation its reader needs exists (Size of it), not all at the start
    assert all(produced[produced[produced[n.input[1]].input[1]].input[0]].op_type == "Size" for n in readers)
    plant_wiring_error(art.path, every=True)
    with OrtFp32ArithmeticRunner(art.path, precision) as runner:
        planted = compare(("pytorch", reference), ("onnxruntime", runner.infer(batch)), batch["attention_mask"], tolerances)
    assert not planted, f"a wiring error passed the {precision} check"


def test_block_count_is_unrolled_statically(tiny_models, tmp_path):
    """The graph runs exactly the plan's executed slots: count attention softmaxes."""
    _, art = exported(tiny_models, "bert", tmp_path)
    model = onnx.load(str(art.path))
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == NUM_BLOCKS  # heavy-reuse: attention 0 runs in slots 0, 2, 4


def test_the_file_carries_no_source_paths_or_stack_traces(tiny_models, tmp_path):
    """The exporter's per-node debug metadata (stack traces with this checkout's paths and line numbers) is
    dropped: the bytes depend on the model and the plan, not on where or how the code was laid out."""
    _, art = exported(tiny_models, "t5", tmp_path)
    data = art.path.read_bytes()
    model = onnx.load_from_string(data)
    assert not [n.name for n in model.graph.node if n.metadata_props]
    assert b"stack_trace" not in data and b"skrr_export/" not in data


@pytest.mark.parametrize("family, precision", [("t5", "fp32"), ("t5", "fp16"), ("umt5", "fp32")])
@pytest.mark.parametrize("plan_name", ["skip-only", "heavy-reuse"])
def test_every_t5_norm_fuses_in_onnx_runtime(family, precision, plan_name, tiny_models, tmp_path):
    """ONNX Runtime fuses each RMSNorm of the exported graph into one SimplifiedLayerNormalization: one per
    executed slot (each has its own norm) plus the final norm; parity still holds."""
    import onnxruntime as ort

    module, art = exported(tiny_models, family, tmp_path, plan_name, precision)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(art.path), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("SimplifiedLayerNormalization") == len(module.schedule) + 1
    assert "Reciprocal" not in ops
    result = parity(module, art, feed(), precision)
    assert result, str(result)


@pytest.mark.parametrize("family", ["t5", "bert", "clip"])
def test_onnx_runtime_keeps_each_weight_once(family, tiny_models, tmp_path):
    """ONNX Runtime's graph optimizer (extended level) does not copy re-used weights: the initializers of the
    graph it runs hold no more than the exported ones (plus a few bytes of constants)."""
    import onnxruntime as ort

    _, art = exported(tiny_models, family, tmp_path)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(art.path), opts, providers=["CPUExecutionProvider"])
    optimized = onnx_weight_bytes(tmp_path / "optimized.onnx")
    assert optimized <= art.initializer_bytes + 256


def test_export_lets_go_of_the_weights(tiny_models, tmp_path):
    """After the export the module's tensors are freed with the module (onnxscript's rewrite rules keep the last
    graph they matched; the export detaches its tensors), so ONNX Runtime and the dense model get the memory."""
    import gc
    import weakref

    plan = make_plan("t5", "heavy-reuse")
    module = apply_plan(load_encoder(ModelSource(tiny_models["t5"][1]), plan), plan)
    art = export_onnx(module, tmp_path / "model.onnx", ExportOptions(), vocab_size=96)
    weights = [weakref.ref(p) for p in module.parameters()]
    del module
    gc.collect()
    assert art.path.is_file() and not any(w() is not None for w in weights)
