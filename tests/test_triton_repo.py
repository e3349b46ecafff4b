"""What `skrr-export triton --backend python --text` writes, checked without a server (test_triton_server.py serves
it): max_batch_size follows the batch the export was made for, a bf16 ONNX says which outputs are bf16 and what a
client receives, and a failure leaves no model folder behind. A hand-made ONNX with a report.json stands in for an
export (only its header is read)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from skrr_export.cli import main
from skrr_export.triton_repo import model_file

model_config = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is not installed")


def parse(path: Path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config.ModelConfig())


def fake_export(folder: Path, dtype: int, tokenizer: Path | None, batch: dict | None, fixed: int | None = None) -> Path:
    """model.onnx (input_ids, attention_mask -> last_hidden_state of ``dtype``) and the report.json fields triton reads."""
    folder.mkdir(parents=True)
    seq = fixed or "s"
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", seq])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", seq])
    out = helper.make_tensor_value_info("last_hidden_state", dtype, ["b", seq, 4])
    table = helper.make_tensor("table", dtype, [10, 4], [0.5] * 40)
    graph = helper.make_graph([helper.make_node("Gather", ["table", "input_ids"], ["last_hidden_state"])], "fake",
                              [ids, mask], [out], [table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(folder / "model.onnx"))
    report = {"model": {"family": "bert", "tokenizer": str(tokenizer) if tokenizer else None},
              "pipeline": {"call": None, "attention_mask": True}, "onnx": {"export_options": {"fixed_sequence": fixed}},
              "provenance": {"settings": {"engine_options": {"batch": batch}}} if batch else None}
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_the_repository_follows_the_batch_the_export_was_made_for(tmp_path, minilm_path):
    """A recipe's batch 1,1,4 (recorded in report.json) gives max_batch_size 4 to the encoder, the tokenizer and the
    ensemble; the ensemble maps TEXT -> tokenizer -> encoder and the tokenizer pads as the pipeline (the longest
    prompt, truncated at sentence-transformers' 256)."""
    art = fake_export(tmp_path / "art", TensorProto.FLOAT, minilm_path, {"min": 1, "opt": 1, "max": 4})
    repo = tmp_path / "repo"
    assert main(["triton", "--artifacts", str(art), "--repo", str(repo), "--name", "m", "--backend", "python", "--text",
                 "--python-env", "/opt/env.tar.gz", "-q"]) == 0
    encoder, tokenizer, ensemble = (parse(repo / n / "config.pbtxt") for n in ("m", "m_tokenizer", "m_text"))
    assert encoder.max_batch_size == tokenizer.max_batch_size == ensemble.max_batch_size == 4
    assert encoder.backend == "python" and encoder.HasField("dynamic_batching")
    assert encoder.parameters["EXECUTION_ENV_PATH"].string_value == "/opt/env.tar.gz"
    assert tokenizer.parameters["padding"].string_value == "longest" and tokenizer.parameters["max_length"].string_value == "256"
    assert [o.name for o in tokenizer.output] == ["input_ids", "attention_mask"]
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["m_tokenizer", "m"] and dict(steps[1].input_map) == dict(steps[0].output_map)
    assert ensemble.input[0].data_type == model_config.TYPE_STRING and list(ensemble.input[0].dims) == [1]
    assert (repo / "m" / "1" / "model.py").read_text() == model_file("onnx_runtime.py")
    assert (repo / "m_tokenizer" / "1" / "tokenizer" / "tokenizer.json").is_file()
    assert not (repo / "m_tokenizer" / "1" / "tokenizer" / "model.safetensors").exists(), "weights are not tokenizer files"
    assert main(["triton", "--artifacts", str(art), "--repo", str(repo), "--name", "plain", "--backend", "onnx", "-q"]) == 0
    assert parse(repo / "plain" / "config.pbtxt").max_batch_size == 4, "the onnxruntime backend follows it too (was 8)"


def test_a_bf16_export_says_which_outputs_are_bf16_and_what_a_client_receives(tmp_path, caplog, minilm_path):
    art = fake_export(tmp_path / "art", TensorProto.BFLOAT16, minilm_path, None, fixed=8)
    repo = tmp_path / "repo"
    assert main(["triton", "--artifacts", str(art), "--repo", str(repo), "--name", "ort", "--backend", "onnx"]) == 0
    err = caplog.text  # the console's warning line
    text = (repo / "ort" / "config.pbtxt").read_text()
    assert "# last_hidden_state: bf16; Triton returns TYPE_BF16" in text and "ml_dtypes.bfloat16" in text
    assert "last_hidden_state: bf16; Triton returns TYPE_BF16" in err
    assert parse(repo / "ort" / "config.pbtxt").output[0].data_type == model_config.TYPE_BF16
    caplog.clear()
    assert main(["triton", "--artifacts", str(art), "--repo", str(repo), "--name", "py", "--backend", "python", "--text"]) == 0
    err = caplog.text
    assert "last_hidden_state: bf16 in model.onnx; this Python-backend model returns them as FP32" in err
    for name in ("py", "py_text"):
        cfg = parse(repo / name / "config.pbtxt")
        assert cfg.output[0].data_type == model_config.TYPE_FP32 and "bf16 in model.onnx" in (repo / name / "config.pbtxt").read_text()
    assert parse(repo / "py" / "config.pbtxt").parameters["precision"].string_value == "bf16"
    tok = parse(repo / "py_tokenizer" / "config.pbtxt")
    assert tok.parameters["padding"].string_value == "max_length" and tok.parameters["max_length"].string_value == "8"


class FakeTritonModelException(Exception):
    pass


def encoder_model_py(monkeypatch) -> dict:
    """The Python-backend encoder's model.py, run against a stand-in for Triton's triton_python_backend_utils."""
    fake = types.ModuleType("triton_python_backend_utils")
    fake.TritonModelException = FakeTritonModelException
    fake.Tensor = lambda name, array: (name, array)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    namespace: dict = {}
    exec(compile(model_file("onnx_runtime.py"), "model.py", "exec"), namespace)
    return namespace


def test_the_python_backend_refuses_a_bf16_export_on_cpu_in_one_line(tmp_path, monkeypatch):
    """model.py's initialize on a CPU instance: one line naming the reason and what to do, before ONNX Runtime sees
    the graph (its CPU provider has no bf16 kernels)."""
    namespace = encoder_model_py(monkeypatch)
    config = {"name": "t5_skrr", "parameters": {"precision": {"string_value": "bf16"}}, "input": [], "output": []}
    args = {"model_config": json.dumps(config), "model_repository": str(tmp_path), "model_version": "1",
            "model_instance_kind": "CPU", "model_instance_device_id": "0"}
    with pytest.raises(FakeTritonModelException) as info:
        namespace["TritonPythonModel"]().initialize(args)
    message = str(info.value)
    assert "\n" not in message and "bf16" in message and "CPU provider has no bf16 kernels" in message
    assert namespace["as_float32"](__import__("numpy").array([0x3F80, 0xC000], dtype="uint16")).tolist() == [1.0, -2.0]


def test_bf16_outputs_reach_the_client_widened_exactly_and_batches_split_per_request(monkeypatch):
    """ONNX Runtime's Python API has no numpy type for bf16 (session.run raises): model.py binds the outputs to CPU
    memory and widens their 16-bit words; two requests run as one batch get their own rows back."""
    import ml_dtypes
    import numpy as np
    import onnxruntime as ort

    nodes = [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["f", "scale"], ["g"]),
             helper.make_node("Cast", ["g"], ["last_hidden_state"], to=TensorProto.BFLOAT16)]
    graph = helper.make_graph(nodes, "bf16", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("last_hidden_state", TensorProto.BFLOAT16, ["b", "s"])],
                              [helper.make_tensor("scale", TensorProto.FLOAT, [], [1.0 / 3.0])])
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)],
                                                     ir_version=10).SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="bfloat16"):
        session.run(None, {"input_ids": np.ones((1, 2), dtype=np.int64)})
    model = encoder_model_py(monkeypatch)["TritonPythonModel"]()
    model.session, model.bf16 = session, True
    model.inputs, model.outputs = [("input_ids", np.int64)], [("last_hidden_state", np.float32)]
    feeds = [{"input_ids": np.array([[1, 2, 3]])}, {"input_ids": np.array([[7, 8, 9], [10, 11, 12]])}]
    answers = model.run(feeds)
    for feed, answer in zip(feeds, answers):
        ((name, got),) = answer
        expected = (feed["input_ids"].astype(np.float32) * np.float32(1.0 / 3.0)).astype(ml_dtypes.bfloat16).astype(np.float32)
        assert name == "last_hidden_state" and got.dtype == np.float32 and got.shape == feed["input_ids"].shape
        np.testing.assert_array_equal(got, expected)


