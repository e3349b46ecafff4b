"""Reliability and security: manifests, reproducible ONNX, NaN/Inf named by slot, safe loading, resource
checks, and fuzzing of the plan parser and the command line."""

from __future__ import annotations

import hashlib
import json
import shutil

import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skrr_export.apply import apply_plan, first_nonfinite
from skrr_export.cli import main
from skrr_export.errors import ArtifactError, PlanError
from skrr_export.model import ModelSource, load_encoder
from skrr_export.plan import Plan, parse_plan
from skrr_export.runners import OrtRunner

from .helpers import NUM_BLOCKS, ids_and_mask
from .test_cli import leftovers, write_plan

BERT_PLAN = {"format": "skrr-plan/1", "encoder": {"family": "bert", "num_blocks": 3}, "skip": [2], "reuse": {"2": 0}}


def run(tmp_path, folder, *extra, plan=BERT_PLAN, out="out"):
    return main(["--plan", str(write_plan(tmp_path, plan)), "--model", str(folder), "--out", str(tmp_path / out), "-q", *extra])


def test_manifest_lists_every_artifact_with_size_and_sha256(tmp_path, tiny_models):
    _, folder = tiny_models["bert"]
    assert run(tmp_path, folder, "--external-data") == 0
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    names = sorted(a["name"] for a in manifest["artifacts"])
    assert names == ["model.onnx", "model.onnx.data", "report.json", "report.md"]
    for a in manifest["artifacts"]:
        data = (out / a["name"]).read_bytes()
        assert a["bytes"] == len(data) and a["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["plan_sha256"] == parse_plan(BERT_PLAN).digest()
    assert {"torch", "transformers", "onnx"} <= set(manifest["versions"])


def test_same_inputs_give_byte_identical_onnx(tmp_path, tiny_models):
    _, folder = tiny_models["t5"]
    plan = {"format": "skrr-plan/1", "encoder": {"family": "t5", "num_blocks": 3}, "skip": [1, 2], "reuse": {"1": 3, "2": 0}}
    assert run(tmp_path, folder, "--no-dense-distance", plan=plan, out="a") == 0
    assert run(tmp_path, folder, "--no-dense-distance", plan=plan, out="b") == 0
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()


def test_fp16_t5_without_its_fp32_island_is_caught_and_named(tiny_models):
    _, folder = tiny_models["t5"]
    plan = Plan("t5", NUM_BLOCKS, skip=(3,), reuse={3: 1})
    module = apply_plan(load_encoder(ModelSource(folder), plan, "fp16"), plan)
    ids, mask = ids_and_mask()
    with torch.no_grad():  # real T5-XXL FFN outputs exceed 65504; make this one do the same
        wo = module.kept["1"].layer.DenseReluDense.wo
        wo.weight.mul_(4e4)
    assert first_nonfinite(module, ids, mask) is None, "with wo in fp32 the residual stream is fp32 and finite"
    wo.to(torch.float16)
    assert first_nonfinite(module, ids, mask) == "slot 1 (block 0 ffn, running sub-block 1)"


def test_inf_weight_in_a_checkpoint_fails_naming_the_slot_and_writes_nothing(tmp_path, tiny_models, capsys):
    model, _ = tiny_models["bert"]
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    tensors["encoder.layer.1.intermediate.dense.bias"][0] = float("inf")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert run(tmp_path, broken) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "holds NaN/Inf on the prompts; first produced by slot 3 (block 1 ffn, running sub-block 3)" in err[0]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_pickle_checkpoints_need_explicit_consent(tmp_path, tiny_models, capsys):
    model, safe = tiny_models["bert"]
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(safe / "config.json", pickled / "config.json")
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    capsys.readouterr()
    assert run(tmp_path, pickled, out="refused") == 2
    assert "can run code when loaded" in capsys.readouterr().err
    plan = parse_plan(BERT_PLAN)
    via_pickle = apply_plan(load_encoder(ModelSource(pickled, allow_pickle=True), plan), plan)
    via_safetensors = apply_plan(load_encoder(ModelSource(safe), plan), plan)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        torch.testing.assert_close(via_pickle(ids, mask)[0], via_safetensors(ids, mask)[0], rtol=0, atol=0)
    assert run(tmp_path, pickled, "--allow-pickle", "--no-dense-distance", out="allowed") == 0


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(torch.ones(4, 4).numpy(), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret.data"), ("offset", "0"), ("length", "64")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.data").write_bytes(b"\0" * 64)
    onnx.save(helper.make_model(graph, ir_version=10), folder / "model.onnx")
    with pytest.raises(ArtifactError, match=r"external data location '../secret.data' points outside"):
        OrtRunner(folder / "model.onnx").activate()


def test_not_enough_memory_or_disk_is_refused_before_work(tmp_path, tiny_models, monkeypatch, capsys):
    import skrr_export.artifacts as artifacts

    _, folder = tiny_models["bert"]
    monkeypatch.setattr(artifacts, "available_memory", lambda: 1024)
    assert run(tmp_path, folder) == 2
    assert "needs about 0.6 GiB of host memory but 0.0 GiB is available" in capsys.readouterr().err
    monkeypatch.undo()
    real = shutil.disk_usage
    monkeypatch.setattr(artifacts.shutil, "disk_usage", lambda p: real(p)._replace(free=10))
    assert run(tmp_path, folder) == 2
    assert "on disk but" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 60) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
