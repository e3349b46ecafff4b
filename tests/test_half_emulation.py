"""The precision check's CPU emulation rounds exactly where the graph stores a half tensor, and nowhere else.

Reference: numpy with ml_dtypes' bf16/fp16, computing each node in fp32 and rounding its result to the dtype the
graph gives that tensor."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from skrr_export.runners import OrtFp32ArithmeticRunner, OrtHalfEmulationRunner

HALVES = {"bf16": (TensorProto.BFLOAT16, ml_dtypes.bfloat16), "fp16": (TensorProto.FLOAT16, np.float16)}


def graph(path, half):
    """y = x * x (half); t = Cast(y, fp32) * 1.0001 (fp32, stays fp32); z = Cast(t, half) + x (half)."""
    nodes = [helper.make_node("Mul", ["x", "x"], ["y"]),
             helper.make_node("Cast", ["y"], ["y32"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["y32", "k"], ["t"]),
             helper.make_node("Cast", ["t"], ["th"], to=half),
             helper.make_node("Add", ["th", "x"], ["z"])]
    k = onnx.numpy_helper.from_array(np.array(1.0001, dtype=np.float32), "k")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", half, [64])],
                          [helper.make_tensor_value_info("z", half, [64])], [k])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=10), str(path))


@pytest.mark.parametrize("precision", HALVES)
def test_emulation_rounds_each_half_tensor_as_the_graph_stores_it(precision, tmp_path):
    onnx_dtype, dtype = HALVES[precision]
    graph(tmp_path / "model.onnx", onnx_dtype)
    x = np.random.default_rng(0).uniform(1, 2, 64).astype(dtype)
    f = lambda a: np.asarray(a, np.float32)  # noqa: E731
    y = (f(x) * f(x)).astype(dtype)
    t = f(y) * np.float32(1.0001)  # fp32 in the graph: not rounded
    z = (f(t.astype(dtype)) + f(x)).astype(dtype)
    with OrtHalfEmulationRunner(tmp_path / "model.onnx", precision) as runner:
        emulated = runner.infer({"x": f(x)})["z"]
    np.testing.assert_array_equal(emulated, f(z))
    # the fp32-arithmetic copy of the same graph rounds nothing: it differs, so the rounding above is the emulation's
    with OrtFp32ArithmeticRunner(tmp_path / "model.onnx", precision) as runner:
        widened = runner.infer({"x": f(x)})["z"]
    np.testing.assert_allclose(widened, f(x) * f(x) * np.float32(1.0001) + f(x), rtol=1e-6)
    assert not np.array_equal(widened, emulated)


@pytest.mark.parametrize("runner", [OrtFp32ArithmeticRunner, OrtHalfEmulationRunner])
def test_the_rewritten_copy_reads_its_weight_from_the_original_file(runner, tmp_path):
    """y = x @ W with a 32 KiB bf16 weight stored inside model.onnx: the copy the check runs refers to the weight's
    bytes in model.onnx (external data at its offset) instead of holding them, and computes x @ W exactly."""
    onnx_dtype, dtype = HALVES["bf16"]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 128)).astype(dtype)
    x = rng.standard_normal((2, 128)).astype(dtype)
    weight = onnx.numpy_helper.from_array(w.view(np.uint16), "w")
    weight.data_type = onnx_dtype
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx_dtype, [2, 128])],
                          [helper.make_tensor_value_info("y", onnx_dtype, [2, 128])], [weight])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=10), str(tmp_path / "model.onnx"))
    with runner(tmp_path / "model.onnx", "bf16") as r:
        y = r.infer({"x": np.asarray(x, np.float32)})["y"]
        copy = onnx.load(str(r.copy), load_external_data=False)
        assert r.copy.stat().st_size < w.nbytes / 4
    stored = next(t for t in copy.graph.initializer if t.name == "w")
    assert {e.key: e.value for e in stored.external_data}["location"] == "model.onnx"
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    expected = exact.astype(np.float32) if runner is OrtFp32ArithmeticRunner else exact.astype(dtype).astype(np.float32)
    np.testing.assert_allclose(y, expected, rtol=1e-5 if runner is OrtFp32ArithmeticRunner else 1e-2, atol=1e-5)
