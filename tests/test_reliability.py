"""Reliability and security: manifests, reproducible ONNX, NaN/Inf named by slot, safe loading, resource
checks, and fuzzing of the plan parser and the command line."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skrr_export.apply import apply_plan, first_nonfinite
from skrr_export.artifacts import staged_folder
from skrr_export.cli import main
from skrr_export.errors import ArtifactError, PlanError
from skrr_export.model import ModelSource, load_encoder
from skrr_export.plan import Plan, parse_plan
from skrr_export.runners import OrtRunner

from .helpers import NUM_BLOCKS, ids_and_mask
from .test_cli import ARTIFACTS, leftovers, write_plan

BERT_PLAN = {"format": "skrr-plan/1", "encoder": {"family": "bert", "num_blocks": 3}, "skip": [2], "reuse": {"2": 0}}


def run(tmp_path, folder, *extra, plan=BERT_PLAN, out="out"):
    return main(["--plan", str(write_plan(tmp_path, plan)), "--model", str(folder), "--random-ids", "--out", str(tmp_path / out), "-q", *extra])


def test_manifest_lists_every_artifact_with_size_and_sha256(tmp_path, tiny_models):
    _, folder = tiny_models["bert"]
    assert run(tmp_path, folder, "--external-data") == 0
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    names = sorted(a["name"] for a in manifest["artifacts"])
    assert names == sorted(a for a in ARTIFACTS + ["model.onnx.data"] if a != "manifest.json")
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


@pytest.fixture(scope="module")
def broken(tmp_path_factory, tiny_models):
    """A good artifacts folder (ONNX with external data) and broken copies of it, a file to put paths under,
    and the tiny BERT (64 positions)."""
    _, folder = tiny_models["bert"]
    tmp = tmp_path_factory.mktemp("broken")
    good = tmp / "good"
    assert main(["--plan", str(write_plan(tmp, BERT_PLAN)), "--model", str(folder), "--random-ids", "--out", str(good),
                 "--external-data", "--no-dense-distance", "-q"]) == 0
    corrupt = Path(shutil.copytree(good, tmp / "corrupt-onnx"))
    (corrupt / "model.onnx").write_bytes((good / "model.onnx").read_bytes()[:200])
    no_data = Path(shutil.copytree(good, tmp / "no-data"))
    (no_data / "model.onnx.data").unlink()
    bad_engine = Path(shutil.copytree(good, tmp / "corrupt-engine-json"))
    (bad_engine / "engine.plan").write_bytes(b"not an engine")
    (bad_engine / "engine.json").write_text('{"backend": "trt", "profiles": [')
    wrong_engine = Path(shutil.copytree(bad_engine, tmp / "wrong-engine-json"))
    (wrong_engine / "engine.json").write_text('{"backend": "trt", "profiles": []}')
    (tmp / "file").write_text("a file, not a folder")
    (tmp / "plan-not-json.json").write_text("{")
    return {"tmp": tmp, "model": folder, "plan": write_plan(tmp, BERT_PLAN), "good": good, "corrupt": corrupt,
            "no_data": no_data, "bad_engine": bad_engine, "wrong_engine": wrong_engine, "file": tmp / "file"}


def export(b):
    return ["--plan", str(b["plan"]), "--model", str(b["model"]), "--random-ids", "--out", str(b["tmp"] / "never")]


def calibrate(b):
    return ["calibrate", "--model", str(b["model"]), "--out", str(b["tmp"] / "never.json"), "--random-ids", "--sparsity", "0.2"]


def measure(b):
    return ["measure", "--plan", str(b["plan"]), "--model", str(b["model"]), "--out", str(b["tmp"] / "never")]


def triton(b, folder="good"):
    return ["triton", "--artifacts", str(b[folder]), "--repo", str(b["tmp"] / "repo")]


def trtexec(b, folder="good"):
    return ["trtexec", "--artifacts", str(b[folder]), "--script", str(b["tmp"] / "never.sh")]


BAD_INPUTS = {
    # the main job
    "export: out under a file": (lambda b: [*export(b)[:-1], str(b["file"] / "sub")], "is a file, not a folder"),
    "export: out is a file": (lambda b: [*export(b)[:-1], str(b["file"])], "is a file, not a folder"),
    "export: plan not JSON": (lambda b: ["--plan", str(b["tmp"] / "plan-not-json.json"), *export(b)[2:]], "is not JSON"),
    "export: plan missing": (lambda b: ["--plan", str(b["tmp"] / "nowhere.json"), *export(b)[2:]], "cannot read plan file"),
    "export: model under a file": (lambda b: [*export(b), "--model", str(b["file"] / "m")], "has no config.json"),
    "export: sequence beyond positions": (lambda b: [*export(b), "--fixed-sequence", "100"], "exceeds this model's 64 positions"),
    "export: profile beyond positions": (lambda b: [*export(b), "--sequence", "1,16,65"], "--sequence 65: sequence length 65 exceeds"),
    "export: fixed sequence 0": (lambda b: [*export(b), "--fixed-sequence", "0"], "--fixed-sequence: must be at least 1, got 0"),
    "export: negative atol": (lambda b: [*export(b), "--atol", "-1"], "--atol: must be a finite number >= 0, got -1"),
    "export: NaN rtol": (lambda b: [*export(b), "--rtol", "nan"], "--rtol: must be a finite number >= 0, got nan"),
    "export: cosine above 1": (lambda b: [*export(b), "--min-cosine", "1.5"], "--min-cosine: must lie in [-1, 1], got 1.5"),
    "export: workspace 0": (lambda b: [*export(b), "--workspace-mib", "0"], "--workspace-mib: must be at least 1"),
    "export: budget -1": (lambda b: [*export(b), "--weight-streaming-budget", "-1"], "must be at least 0, got -1"),
    "export: batch profile": (lambda b: [*export(b), "--batch", "4,2,1"], "must satisfy 1 <= min <= opt <= max"),
    "export: timing cache under a file": (lambda b: [*export(b), "--timing-cache", str(b["file"] / "cache")],
                                          "is a file, not a folder"),
    "export: recipe unknown": (lambda b: ["--recipe", "nope", "--out", str(b["tmp"] / "never")], "no recipe 'nope'"),
    # inspect
    "inspect: corrupt ONNX": (lambda b: ["inspect", "--onnx", str(b["corrupt"] / "model.onnx")], "is not a readable ONNX model"),
    "inspect: missing data file": (lambda b: ["inspect", "--onnx", str(b["no_data"] / "model.onnx")],
                                   "needs its external data file 'model.onnx.data'"),
    "inspect: ONNX under a file": (lambda b: ["inspect", "--onnx", str(b["file"] / "model.onnx")], "does not exist"),
    "inspect: shape 0": (lambda b: ["inspect", "--plan", str(b["plan"]), "--model", str(b["model"]), "--shape", "0x8"],
                         "batch and sequence must be positive"),
    "inspect: shape beyond positions": (lambda b: ["inspect", "--plan", str(b["plan"]), "--model", str(b["model"]),
                                                   "--shape", "1x100"], "exceeds this model's 64 positions"),
    # calibrate
    "calibrate: 0 prompts": (lambda b: [*calibrate(b), "--num-prompts", "0"], "--num-prompts: must be at least 1, got 0"),
    "calibrate: -3 prompts": (lambda b: [*calibrate(b), "--num-prompts", "-3"], "--num-prompts: must be at least 1, got -3"),
    "calibrate: beam 0": (lambda b: [*calibrate(b), "--beam", "0"], "--beam: must be at least 1"),
    "calibrate: sparsity 1": (lambda b: [*calibrate(b)[:-1], "1"], "--sparsity: must lie in (0, 1), got 1"),
    "calibrate: sparsity nan": (lambda b: [*calibrate(b)[:-1], "nan"], "--sparsity: must lie in (0, 1), got nan"),
    "calibrate: max memory not a size": (lambda b: [*calibrate(b), "--max-memory", "lots"], "expected a size such as 24GiB"),
    "calibrate: batch size 0": (lambda b: [*calibrate(b), "--batch-size", "0"], "--batch-size: must be at least 1"),
    "calibrate: max length beyond positions": (lambda b: [*calibrate(b), "--max-length", "100"], "--max-length 100: sequence length"),
    "calibrate: missing prompts": (lambda b: [*calibrate(b), "--prompts", str(b["tmp"] / "none.txt")], "cannot read prompt file"),
    "calibrate: out under a file": (lambda b: [*calibrate(b)[:4], str(b["file"] / "plan.json"), "--sparsity", "0.2",
                                               "--num-prompts", "2"], str("file")),
    # measure
    "measure: batch 0": (lambda b: [*measure(b), "--batch", "0"], "--batch values must be positive integers"),
    "measure: seq not numbers": (lambda b: [*measure(b), "--seq", "x"], "--seq must be comma-separated integers"),
    "measure: seq beyond positions": (lambda b: [*measure(b), "--seq", "100"], "--seq 100: sequence length 100 exceeds"),
    "measure: iterations 0": (lambda b: [*measure(b), "--iterations", "0"], "--iterations: must be at least 1"),
    "measure: warmup -1": (lambda b: [*measure(b), "--warmup", "-1"], "--warmup: must be at least 0"),
    # triton
    "triton: corrupt ONNX": (lambda b: triton(b, "corrupt"), "is not a readable ONNX model"),
    "triton: missing data file": (lambda b: triton(b, "no_data"), "needs its external data file"),
    "triton: corrupt engine.json": (lambda b: triton(b, "bad_engine"), "engine.json is not JSON"),
    "triton: engine.json without profiles": (lambda b: triton(b, "wrong_engine"), "is not skrr-export engine metadata"),
    "triton: no artifacts": (lambda b: ["triton", "--artifacts", str(b["tmp"] / "nowhere"), "--repo", str(b["tmp"])],
                             "does not exist"),
    "triton: repo under a file": (lambda b: ["triton", "--artifacts", str(b["good"]), "--repo", str(b["file"] / "r")],
                                  "is a file, not a folder"),
    "triton: max batch -1": (lambda b: [*triton(b), "--max-batch", "-1"], "--max-batch: must be at least 0"),
    "triton: instances 0": (lambda b: [*triton(b), "--instances", "0"], "--instances: must be at least 1"),
    # trtexec
    "trtexec: corrupt engine.json": (lambda b: trtexec(b, "bad_engine"), "engine.json is not JSON"),
    "trtexec: engine.json without profiles": (lambda b: trtexec(b, "wrong_engine"), "has no usable profile"),
    "trtexec: corrupt ONNX": (lambda b: [*trtexec(b, "corrupt"), "--batch", "1"], "is not a readable ONNX model"),
    "trtexec: missing data file": (lambda b: [*trtexec(b, "no_data"), "--batch", "1"], "needs its external data file"),
    "trtexec: script under a file": (lambda b: ["trtexec", "--artifacts", str(b["good"]), "--batch", "1",
                                                "--script", str(b["file"] / "build.sh")], "is a file, not a folder"),
    "trtexec: workspace 0": (lambda b: [*trtexec(b), "--workspace-mib", "0"], "--workspace-mib: must be at least 1"),
    "trtexec: profile 0": (lambda b: [*trtexec(b), "--sequence", "0,1,2"], "must satisfy 1 <= min <= opt <= max"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_every_command_turns_bad_input_into_one_line_and_exit_2(case, broken, capsys):
    argv, message = BAD_INPUTS[case]
    argv = argv(broken)
    capsys.readouterr()
    code = main([*argv, "-q"] if argv[0] not in ("inspect", "trtexec") else argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("skrr-export: error: "), (code, err)
    assert message in lines[0], lines[0]
    assert not (broken["tmp"] / "never").exists() and not (broken["tmp"] / "repo").exists()
    assert not (broken["tmp"] / "never.sh").exists() and leftovers(broken["tmp"]) == []


def test_bad_input_from_the_console_script_shows_no_traceback(broken):
    """The installed entry point, not just main(): one line on stderr and exit 2."""
    for argv in (["inspect", "--onnx", str(broken["corrupt"] / "model.onnx")], triton(broken, "bad_engine")):
        done = subprocess.run([sys.executable, "-m", "skrr_export.cli", *argv], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr


def test_a_folder_that_appears_while_the_job_runs_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ArtifactError, match=r"appeared or changed while this job ran and was left alone; the finished result is in"):
        with staged_folder(out, force=False) as stage:
            (stage / "model.onnx").write_text("ours")
            out.mkdir()  # someone else's, empty: a plain rename(2) would silently replace it
    assert list(out.iterdir()) == []
    kept = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert len(kept) == 1 and (kept[0] / "model.onnx").read_text() == "ours"


def test_force_replaces_only_the_folder_that_was_there_at_the_start(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staged_folder(out, force=True) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and leftovers(tmp_path) == []
    with pytest.raises(ArtifactError, match="appeared or changed while this job ran"):
        with staged_folder(out, force=True) as stage:
            (stage / "newer.txt").write_text("newer")
            shutil.rmtree(out)
            out.mkdir()  # a different folder under the same name (often with the same inode number)
            (out / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    with pytest.raises(ArtifactError, match="appeared or changed while this job ran"):
        with staged_folder(out, force=True) as stage:
            (out / "written-meanwhile.txt").write_text("someone is using it")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt", "written-meanwhile.txt"]


def test_rename_never_replaces_an_existing_path(tmp_path):
    from skrr_export.artifacts import rename_noreplace

    for existing in ("empty-folder", "file"):
        src, dst = tmp_path / f"src-{existing}", tmp_path / existing
        src.mkdir()
        dst.mkdir() if existing == "empty-folder" else dst.write_text("x")
        with pytest.raises(FileExistsError):
            rename_noreplace(src, dst)
        assert src.is_dir() and dst.exists()
    rename_noreplace(tmp_path / "src-file", tmp_path / "fresh")
    assert (tmp_path / "fresh").is_dir()


def test_concurrent_atomic_writes_to_one_file_never_collide(tmp_path):
    """Two builds sharing one --timing-cache: each write lands whole, and no temporary file is shared or left."""
    from concurrent.futures import ThreadPoolExecutor

    from skrr_export.artifacts import write_atomic

    target = tmp_path / "timing.cache"
    payloads = [bytes([i]) * (1 << 20) for i in range(8)]

    def writer(i: int) -> None:
        for _ in range(25):
            write_atomic(target, memoryview(payloads[i]))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(writer, range(8)))  # re-raises any writer's exception
    assert target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["timing.cache"]


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


def examples_run(strategy, check, max_examples: int) -> int:
    """Run ``check`` on up to ``max_examples`` inputs drawn from ``strategy`` (Hypothesis shrinks and reports a
    failing one) and return how many it ran: each fuzz test asserts its own count, alone or in any order."""
    ran = 0

    @settings(max_examples=max_examples, deadline=None)
    @given(strategy)
    def each(data):
        nonlocal ran
        ran += 1
        check(data)

    each()
    return ran


def check_plan_validation(data) -> None:
    try:
        plan = parse_plan(data)
    except PlanError as exc:
        assert "\n" not in str(exc)
        return
    kept = set(plan.kept)  # a valid plan keeps something, and every re-use source is kept and of the same kind
    assert kept and all(src in kept and src % 2 == slot % 2 for slot, src in plan.reuse.items())


def test_fuzz_plan_validation_raises_only_plan_errors():
    assert examples_run(PLANS, check_plan_validation, max_examples=400) >= 100


def check_arbitrary_json(data) -> None:
    with pytest.raises(PlanError):
        parse_plan(data)


def test_fuzz_arbitrary_json_is_a_plan_error():
    assert examples_run(JSON, check_arbitrary_json, max_examples=300) >= 100


TOKENS = st.sampled_from(["--plan", "--engine", "trt", "onnx", "--precision", "fp8", "bf16", "--batch", "0,1,2", "4,2,1",
                          "--sequence", "x", "--fixed-sequence", "-3", "--atol", "nan", "--out", "inspect", "calibrate",
                          "--sparsity", "2", "--beam", "0", "--model", "--json", "--opt-level", "9", "--compute-capability",
                          "sm1", "--unknown", "", "--", "-q"])


def test_fuzz_command_line_never_shows_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a relative path in argv names lands here, not in the checkout

    def check(argv) -> None:
        argv = [str(tmp_path / "missing.json") if a == "" else a for a in argv]
        capsys.readouterr()
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

    assert examples_run(st.lists(TOKENS | st.text(max_size=6), max_size=8), check, max_examples=150) >= 50
