"""trtexec scripts for Jetson (issue 26): the fit check counts the build on the device, offers the weight-stripped
build and the largest batch that fits, takes profiles from the export when there is no engine, refuses a --sequence
that contradicts a fixed graph, and writes engine.plan. The artifacts are a hand-made ONNX (no export, no engine)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import skrr_export.serving as serving
from skrr_export.cli import main
from skrr_export.errors import UserError
from skrr_export.serving import (BUILD_COPIES, GIB, MIN_WORKSPACE, SYSTEM_RESERVE, TARGETS, build_fits, largest_batch,
                                 trtexec_profile, trtexec_script)

HIDDEN = 64
WEIGHTS = 1 << 20  # one fp32 initializer of 1 MiB


def artifacts_folder(folder: Path, sequence: int | str) -> Path:
    """model.onnx: input_ids [batch, sequence] -> Gather from a [4096, 64] fp32 table; no engine.json, no report."""
    folder.mkdir()
    table = numpy_helper.from_array(np.zeros((WEIGHTS // (4 * HIDDEN), HIDDEN), np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["last_hidden_state"])], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", sequence])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", sequence, HIDDEN])], [table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), folder / "model.onnx")
    return folder


@pytest.fixture
def fixed(tmp_path):
    return artifacts_folder(tmp_path / "fixed", 300)


def test_profiles_come_from_the_fixed_sequence_without_an_engine(fixed, tmp_path):
    """An int4 or plain ONNX export has no engine.json: the fixed sequence of the graph is the profile."""
    assert trtexec_profile(fixed, None, None) == {"input_ids": [[1, 300], [1, 300], [8, 300]]}
    assert trtexec_profile(fixed, "1,2,4", "300") == {"input_ids": [[1, 300], [2, 300], [4, 300]]}
    dynamic = artifacts_folder(tmp_path / "dynamic", "sequence")
    with pytest.raises(UserError, match="dynamic sequence and no engine.json"):
        trtexec_profile(dynamic, None, None)


def test_a_sequence_that_contradicts_the_fixed_graph_is_refused_in_one_line(fixed, capsys):
    assert main(["trtexec", "--artifacts", str(fixed), "--sequence", "1,300,512"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--sequence 1,300,512: model.onnx is fixed at sequence 300" in err and "\n" not in err
    assert not (fixed / "build_engine.sh").exists()


def test_the_script_writes_engine_plan_like_the_main_job(fixed):
    assert main(["trtexec", "--artifacts", str(fixed), "--target", "orin-8gb"]) == 0
    text = (fixed / "build_engine.sh").read_text()
    assert "--saveEngine=engine.plan" in text and "model.plan" not in text and "--stripWeights" not in text
    assert "--minShapes=input_ids:1x300" in text and "--maxShapes=input_ids:8x300" in text
    assert subprocess.run(["bash", "-n", str(fixed / "build_engine.sh")]).returncode == 0


def test_build_on_the_device_counts_the_weight_copies():
    w, a = 2 * GIB, 64 << 20
    assert build_fits(w, a, "orin-8gb")[1] == 3 * w + a + MIN_WORKSPACE + SYSTEM_RESERVE  # 7.8 GiB: fits 8 GiB
    assert not build_fits(3 * GIB, a, "orin-8gb")[0] and build_fits(3 * GIB, a, "orin-8gb", "stripped")[0]
    assert BUILD_COPIES == {"full": 3, "stripped": 2}


def test_a_full_build_that_does_not_fit_becomes_weight_stripped(fixed, monkeypatch):
    profile = trtexec_profile(fixed, "1,1,1", None)
    activations = serving.activation_estimate(serving.read_artifacts(fixed, "onnx"), profile)
    room = 2 * WEIGHTS + activations + MIN_WORKSPACE + SYSTEM_RESERVE  # the stripped build, not the full one
    monkeypatch.setitem(TARGETS, "orin-8gb", room)
    text = trtexec_script(fixed, "orin-8gb", profile, None)
    assert "--stripWeights" in text and "--refit" in text and "refit engine.plan from model.onnx" in text
    assert "--memPoolSize=workspace:256M" in text  # the workspace the fit counted, at the edge
    monkeypatch.setitem(TARGETS, "orin-8gb", room - 1)
    monkeypatch.setattr(serving, "recipes_that_fit", lambda *a, **k: [])  # (test_serving lists them; 40 s of meta models)
    with pytest.raises(UserError, match=r"runs on orin-8gb but cannot be built there: even a weight-stripped build"):
        trtexec_script(fixed, "orin-8gb", profile, None)


def test_a_batch_that_does_not_fit_names_the_largest_that_does(fixed, monkeypatch):
    profile = trtexec_profile(fixed, "1,1,8", None)
    per_batch = serving.activation_estimate(serving.read_artifacts(fixed, "onnx"), profile) // 8
    monkeypatch.setitem(TARGETS, "orin-8gb", 2 * WEIGHTS + 3 * per_batch + MIN_WORKSPACE + SYSTEM_RESERVE)
    assert largest_batch(WEIGHTS, 8 * per_batch, 8, "orin-8gb", "stripped") == 3
    monkeypatch.setattr(serving, "recipes_that_fit", lambda *a, **k: [])
    with pytest.raises(UserError, match=r"max batch 3 fits \(--batch 1,1,3\)"):
        trtexec_script(fixed, "orin-8gb", profile, None)