PLANS = st.fixed_dictionaries(
    {"format": st.just("skrr-plan/1"),
     "encoder": st.fixed_dictionaries({"family": st.sampled_from(["t5", "bert", "clip", "x"]), "num_blocks": st.integers(-1, 6)})},
    optional={"skip": st.lists(st.integers(-2, 14), max_size=14), "skip_blocks": st.lists(st.integers(-1, 7), max_size=4),
              "reuse": st.dictionaries(st.integers(-1, 14).map(str), st.integers(-1, 14) | st.text(max_size=2), max_size=5),
              "sparsity": st.floats(-1, 2), "extra": JSON},
)
CASES = {"plans": 0, "json": 0, "cli": 0}


@settings(max_examples=400, deadline=None)
@given(PLANS)
def test_fuzz_plan_validation_raises_only_plan_errors(data):
    CASES["plans"] += 1
    try:
        plan = parse_plan(data)
    except PlanError as exc:
        assert "\n" not in str(exc)
        return
    kept = set(plan.kept)  # a valid plan keeps something, and every re-use source is kept and of the same kind
    assert kept and all(src in kept and src % 2 == slot % 2 for slot, src in plan.reuse.items())


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_fuzz_arbitrary_json_is_a_plan_error(data):
    CASES["json"] += 1
    with pytest.raises(PlanError):
        parse_plan(data)


TOKENS = st.sampled_from(["--plan", "--engine", "trt", "onnx", "--precision", "fp8", "bf16", "--batch", "0,1,2", "4,2,1",
                          "--sequence", "x", "--fixed-sequence", "-3", "--atol", "nan", "--out", "inspect", "calibrate",
                          "--sparsity", "2", "--beam", "0", "--model", "--json", "--opt-level", "9", "--compute-capability",
                          "sm1", "--unknown", "", "--", "-q"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(TOKENS | st.text(max_size=6), max_size=8))
def test_fuzz_command_line_never_shows_a_traceback(tmp_path, capsys, argv):
    CASES["cli"] += 1
    argv = [str(tmp_path / "missing.json") if a == "" else a for a in argv]
    try:
        code = main(["--out", str(tmp_path / "o"), *argv] if argv and argv[0] not in ("inspect", "calibrate") else argv)
    except SystemExit as exc:  # argparse's --help
        assert exc.code == 0
        return
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code in (0, 1, 2, 130)
    if code == 2:
        assert err.startswith("skrr-export: error:") and len(err.strip().splitlines()) == 1


def test_fuzz_case_counts():
    """Runs after the fuzz tests (file order): they really ran their examples."""
    print(f"fuzz cases: {CASES}")
    assert CASES["plans"] >= 100 and CASES["json"] >= 100 and CASES["cli"] >= 50
