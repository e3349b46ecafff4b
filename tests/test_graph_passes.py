"""The registry of graph rewrites (skrr_export/graph/passes.py): each entry is an onnx_ir pass with a name and a line
on what it does, the package runs it (by its name or its class), and it runs on a small half-precision graph."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import skrr_export
from skrr_export.graph.passes import PASSES, run

ROOT = Path(skrr_export.__file__).parent
ARGUMENTS = {"keep-weights-optimize": ({"w"},), "merge-equal-constants": ({"w"},), "ort-transformer-fusions": ("bert",),
             "store-quantized": ({},), "checkpoint-names": ({"w": "encoder.block.0.w.weight"},)}


def small_model() -> ir.Model:
    """y = Softmax(x @ W^T) in bf16, W a stored weight read through a Transpose."""
    w = onnx.numpy_helper.from_array(np.arange(64, dtype=np.uint16).reshape(8, 8), "w")
    w.data_type = TensorProto.BFLOAT16
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["m"]),
             helper.make_node("Softmax", ["m"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 8])], [w])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10))


@pytest.mark.parametrize("name", PASSES)
def test_each_registered_pass_is_a_named_onnx_ir_pass_that_runs(name):
    entry = PASSES[name]
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name)
    assert issubclass(entry.cls, ir.passes.PassBase) and entry.description and "\n" not in entry.description
    if name == "ort-transformer-fusions":
        pytest.importorskip("onnxruntime.transformers.optimizer")
    result = entry.cls(*ARGUMENTS.get(name, ()))(small_model())
    assert isinstance(result, ir.passes.PassResult) and isinstance(result.model, ir.Model)
    ir.to_proto(result.model)  # still a model that serializes


def test_each_registered_pass_is_used_by_the_package():
    """By its registered name, or its class named outside its own module or constructed inside it."""
    sources = {p: p.read_text() for p in ROOT.rglob("*.py") if p.name != "passes.py"}

    def used(name: str, cls: type) -> bool:
        home = Path(inspect.getfile(cls))
        return any(f'"{name}"' in text or (re.search(rf"\b{cls.__name__}\b", text) and path != home)
                   or re.search(rf"(?<!class ){cls.__name__}\(", text) for path, text in sources.items())

    assert [name for name, entry in PASSES.items() if not used(name, entry.cls)] == []


def test_the_parity_rewrites_keep_weights_as_stored():
    """fp32-arithmetic widens by nodes only: the weight stays one bf16 initializer, read through a Cast."""
    model = small_model()
    run(model, "fp32-arithmetic")
    assert model.graph.initializers["w"].const_value.dtype == ir.DataType.BFLOAT16
    kept = [n.op_type for n in model.graph if n.op_type in ("FusedMatMul", "Transpose", "Cast")]
    assert kept == ["Cast", "FusedMatMul"]
