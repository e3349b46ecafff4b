"""ONNX export: ONNX Runtime matches PyTorch, every weight is stored once, options do what they say."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest

from skrr_export.apply import apply_plan
from skrr_export.compare import DEFAULT_TOLERANCES, compare
from skrr_export.errors import ArtifactError
from skrr_export.export import SMALL_CONSTANT_BYTES, ExportOptions, export_onnx, onnx_weight_bytes
from skrr_export.model import ModelSource, load_encoder
from skrr_export.runners import OrtRunner, TorchRunner

from .helpers import FAMILIES, NUM_BLOCKS, ids_and_mask
from .test_apply import make_plan


def exported(tiny_models, family, tmp_path, plan_name="heavy-reuse", precision="fp32", **options):
    _, folder = tiny_models[family]
    plan = make_plan(family, plan_name)
    module = apply_plan(load_encoder(ModelSource(folder), plan, precision), plan)
    art = export_onnx(module, tmp_path / "model.onnx", ExportOptions(**options), vocab_size=96)
    return module, art


def feed(dtype="int64", seed=0):
    ids, mask = ids_and_mask(seed=seed)
    return {"input_ids": ids.numpy().astype(dtype), "attention_mask": mask.numpy().astype(dtype)}


def parity(module, art, batch, precision="fp32"):
    with TorchRunner(module, module.output_names) as t, OrtRunner(art.path) as o:
        return compare(("pytorch", t.infer(batch)), ("onnxruntime", o.infer(batch)), batch["attention_mask"],
                       {"*": DEFAULT_TOLERANCES[precision]})


def initializer_digests(path):
    model = onnx.load(str(path))
    return [hashlib.sha256(onnx.numpy_helper.to_array(i).tobytes()).hexdigest() + str(i.dims) for i in model.graph.initializer]


@pytest.mark.parametrize("family", FAMILIES)
def test_heavy_reuse_export_matches_pytorch_and_stores_weights_once(family, tiny_models, tmp_path):
    module, art = exported(tiny_models, family, tmp_path)
    result = parity(module, art, feed())
    assert result, str(result)
    assert [o.name for o in result.outputs] == list(module.output_names)
    # weight bytes read back from the file, independently of the exporter's own count
    assert onnx_weight_bytes(art.path) == art.initializer_bytes
    assert art.initializer_bytes <= art.unique_parameter_bytes + SMALL_CONSTANT_BYTES
    digests = initializer_digests(art.path)
    assert len(digests) == len(set(digests)), "two initializers with the same content"
    model = onnx.load(str(art.path))
    assert model.ir_version <= 10


def test_dedup_removes_folded_copies_of_reused_weights(tiny_models, tmp_path):
    """Tiny weights (< 8,192 elements) are what the dynamo exporter duplicates per call site (DESIGN.md)."""
    _, art = exported(tiny_models, "t5", tmp_path)
    assert art.duplicates_removed > 0
    assert art.initializer_bytes <= art.unique_parameter_bytes + SMALL_CONSTANT_BYTES


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


def test_bf16_export_is_valid_onnx(tiny_models, tmp_path):
    _, art = exported(tiny_models, "bert", tmp_path, precision="bf16")
    model = onnx.load(str(art.path))
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    weights = {i.data_type for i in model.graph.initializer if len(i.dims) == 2 and i.data_type in floats}
    assert weights == {onnx.TensorProto.BFLOAT16}
    onnx.checker.check_model(model, full_check=True)


def test_block_count_is_unrolled_statically(tiny_models, tmp_path):
    """The graph runs exactly the plan's executed slots: count attention softmaxes."""
    _, art = exported(tiny_models, "bert", tmp_path)
    model = onnx.load(str(art.path))
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == NUM_BLOCKS  # heavy-reuse: attention 0 runs in slots 0, 2, 4


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


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_large_weight_path_dedups_by_memory_and_transposes_lazily(tiny_models, tmp_path, monkeypatch, precision):
    """Real encoders' weights exceed CONTENT_HASH_LIMIT; make every tiny weight 'large' to run that path."""
    import skrr_export.export as export

    monkeypatch.setattr(export, "CONTENT_HASH_LIMIT", 0)
    lazy = []
    real = export._contiguous
    monkeypatch.setattr(export, "_contiguous", lambda array: (lazy.append(array.shape), real(array))[1])
    module, art = exported(tiny_models, "t5", tmp_path, precision=precision)
    assert lazy, "the optimizer's transposed weight views were materialized at save time"
    assert art.initializer_bytes <= art.unique_parameter_bytes + SMALL_CONSTANT_BYTES
    if precision == "fp32":
        assert parity(module, art, feed())
    else:  # no bf16 kernels on ONNX Runtime's CPU provider: compare the stored weights with the default path's
        onnx.checker.check_model(str(art.path), full_check=True)
        monkeypatch.undo()
        (tmp_path / "default").mkdir()
        _, default = exported(tiny_models, "t5", tmp_path / "default", precision=precision)
        assert sorted(initializer_digests(art.path)) == sorted(initializer_digests(default.path))