def test_text_without_a_tokenizer_and_a_failure_midway_leave_nothing(tmp_path, capsys, monkeypatch, minilm_path):
    art = fake_export(tmp_path / "art", TensorProto.FLOAT, None, None)
    repo = tmp_path / "repo"
    assert main(["triton", "--artifacts", str(art), "--repo", str(repo), "--backend", "python", "--text"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ran on random token ids" in err[0] and "--tokenizer DIR" in err[0]
    assert not repo.exists() or list(repo.iterdir()) == []

    import skrr_export.triton_repo as tr

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", "tokenizer.json")

    monkeypatch.setattr(tr, "copy_tokenizer", full)
    assert main(["triton", "--artifacts", str(art), "--repo", str(repo), "--backend", "python", "--text",
                 "--tokenizer", str(minilm_path)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert list(repo.iterdir()) == [], "the encoder's folder, written first, is gone too"
    assert main(["triton", "--artifacts", str(art), "--repo", str(repo), "--backend", "python", "--python-env", "env"]) == 2
    assert "give an absolute path" in capsys.readouterr().err


def test_serve_refuses_what_the_local_server_cannot_run(tmp_path, capsys, minilm_path):
    """The local server has the Python backend only, and under numpy 2 its stub hands model.py zeros: serve says
    so, and how to fix it, before starting anything."""
    import numpy

    art = fake_export(tmp_path / "art", TensorProto.FLOAT, minilm_path, None)
    onnx_repo = tmp_path / "onnx_repo"
    assert main(["triton", "--artifacts", str(art), "--repo", str(onnx_repo), "--backend", "onnx", "-q"]) == 0
    assert main(["serve", str(onnx_repo), "--work", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "onnxruntime_onnx backend is not in the local server" in err[0] and "--backend python" in err[0]
    import socket

    with socket.socket() as busy:  # a port another server holds: its readiness answer must not be taken for ours
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(onnx_repo), "--http-port", str(port)]) == 2
        assert f"port {port} on 127.0.0.1 is in use; pass another --http-port" in capsys.readouterr().err
    if numpy.__version__.startswith("1."):
        pytest.skip("this Python has numpy 1.x: nothing to refuse")
    repo = tmp_path / "repo"
    assert main(["triton", "--artifacts", str(art), "--repo", str(repo), "--backend", "python", "-q"]) == 0
    code = main(["serve", str(repo), "--work", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert code == 2 and "every input would arrive as zeros" in err and "--make-env" in err
