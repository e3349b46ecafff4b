"""Each of the export's graph passes alone, on small graphs built for it; the weight invariant as its own pass."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from skrr_export.errors import InvariantError
from skrr_export.export import WeightsOnce, graph_passes
from skrr_export.graph.export_passes import KeepWeightsOptimize, MergeEqualConstants, RmsNormAsDiv, StripDebugMetadata


def model_of(nodes, inputs, outputs, initializers=()) -> ir.Model:  # type: ignore[no-untyped-def]
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


def tensor(name: str, shape: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def run(model: ir.Model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def test_rms_norm_as_div_rewrites_the_reciprocal_and_computes_the_same():
    model = model_of([helper.make_node("Sqrt", ["v"], ["s"]), helper.make_node("Reciprocal", ["s"], ["r"]),
                      helper.make_node("Mul", ["x", "r"], ["y"])], [tensor("x", [2, 4]), tensor("v", [2, 1])],
                     [tensor("y", [2, 4])])
    feed = {"x": np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32), "v": np.array([[2.0], [3.0]], np.float32)}
    before = run(model, feed)[0]
    assert RmsNormAsDiv()(model).modified
    assert "Reciprocal" not in ops(model) and "Div" in ops(model)
    np.testing.assert_allclose(run(model, feed)[0], before, rtol=1e-6)
    assert not RmsNormAsDiv()(model).modified  # nothing left to rewrite


def test_merge_equal_constants_merges_constants_but_never_weights():
    one = np.ones((4,), np.float32)
    inits = [numpy_helper.from_array(one, n) for n in ("c1", "c2", "w1", "w2")]
    nodes = [helper.make_node("Add", ["x", n], [f"y{i}"]) for i, n in enumerate(("c1", "c2", "w1", "w2"))]
    outs = [tensor(f"y{i}", [4]) for i in range(4)]
    model = model_of(nodes, [tensor("x", [4])], outs, inits)
    assert MergeEqualConstants({"w1", "w2"})(model).modified
    assert sorted(model.graph.initializers) == ["c1", "w1", "w2"]
    assert [n.inputs[1].name for n in model.graph] == ["c1", "c1", "w1", "w2"]


def test_strip_debug_metadata_leaves_no_stack_traces():
    model = model_of([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [2])], [tensor("y", [2])])
    node = next(iter(model.graph))
    node.metadata_props["pkg.torch.onnx.stack_trace"] = 'File "/home/someone/skrr_export/apply.py", line 1'
    assert StripDebugMetadata()(model).modified
    assert not node.metadata_props


def test_keep_weights_optimize_folds_constants_but_not_what_reads_a_weight():
    w = numpy_helper.from_array(np.arange(9, dtype=np.float32).reshape(3, 3), "layer.weight")
    a, b = (numpy_helper.from_array(np.full((3,), v, np.float32), n) for v, n in ((1.0, "a"), (2.0, "b")))
    nodes = [helper.make_node("Transpose", ["layer.weight"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["h"]),  # x @ W^T: the Transpose reads a weight
             helper.make_node("Add", ["a", "b"], ["c"]),  # constants only: folded
             helper.make_node("Add", ["h", "c"], ["y"])]
    model = model_of(nodes, [tensor("x", [1, 3])], [tensor("y", [1, 3])], [w, a, b])
    x = np.ones((1, 3), np.float32)
    before = run(model, {"x": x})[0]
    KeepWeightsOptimize({"layer.weight"})(model)
    assert "layer.weight" in model.graph.initializers and "Transpose" in ops(model)
    assert ops(model).count("Add") == 1  # a + b became one constant
    np.testing.assert_allclose(run(model, {"x": x})[0], before)


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 2)
        self.b = self.a  # one module under two names: its parameters go by two names each


def initializers_for(names_and_values: dict[str, torch.Tensor], extra: dict[str, np.ndarray]) -> ir.Model:
    inits = [numpy_helper.from_array(v.detach().numpy(), n) for n, v in names_and_values.items()]
    inits += [numpy_helper.from_array(v, n) for n, v in extra.items()]
    return model_of([helper.make_node("Identity", ["x"], ["y"])], [tensor("x", [1])], [tensor("y", [1])], inits)


def test_weights_once_counts_weights_and_constants_apart():
    module = Tied()
    model = initializers_for({"a.weight": module.a.weight, "a.bias": module.a.bias}, {"shape": np.zeros(3, np.float32)})
    check = WeightsOnce(module)
    assert not check(model).modified
    assert check.stored is not None
    assert (check.stored.weight_count, check.stored.weight_bytes) == (2, (6 + 2) * 4)
    assert (check.stored.constant_count, check.stored.constant_bytes) == (1, 12)


def test_weights_once_refuses_a_parameter_stored_twice_or_missing():
    module = Tied()
    twice = initializers_for({"a.weight": module.a.weight, "b.weight": module.b.weight, "a.bias": module.a.bias}, {})
    with pytest.raises(InvariantError, match="stored twice"):
        WeightsOnce(module)(twice)
    missing = initializers_for({"a.weight": module.a.weight}, {"bias_copy": module.a.bias.detach().numpy()})
    with pytest.raises(InvariantError, match="parameter a.bias is not stored as a weight"):
        WeightsOnce(module)(missing)


def test_the_export_runs_these_passes_in_order():
    names = [type(p).__name__ for p in graph_passes(set()).passes]
    assert names == ["KeepWeightsOptimize", "RmsNormAsDiv", "MergeEqualConstants", "StripDebugMetadata"]


def test_checkpoint_names_renames_weights_in_place_and_order_and_refuses_one_parameter_twice():
    """The module's paths become the checkpoint's names, readers follow, the initializers keep their order (the file
    changes by names only); two initializers that would share a name are one parameter stored twice."""
    from skrr_export.graph.names import CheckpointNames

    inits = [numpy_helper.from_array(np.full(3, v, np.float32), n) for n, v in (("stem.w", 1), ("val_1", 2), ("kept.0.w", 3))]
    nodes = [helper.make_node("Add", ["x", "stem.w"], ["a"]), helper.make_node("Add", ["a", "kept.0.w"], ["b"]),
             helper.make_node("Add", ["b", "val_1"], ["y"])]
    model = model_of(nodes, [tensor("x", [3])], [tensor("y", [3])], inits)
    names = {"stem.w": "shared.weight", "kept.0.w": "encoder.block.0.w.weight", "unused": "x.weight"}
    assert CheckpointNames(names)(model).modified
    assert list(model.graph.initializers) == ["shared.weight", "val_1", "encoder.block.0.w.weight"]
    assert [n.inputs[1].name for n in model.graph] == ["shared.weight", "encoder.block.0.w.weight", "val_1"]
    proto = ir.to_proto(model)
    assert [i.name for i in proto.graph.initializer] == ["shared.weight", "val_1", "encoder.block.0.w.weight"]
    assert not CheckpointNames(names)(model).modified  # named already
    twice = model_of(nodes, [tensor("x", [3])], [tensor("y", [3])], inits)
    with pytest.raises(InvariantError, match="stores shared.weight twice"):
        CheckpointNames({"stem.w": "shared.weight", "kept.0.w": "shared.weight"})(twice)
    assert list(twice.graph.initializers) == ["stem.w", "val_1", "kept.0.w"]  # nothing renamed
