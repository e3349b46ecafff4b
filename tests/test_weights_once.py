"""The weights-once invariant without a loophole: each kind of copy of a weight, planted into a real export, is
refused by the export (InvariantError, exit 3, no file written) and by ``inspect --onnx`` (a failed check named
"weights once", exit 1, naming the tensor by its checkpoint name)."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx_ir as ir
import pytest

import skrr_export.export as export_module
from skrr_export.apply import apply_plan
from skrr_export.cli import main
from skrr_export.errors import InvariantError
from skrr_export.export import ExportOptions, export_onnx, weights_once
from skrr_export.graph import weights
from skrr_export.model import ModelSource, load_encoder

from .test_apply import make_plan

# the file names weights as the checkpoint does (heavy-reuse keeps sub-blocks 0 and 5: block 0's attention, block 2's FFN)
Q, WI, WO, EMBED = ("encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.2.layer.1.DenseReluDense.wi_0.weight",
                    "encoder.block.2.layer.1.DenseReluDense.wo.weight", "shared.weight")
ALIAS = "encoder.embed_tokens.weight"  # the checkpoint's other name for shared.weight (tied)
WI_IN_MODULE = "kept.5.layer.DenseReluDense.wi_0.weight"  # WI as the applied module (and the exporter) names it


def _array(model: ir.Model, name: str) -> np.ndarray:
    return np.array(model.graph.initializers[name].const_value.numpy())


def _add(model: ir.Model, name: str, array: np.ndarray) -> None:
    model.graph.register_initializer(ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name)))


def _constant_node(model: ir.Model, name: str, array: np.ndarray) -> None:
    node = ir.node("Constant", [], attributes={"value": ir.tensor(np.ascontiguousarray(array), name=name)}, name=name)
    model.graph.append(node)


def _function_constant(model: ir.Model, name: str, array: np.ndarray) -> None:
    """A model-local function whose body holds the copy in a Constant node."""
    const = ir.node("Constant", [], attributes={"value": ir.tensor(np.ascontiguousarray(array))}, name=name)
    graph = ir.Graph([], const.outputs, nodes=[const], opset_imports={"": 20}, name="planted")
    function = ir.Function("planted.domain", "planted", graph=graph, attributes=[])
    model.functions[function.identifier()] = function


# name -> (plant, the tensor it names, words of what it copies); each plant is applied alone to a fresh model
PLANTS = {
    "transposed copy named val_*": (lambda m: _add(m, "val_9017", _array(m, WI).T), "val_9017", f"{WI} (transposed"),
    "cast copy": (lambda m: _add(m, "val_9018", _array(m, EMBED).astype(np.float16)), "val_9018", "cast to fp16"),
    "reshaped copy": (lambda m: _add(m, "val_9019", _array(m, WO).reshape(4, 8, 48)), "val_9019", f"{WO} (as stored"),
    "contiguous block": (lambda m: _add(m, "val_9020", _array(m, EMBED).reshape(-1)[5:305]), "val_9020",
                         "a block at byte 20"),
    "copy in a Constant node": (lambda m: _constant_node(m, "planted_constant", _array(m, Q).T), "planted_constant",
                                f"{Q} (transposed"),
    "copy in a function's Constant node": (lambda m: _function_constant(m, "planted_in_function", _array(m, WI)),
                                           "planted_in_function", f"{WI} (as stored"),
    "constants over the bound": (lambda m: _add(m, "val_9021", np.random.default_rng(0).standard_normal(17 * 1024)
                                                .astype(np.float32)), "val_9021", "over the bound of 65,536 bytes"),
    "weight stored twice": (lambda m: _add(m, ALIAS, _array(m, EMBED)), ALIAS, f"{EMBED}, stored twice"),
}


@pytest.fixture(scope="module")
def t5(tiny_models, tmp_path_factory):
    """The tiny T5's heavy-reuse export (fp32): (module, plan file, model folder, model.onnx)."""
    _, folder = tiny_models["t5"]
    plan = make_plan("t5", "heavy-reuse")
    module = apply_plan(load_encoder(ModelSource(folder), plan, "fp32"), plan)
    out = tmp_path_factory.mktemp("weights-once")
    art = export_onnx(module, out / "model.onnx", ExportOptions(), vocab_size=96)
    plan_path = out / "plan.json"
    plan_path.write_text(json.dumps(plan.to_json()))
    return module, plan_path, folder, art.path


