"""The streamed save (graph.save) writes the bytes onnx_ir.save writes for the same in-memory model, holding one
tensor at a time: compared on real exports (tiny T5 and BERT, fp32 and bf16, single file and external data) and
measured on a synthetic model in a child process."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import onnx_ir as ir
import pytest

import skrr_export.export as export_module
from skrr_export.apply import apply_plan
from skrr_export.export import ExportOptions, export_onnx
from skrr_export.graph import save
from skrr_export.model import ModelSource, load_encoder

from .test_apply import make_plan


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_saved_three_ways(folder, family, precision, tmp_path, monkeypatch, external=None):
    """Export once; at the save, the same in-memory model is written by the export's save, by onnx_ir.save (into
    ``tmp_path/ir``) and, for a single file, streamed with every initializer streamed (into ``tmp_path/all``)."""
    streamed = export_module.save_model
    reference, every = tmp_path / "ir", tmp_path / "all"
    reference.mkdir(), every.mkdir()

    def three(model, path, external_data):
        streamed(model, path, external_data)
        if not external_data:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(save, "STREAM_MIN_BYTES", 1)
                streamed(model, every / path.name, external_data)
        ir.save(model, str(reference / path.name), **({"external_data": path.name + ".data"} if external_data else {}))

    monkeypatch.setattr(export_module, "save_model", three)
    plan = make_plan(family, "heavy-reuse")
    module = apply_plan(load_encoder(ModelSource(folder), plan, precision), plan)
    art = export_onnx(module, tmp_path / "model.onnx", ExportOptions(external_data=external), vocab_size=96)
    return art, reference, every


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", ["t5", "bert"])
def test_streamed_model_onnx_is_byte_identical_to_onnx_irs(family, precision, tiny_models, tmp_path, monkeypatch):
    """At the default threshold (small tensors inside the serialized proto) and with every initializer streamed."""
    art, reference, every = export_saved_three_ways(tiny_models[family][1], family, precision, tmp_path, monkeypatch)
    assert art.data_path is None
    assert sha256(art.path) == sha256(reference / "model.onnx") == sha256(every / "model.onnx")
    sizes = [v.const_value.nbytes for v in ir.load(str(art.path)).graph.initializers.values()]
    assert sum(n >= save.STREAM_MIN_BYTES for n in sizes) >= 1 and len(sizes) >= 10  # both saves streamed tensors


def test_external_data_is_written_as_onnx_ir_writes_it(tiny_models, tmp_path, monkeypatch):
    art, reference, _ = export_saved_three_ways(tiny_models["t5"][1], "t5", "fp32", tmp_path, monkeypatch, external=True)
    assert art.data_path is not None and art.data_path.stat().st_size > 0
    assert sha256(art.path) == sha256(reference / "model.onnx")
    assert sha256(art.data_path) == sha256(reference / "model.onnx.data")


CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import onnx_ir as ir
    from pathlib import Path
    from skrr_export.graph.save import save_streaming

    count, mib = 8, 32
    inits = [ir.Value(name=f"w{i}", const_value=ir.tensor(np.full(mib * 2**18, i, np.float32) + np.arange(mib * 2**18,
             dtype=np.float32), name=f"w{i}")) for i in range(count)]
    x = ir.Value(name="x", shape=ir.Shape([mib * 2**18]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("Add", [x, inits[0]])
    node.outputs[0].name, node.outputs[0].shape, node.outputs[0].type = "y", x.shape, x.type
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node], initializers=inits, opset_imports={"": 20}, name="g"),
                     ir_version=10)
    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current RSS
    before = status("VmRSS")
    if sys.argv[1] == "streaming":
        save_streaming(model, Path(sys.argv[2]))
    else:
        ir.save(model, sys.argv[2])
    print(status("VmHWM") - before, count * mib * 2**20)
""")


def test_the_streamed_save_holds_one_tensor_at_a_time(tmp_path):
    """256 MiB of weights in 32 MiB tensors: the streamed save adds about one tensor to the peak, onnx_ir.save (the
    whole proto, then its serialization) about twice the weights. The files are the same."""
    grown = {}
    for way in ("streaming", "onnx_ir"):
        done = subprocess.run([sys.executable, "-c", CHILD, way, str(tmp_path / f"{way}.onnx")], capture_output=True,
                              text=True, timeout=300, check=True)
        grown[way], weights = (int(v) for v in done.stdout.split())
    assert grown["streaming"] <= 96 * 2**20, grown  # a 32 MiB tensor or two and the proto (64.004 MiB seen)
    assert grown["onnx_ir"] >= 1.5 * weights, grown  # the measurement sees what the streamed save avoids
    assert sha256(tmp_path / "streaming.onnx") == sha256(tmp_path / "onnx_ir.onnx")


def test_a_model_the_checker_refuses_is_not_left_on_disk(tmp_path):
    """The check after the save (onnx.checker on the small serialization, the streamed tensors pointing into the file
    written) refuses an invalid graph: InvariantError (exit 3), no file, no probe file beside it."""
    import numpy as np

    from skrr_export.errors import InvariantError

    weight = ir.Value(name="w", const_value=ir.tensor(np.arange(4096, dtype=np.float32), name="w"))
    x = ir.Value(name="x", shape=ir.Shape([4096]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("Add", [x, weight])
    node.outputs[0].name, node.outputs[0].shape, node.outputs[0].type = "y", x.shape, x.type
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node], initializers=[weight], opset_imports={"": 20}, name="g"),
                     ir_version=10)
    save.save_streaming(model, tmp_path / "good.onnx")  # valid: checked, and kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.onnx"]
    node.op_type = "NoSuchOp"
    with pytest.raises(InvariantError, match="fails onnx.checker") as raised:
        save.save_streaming(model, tmp_path / "bad.onnx")
    assert raised.value.exit_code == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.onnx"]
