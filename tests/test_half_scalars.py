"""Half-precision exports compute what PyTorch computes: no scalar of the model's arithmetic is rounded to bf16/fp16.

PyTorch's eager kernels apply a Python scalar to a half tensor in fp32 and round only the result; the exporter stored
the scalar in the half precision (T5's tanh-GELU read 0.796875 for 0.7978846). The export traces such operations as
Cast up, compute, Cast down (``export.HalfScalarsInFp32``), and a graph walk (``graph.half_scalars``) refuses what
is left."""

from __future__ import annotations

import contextlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper

from skrr_export import export as export_module
from skrr_export.apply import apply_plan
from skrr_export.errors import InvariantError
from skrr_export.export import ExportOptions, HalfScalarsInFp32, export_onnx
from skrr_export.graph.half_scalars import evidently_exact, rounded_scalars
from skrr_export.model import ModelSource, load_encoder

from .helpers import FAMILIES, ids_and_mask
from .test_apply import make_plan

HALVES = ("bf16", "fp16")


def applied(tiny_models, family, precision):
    _, folder = tiny_models[family]
    plan = make_plan(family, "heavy-reuse")
    return apply_plan(load_encoder(ModelSource(folder), plan, precision), plan)


def args_of(module):
    ids, mask = ids_and_mask()
    extra = [torch.zeros_like(ids)] * (len(module.input_names) - 2)  # BERT's token_type_ids
    return ids, mask, *extra


@pytest.mark.parametrize("precision", HALVES)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_mode_changes_nothing_in_eager_pytorch(family, precision, tiny_models):
    """What the export traces under the mode is what eager PyTorch computes without it, bit for bit."""
    module = applied(tiny_models, family, precision)
    with torch.no_grad():
        plain = module(*args_of(module))
        with HalfScalarsInFp32():
            traced = module(*args_of(module))
    for a, b in zip(plain, traced):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("family, precision", [("umt5", "fp16"), ("bert", "fp16")])
def test_no_family_exports_a_rounded_scalar(family, precision, tiny_models, tmp_path):
    """The pairs test_export's half-precision test does not export (it walks every other family and precision)."""
    module = applied(tiny_models, family, precision)
    path = export_onnx(module, tmp_path / "model.onnx", ExportOptions(), vocab_size=96).path
    assert rounded_scalars(ir.load(str(path))) == []


@pytest.mark.parametrize("family, scalars", [("t5", {0.796875, 0.044677734375}), ("clip", {1.703125, 0.353515625}),
                                             ("bert", {0.353515625})])
def test_without_the_mode_the_export_is_refused_naming_the_scalar(family, scalars, tiny_models, tmp_path, monkeypatch):
    """The planted fault: the exporter left to itself. T5's gelu_new, CLIP's quick_gelu and BERT's attention scale
    (1/sqrt(8)) come out rounded to bf16; the walk finds exactly those, and the export fails (a bug of this tool)
    without writing the file."""
    module = applied(tiny_models, family, "bf16")
    monkeypatch.setattr(export_module, "HalfScalarsInFp32", contextlib.nullcontext)
    walked = []
    check = export_module.check_half_scalars
    monkeypatch.setattr(export_module, "check_half_scalars", lambda model: (walked.append(model), check(model)))
    with pytest.raises(InvariantError, match="rounded scalar"):
        export_onnx(module, tmp_path / "model.onnx", ExportOptions(), vocab_size=96)
    assert {f.value for f in rounded_scalars(walked[0])} == scalars
    assert not (tmp_path / "model.onnx").exists()


def _graph(constant: np.ndarray, cast_to: int | None, half: int = TensorProto.BFLOAT16) -> ir.Model:
    """y = x * c, x in ``half``; c stored as ``constant`` (cast to ``cast_to`` first when given)."""
    nodes = [helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(constant, "c"))]
    if cast_to is not None:
        nodes.append(helper.make_node("Cast", ["c"], ["c_half"], to=cast_to))
    nodes.append(helper.make_node("Mul", ["x", "c_half" if cast_to is not None else "c"], ["y"], name="scale"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", half, [2])],
                              [helper.make_tensor_value_info("y", half, [2])])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


def test_the_walk_sees_a_scalar_through_a_cast_with_its_true_value():
    """Storing the scalar in fp32 and casting it to bf16 is the same defect; an exact one passes either way."""
    found = rounded_scalars(_graph(np.array(0.7978846, dtype=np.float32), TensorProto.BFLOAT16))
    assert [(f.node, f.op_type, f.stored_as) for f in found] == [("scale", "Mul", "FLOAT")]
    assert found[0].value == pytest.approx(0.7978846) and "cast to BFLOAT16" in str(found[0])
    assert rounded_scalars(_graph(np.array(0.5, dtype=np.float32), TensorProto.BFLOAT16)) == []
    # fp16 holds 1.702 no better than bf16: rounded either way
    assert len(rounded_scalars(_graph(np.array(1.702, dtype=np.float32), TensorProto.FLOAT16, TensorProto.FLOAT16))) == 1


def test_evidently_exact():
    bf16 = ir.DataType.BFLOAT16
    assert all(evidently_exact(v, bf16) for v in (0.0, 0.5, 1.0, 3.0, -0.125, 0.75, float("-inf"), -3.3895313892515355e38))
    assert not any(evidently_exact(v, bf16) for v in (0.796875, 0.044677734375, 1.703125))
