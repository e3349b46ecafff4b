"""Triton repositories (checked with Triton's own model-config protobuf) and trtexec scripts (Jetson fit)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import onnx
import pytest

from skrr_export.cli import main
from skrr_export.errors import UserError
from skrr_export.serving import SYSTEM_RESERVE, TARGETS, fits, recipes_that_fit, trtexec_script
from skrr_export.trt import available

from .test_cli import write_plan

model_config = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is not installed")
ROOT = Path(__file__).resolve().parents[1]


def parse(path: Path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config.ModelConfig())


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_models):
    _, folder = tiny_models["clip-projection"]
    tmp = tmp_path_factory.mktemp("serving")
    plan = write_plan(tmp, {"format": "skrr-plan/1", "encoder": {"family": "clip", "num_blocks": 3}, "skip": [2], "reuse": {"2": 0}})
    engine = ["--engine", "trt-rtx", "--batch", "1,2,4", "--sequence", "1,16,64"] if available("trt-rtx") else []
    assert main(["--plan", str(plan), "--model", str(folder), "--random-ids", "--out", str(tmp / "out"), "--external-data", "-q", *engine]) == 0
    return tmp / "out"


def test_onnx_repository_matches_the_model(artifacts, tmp_path):
    assert main(["triton", "--artifacts", str(artifacts), "--repo", str(tmp_path), "--name", "clip_skrr",
                 "--backend", "onnx", "--max-batch", "8", "--instances", "2"]) == 0
    cfg = parse(tmp_path / "clip_skrr" / "config.pbtxt")
    graph = onnx.load(str(artifacts / "model.onnx"), load_external_data=False).graph
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8 and cfg.HasField("dynamic_batching")
    assert [i.name for i in cfg.input] == [i.name for i in graph.input]
    assert [o.name for o in cfg.output] == [o.name for o in graph.output]
    onnx_types = {onnx.TensorProto.INT64: model_config.TYPE_INT64, onnx.TensorProto.FLOAT: model_config.TYPE_FP32}
    for ours, theirs in zip(list(cfg.input) + list(cfg.output), list(graph.input) + list(graph.output)):
        assert ours.data_type == onnx_types[theirs.type.tensor_type.elem_type]
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in theirs.type.tensor_type.shape.dim]
        assert list(ours.dims) == dims[1:], "batch axis left out when max_batch_size > 0"
    assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == model_config.ModelInstanceGroup.KIND_GPU
    version = tmp_path / "clip_skrr" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert main(["triton", "--artifacts", str(artifacts), "--repo", str(tmp_path), "--name", "clip_skrr", "--backend", "onnx"]) == 2


def test_the_model_name_follows_the_encoder_family(artifacts, tmp_path, capsys):
    assert main(["triton", "--artifacts", str(artifacts), "--repo", str(tmp_path), "--backend", "onnx", "-q"]) == 0
    assert parse(tmp_path / "clip_skrr" / "config.pbtxt").name == "clip_skrr"
    assert main(["triton", "--artifacts", str(artifacts), "--repo", str(tmp_path), "--name", "../escape"]) == 2
    assert "a Triton model name is a folder name" in capsys.readouterr().err
    assert not (tmp_path.parent / "escape").exists()


def copy_of(artifacts: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(artifacts, tmp_path / "artifacts"))


@pytest.mark.skipif(not available("trt-rtx"), reason="tensorrt-rtx is not installed")
def test_a_tensorrt_rtx_engine_is_never_served_as_a_tensorrt_plan(artifacts, tmp_path, capsys, caplog):
    """Triton's TensorRT backend cannot deserialize a TensorRT-RTX engine: auto serves the ONNX with ONNX
    Runtime, and asking for the engine is refused in one line."""
    import json

    assert json.loads((artifacts / "engine.json").read_text())["backend"] == "trt-rtx"
    assert main(["triton", "--artifacts", str(artifacts), "--repo", str(tmp_path)]) == 0
    cfg = parse(tmp_path / "clip_skrr" / "config.pbtxt")
    assert cfg.platform == "onnxruntime_onnx"
    assert sorted(p.name for p in (tmp_path / "clip_skrr" / "1").iterdir()) == ["model.onnx", "model.onnx.data"]
    assert "Triton's TensorRT backend cannot load" in caplog.text
    capsys.readouterr()
    assert main(["triton", "--artifacts", str(artifacts), "--repo", str(tmp_path), "--name", "x", "--backend", "tensorrt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs standard TensorRT engines only" in err[0] and "--backend onnx" in err[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not available("trt-rtx"), reason="tensorrt-rtx is not installed")
def test_a_tensorrt_engine_repository_follows_the_engine_profile(artifacts, tmp_path, capsys):
    """Triton's config comes from engine.json alone (the engine is copied, never loaded): the RTX build's metadata,
    relabelled as a standard TensorRT build (which cannot be built here), stands in for one."""
    import json

    folder = copy_of(artifacts, tmp_path)
    meta = json.loads((folder / "engine.json").read_text())
    (folder / "engine.json").write_text(json.dumps(meta | {"backend": "trt", "module": "tensorrt", "version": "10.13.0"}))
    repo = tmp_path / "repo"
    assert main(["triton", "--artifacts", str(folder), "--repo", str(repo)]) == 0
    cfg = parse(repo / "clip_skrr" / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan"
    assert cfg.max_batch_size == meta["profiles"][0]["input_ids"][2][0] == 4
    assert [list(o.dims) for o in cfg.output] == [o["shape"][1:] for o in meta["outputs"]]
    assert (repo / "clip_skrr" / "1" / "model.plan").read_bytes() == (artifacts / "engine.plan").read_bytes()
    assert main(["triton", "--artifacts", str(folder), "--repo", str(repo), "--name", "big", "--max-batch", "16"]) == 2
    assert "profile allows batches up to 4" in capsys.readouterr().err


@pytest.mark.skipif(not available("trt-rtx"), reason="tensorrt-rtx is not installed")
def test_the_report_shows_the_engine_as_tables(artifacts):
    import json

    from skrr_export.units import size

    md = (artifacts / "report.md").read_text()
    engine = md[md.index("## Engine"):]
    engine = engine[:engine.index("\n## ")]  # up to the next section
    assert "```" not in md and "{" not in md
    meta = json.loads((artifacts / "engine.json").read_text())
    assert f"| engine weights | {size(meta['weights']['total_bytes'])} ({meta['weights']['total_bytes']:,} bytes)" in engine
    assert f"| ONNX weights | {size(meta['onnx_weight_bytes'])} ({meta['onnx_weight_bytes']:,} bytes)" in engine
    assert "| input_ids | input | INT64 | -1x-1 | 1x1 / 2x16 / 4x64 |" in engine
    assert len(engine.splitlines()) < 30


def test_trtexec_script_carries_the_profiles_and_is_valid_bash(artifacts, tmp_path):
    script = tmp_path / "build.sh"
    assert main(["trtexec", "--artifacts", str(artifacts), "--batch", "1,2,4", "--sequence", "1,16,64",
                 "--target", "orin-8gb", "--script", str(script)]) == 0
    text = script.read_text()
    assert "--minShapes=input_ids:1x1,attention_mask:1x1" in text
    assert "--maxShapes=input_ids:4x64,attention_mask:4x64" in text
    assert "--memPoolSize=workspace:" in text and "--stronglyTyped" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert script.stat().st_mode & 0o111


FAKE_TRTEXEC = """#!/usr/bin/env bash
# records where it ran and what it was given; builds nothing
test -f model.onnx || { echo "fake trtexec: no model.onnx in $PWD" >&2; exit 1; }
pwd > "$RECORD"
printf '%s\\n' "$@" >> "$RECORD"
touch model.plan
"""


def run_script(script: Path, cwd: Path, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "trtexec").write_text(FAKE_TRTEXEC)
    (bin_dir / "trtexec").chmod(0o755)
    record = tmp_path / "record.txt"
    record.unlink(missing_ok=True)
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record)}
    done = subprocess.run(["bash", str(script), *args], cwd=cwd, env=env, capture_output=True, text=True)
    return done, record.read_text().splitlines() if record.exists() else []


def test_trtexec_script_finds_the_model_from_wherever_it_was_written_and_run(artifacts, tmp_path):
    folder = copy_of(artifacts, tmp_path)
    script = tmp_path / "scripts" / "deep" / "build.sh"
    assert main(["trtexec", "--artifacts", str(folder), "--batch", "1,2,4", "--sequence", "1,16,64", "--script", str(script)]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done, record = run_script(script, elsewhere, tmp_path)
    assert done.returncode == 0, done.stderr
    assert record[0] == str(folder.resolve()) and "--onnx=model.onnx" in record
    assert (folder / "model.plan").exists()
    # the script and the artifacts moved together keep working; a folder given as argument wins
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "scripts").rename(moved / "scripts")
    folder.rename(moved / "artifacts")
    assert run_script(moved / "scripts" / "deep" / "build.sh", elsewhere, tmp_path)[0].returncode == 0
    done, _ = run_script(moved / "scripts" / "deep" / "build.sh", moved, tmp_path, str(elsewhere))
    assert done.returncode == 2 and f"model.onnx not found in {elsewhere}" in done.stderr


def test_dense_fp16_t5_xxl_does_not_fit_an_8gb_orin_and_the_message_names_a_recipe_that_does():
    from skrr_export.apply import plan_cost
    from skrr_export.model import DTYPES, ModelSource, build_meta, load_config
    from skrr_export.plan import Plan

    meta = build_meta(load_config(ModelSource(ROOT / "recipes" / "t5-v1_1-xxl")))
    meta.dtype = DTYPES["fp16"]
    dense = plan_cost(meta, Plan.dense("t5", 24)).kept_weight_bytes
    assert dense == 4_762_310_656 * 2 + 24 * 4096 * 10240 * 2  # fp16 with every FFN `wo` kept in fp32
    activations = 64 << 20
    ok, need = fits(dense, activations, "orin-8gb")
    assert not ok and need == dense + activations + SYSTEM_RESERVE > TARGETS["orin-8gb"]
    assert fits(dense, activations, "orin-16gb")[0]
    fitting = recipes_that_fit("orin-8gb", "fp16", activations)
    assert any(r.startswith("pixart-sigma-41.9 ") for r in fitting)
    assert not any(r.startswith("pixart-sigma-24.3 ") for r in fitting)


def test_too_big_for_the_target_is_a_clear_error(artifacts, monkeypatch):
    import skrr_export.serving as serving

    monkeypatch.setitem(serving.TARGETS, "orin-8gb", SYSTEM_RESERVE)  # leave no room at all
    profile = {"input_ids": [[1, 1], [1, 16], [4, 77]], "attention_mask": [[1, 1], [1, 16], [4, 77]]}
    with pytest.raises(UserError, match=r"does not fit orin-8gb: needs .* GiB too much; in fp32, recipes that fit: none"):
        trtexec_script(artifacts, "orin-8gb", profile, None)


def test_a_full_disk_while_writing_the_repository_is_one_line_and_leaves_nothing(artifacts, tmp_path, capsys, monkeypatch):
    """An OSError from the machine (here ENOSPC, raised where the model file is copied) is bad input for the
    command line, not a traceback; the half-written model folder is removed."""
    import errno
    import os

    import skrr_export.serving as serving

    def full(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(serving.shutil, "copy2", full)
    assert main(["triton", "--artifacts", str(artifacts), "--repo", str(tmp_path), "--backend", "onnx", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("skrr-export: error: No space left on device: ") and "model.onnx" in err[0]
    assert list(tmp_path.iterdir()) == []