def inspect(t5, path, capsys) -> tuple[int, str, str]:
    _, plan, folder, _ = t5
    capsys.readouterr()
    code = main(["inspect", "--plan", str(plan), "--model", str(folder), "--onnx", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_export_as_made_passes_in_both_places(t5, capsys):
    module, _, _, path = t5
    stored = weights_once(ir.load(str(path)), module)
    assert stored.weight_bytes == sum(p.numel() * p.element_size() for p in module.parameters())
    code, out, err = inspect(t5, path, capsys)
    assert code == 0, err
    assert "weights once: passed (12 weights" in out and "agrees with the plan in fp32: yes" in out


@pytest.mark.parametrize("kind", PLANTS)
def test_a_planted_copy_fails_the_exports_check_with_exit_3(kind, t5):
    """The check the export runs on its graph (export.weights_once), on the export with one copy planted."""
    module, _, _, path = t5
    plant, name, copies = PLANTS[kind]
    model = ir.load(str(path))
    plant(model)
    with pytest.raises(InvariantError) as raised:
        weights_once(model, module)
    assert raised.value.exit_code == 3
    assert name in str(raised.value) and copies in str(raised.value), str(raised.value)


def test_a_copy_left_by_a_pass_fails_the_export_and_writes_nothing(t5, tmp_path, monkeypatch):
    """The export runs that check after its passes: a pass that leaves a copy (planted after them, where weights
    still go by the module's names) stops it, and the error names the weight as the checkpoint does."""
    module = t5[0]
    _, name, copies = PLANTS["transposed copy named val_*"]
    plant = lambda m: _add(m, name, _array(m, WI_IN_MODULE).T)  # noqa: E731
    passes = export_module.graph_passes
    monkeypatch.setattr(export_module, "graph_passes", lambda names: _Planted(passes(names), plant))
    with pytest.raises(InvariantError) as raised:
        export_onnx(module, tmp_path / "model.onnx", ExportOptions(), vocab_size=96)
    assert raised.value.exit_code == 3 and name in str(raised.value) and copies in str(raised.value)
    assert not (tmp_path / "model.onnx").exists()


class _Planted:
    """The export's passes, then a plant."""

    def __init__(self, passes, plant):
        self.passes, self.plant = passes, plant

    def __call__(self, model):
        result = self.passes(model)
        self.plant(model)
        return result


@pytest.mark.parametrize("kind", PLANTS)
def test_a_planted_copy_fails_inspect_with_exit_1_naming_the_tensor(kind, t5, tmp_path, capsys):
    plant, name, copies = PLANTS[kind]
    model = ir.load(str(t5[3]))
    plant(model)
    ir.save(model, str(tmp_path / "model.onnx"))
    code, out, err = inspect(t5, tmp_path / "model.onnx", capsys)
    assert code == 1, (out, err)
    assert err.count("\n") == 1 and 'check "weights once" failed' in err and name in err, err
    assert copies in err and not re.search(r"\b(kept|stem|head)\.", err), err  # what it copies, by checkpoint name
    assert "weights once: FAILED" in out


def test_the_bound_grows_with_a_fixed_sequence_and_fills_are_not_copies(t5):
    module, _, _, path = t5
    model = ir.load(str(path))
    _add(model, "val_9030", np.random.default_rng(1).standard_normal(17 * 1024).astype(np.float32))  # 68 KiB
    with pytest.raises(InvariantError, match="val_9030"):
        weights_once(model, module)
    assert weights.bound(128) == 65_536 and weights.bound(256) == 262_144
    stored = weights_once(model, module, sequence=256)  # 4 * 256^2 bytes may be stored besides the weights
    assert stored.constant_bytes > 17 * 4096
    fill = ir.load(str(path))
    _add(fill, "val_9031", np.zeros(1024, np.float32))  # zeros: equal to no weight block here, and a fill anyway
    assert weights_once(fill, module).constant_bytes >= 4096


@pytest.fixture(scope="module")
def t5_int8(tiny_models, tmp_path_factory):
    """The tiny T5's heavy-reuse export quantized to int8: (module, quantized weights, model.onnx)."""
    from skrr_export.quantize import Quantization, quantize_module

    plan = make_plan("t5", "heavy-reuse")
    module = apply_plan(load_encoder(ModelSource(tiny_models["t5"][1]), plan, "fp32"), plan)
    quantized = quantize_module(module, Quantization("int8"))
    path = tmp_path_factory.mktemp("weights-once-int8") / "model.onnx"
    return module, quantized, export_onnx(module, path, ExportOptions(), vocab_size=96, quantized=quantized).path


@pytest.mark.parametrize("what", ["integers reshaped", "embedding cast to bf16"])
def test_the_quantized_form_refuses_a_copy_too(what, t5_int8):
    """quantize's check is the same invariant: a copy of a weight's int8 integers, or of a float weight, is refused."""
    from skrr_export.quantize import QUANTIZED_SUFFIX, quantized_weights_once

    module, quantized, path = t5_int8
    model = ir.load(str(path))
    quantized_weights_once(model, module, quantized)  # as exported: passes
    if what == "integers reshaped":
        source = next(n for n in model.graph.initializers if n.endswith(QUANTIZED_SUFFIX))
        _add(model, "val_9040", _array(model, source).reshape(-1, 8))
    else:
        source = EMBED
        _add(model, "val_9040", _array(model, EMBED).astype(weights.FLOATS[ir.DataType.BFLOAT16]))
    with pytest.raises(InvariantError, match=f"val_9040 .* copies weight {source.replace('+', '[+]')}"):
        quantized_weights_once(model, module, quantized)


def test_copies_of_a_bf16_weight_in_wider_or_other_half_dtypes_are_found():
    """bf16 weights (the large exports): an fp32 copy of a block of the transpose (found by narrowing the copy,
    exactly), an fp16 copy of a row block; a random fp32 tensor of the same size copies nothing."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    names = [f"encoder.layer.{i}.w.weight" for i in range(3)]
    values = [rng.standard_normal((64, 96), np.float32).astype(ml_dtypes.bfloat16) for _ in names]
    inits = [ir.Value(name=n, const_value=ir.tensor(v, name=n)) for n, v in zip(names, values)]
    planted = {"val_1": values[1].T[7, 10:60].astype(np.float32),  # 200 bytes: under 1 KiB, ignored
               "val_2": np.ascontiguousarray(values[1].T)[7:12].reshape(-1).astype(np.float32),  # 5 rows of W^T, fp32
               "val_3": values[2][3, 8:96].astype(np.float16),  # 176 bytes: ignored
               "val_4": values[2].reshape(-1)[100:700].astype(np.float16),  # a block, fp16
               "val_5": rng.standard_normal(512).astype(np.float32)}
    inits += [ir.Value(name=n, const_value=ir.tensor(np.ascontiguousarray(a), name=n)) for n, a in planted.items()]
    x = ir.Value(name="x", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.FLOAT))
    model = ir.Model(ir.Graph([x], [x], nodes=[], initializers=inits, name="g"), ir_version=10)
    result = weights.check(model, weights.Expected({n: (n,) for n in names}, frozenset(names), 3 * 64 * 96 * 2))
    found = {v.tensor: v.what for v in result.violations}
    assert sorted(found) == ["val_2", "val_4"], found
    assert found["val_2"] == f"copies weight {names[1]} (transposed, cast to fp32, a block at byte 896)"
    assert found["val_4"] == f"copies weight {names[2]} (as stored, cast to fp16, a block at byte 200)"
