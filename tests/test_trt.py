"""TensorRT engines: TensorRT-RTX builds ahead of time on this CPU machine; the standard TensorRT path is
type-checked against tensorrt-stubs; running engines needs a CUDA device and skips without one."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import pytest

from skrr_export.apply import apply_plan
from skrr_export.environment import cuda_available
from skrr_export.errors import ArtifactError, UserError
from skrr_export.artifacts import onnx_weight_bytes
from skrr_export.export import ExportOptions, export_onnx
from skrr_export.model import ModelSource, load_encoder
from skrr_export.plan import Plan
from skrr_export.trt import (
    PARSE_FILE,
    PARSE_MAPPED,
    SERIALIZE_STREAM,
    WEIGHT_SLACK,
    EngineOptions,
    ShapeRange,
    available,
    build_engine,
    check_engine_metadata,
    load_backend,
)

from .test_apply import make_plan
from .test_cli import MINILM_PLAN, write_plan
from .typecheck import stubs

ROOT = Path(__file__).resolve().parents[1]
needs_rtx = pytest.mark.skipif(not available("trt-rtx"), reason="tensorrt-rtx is not installed (pip install tensorrt-rtx)")
OPTIONS = EngineOptions(batch=ShapeRange(1, 2, 4), sequence=ShapeRange(1, 16, 64))


def onnx_for(folder: Path, family: str, plan: Plan, tmp_path: Path, precision: str = "fp32", **options) -> Path:
    module = apply_plan(load_encoder(ModelSource(folder), plan, precision), plan)
    return export_onnx(module, tmp_path / "model.onnx", ExportOptions(**options), vocab_size=module.stem.embed.num_embeddings
                       if hasattr(module.stem, "embed") else 96).path


@pytest.fixture(scope="module")
def onnx_files(tiny_models, tmp_path_factory):
    """``onnx_files(family, plan_name, precision)``: onnx_for's export, made once per module; tests only read it."""
    made: dict[tuple[str, str, str], Path] = {}

    def get(family: str, plan_name: str, precision: str = "fp32") -> Path:
        if (family, plan_name, precision) not in made:
            folder = tmp_path_factory.mktemp(f"onnx-{family}-{plan_name}-{precision}")
            made[family, plan_name, precision] = onnx_for(tiny_models[family][1], family, make_plan(family, plan_name),
                                                          folder, precision)
        return made[family, plan_name, precision]

    return get


@pytest.fixture(scope="module")
def engines(onnx_files):
    """``engines(family, plan_name)``: the fp32 export's TensorRT-RTX engine built with OPTIONS (the plan's digest in
    its metadata), once per module; a test that edits an engine or its metadata edits a copy."""
    made = {}

    def get(family: str, plan_name: str):
        if (family, plan_name) not in made:
            onnx_path = onnx_files(family, plan_name)
            made[family, plan_name] = build_engine(onnx_path, "trt-rtx", OPTIONS, onnx_path.parent / "engine.plan",
                                                   {"plan_sha256": make_plan(family, plan_name).digest()})
        return made[family, plan_name]

    return get


def assert_weights_stored_once(meta: dict, onnx_path: Path) -> None:
    total = meta["weights"]["total_bytes"]
    assert total is not None, meta["weights"]
    assert meta["onnx_weight_bytes"] == onnx_weight_bytes(onnx_path)
    assert meta["onnx_weight_bytes"] <= total <= meta["onnx_weight_bytes_aligned"] * WEIGHT_SLACK


@needs_rtx
@pytest.mark.parametrize("family, plan_name", [("t5", "dense"), ("t5", "skip-only"), ("t5", "heavy-reuse"),
                                               ("clip-projection", "heavy-reuse"), ("bert", "dense"),
                                               ("bert", "heavy-reuse")])  # every plan kind; every family re-using
def test_rtx_engine_weights_equal_unique_onnx_weights(family, plan_name, onnx_files, engines):
    plan = make_plan(family, plan_name)
    onnx_path = onnx_files(family, plan_name)
    art = engines(family, plan_name)
    assert art.path.is_file() and art.path.stat().st_size == art.metadata["serialized_bytes"]
    assert_weights_stored_once(art.metadata, onnx_path)
    meta = json.loads(art.metadata_path.read_text())
    assert meta["backend"] == "trt-rtx" and meta["version"] == load_backend("trt-rtx").version
    assert meta["profiles"][0]["input_ids"] == [[1, 1], [2, 16], [4, 64]]
    assert [o["name"] for o in meta["outputs"]][0] == "last_hidden_state"
    assert meta["plan_sha256"] == plan.digest()
    assert meta["gpu_targets"]["compute_capabilities"] == ["8.0", "8.6", "8.9", "12.0+"]  # the builder's documented default
    assert meta["weights"]["parse"] == PARSE_FILE  # a single-file ONNX: its weights live in the protobuf


@needs_rtx
def test_rtx_heavy_reuse_engine_is_smaller_than_dense(engines):
    """Re-used sub-blocks are stored once: an engine that executes 6 slots holds the weights of 2."""
    sizes = {name: engines("bert", name).metadata["weights"]["total_bytes"] for name in ("dense", "heavy-reuse")}
    assert sizes["heavy-reuse"] < sizes["dense"] * 0.8


@needs_rtx
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_rtx_builds_half_precision_exports(precision, onnx_files, tmp_path):
    onnx_path = onnx_files("t5", "heavy-reuse", precision)
    art = build_engine(onnx_path, "trt-rtx", OPTIONS, tmp_path / "engine.plan", {})
    assert {"fp16": "HALF", "bf16": "BF16"}[precision] == art.metadata["outputs"][0]["dtype"]
    assert_weights_stored_once(art.metadata, onnx_path)


@needs_rtx
def test_rtx_external_data_and_fixed_sequence(tiny_models, tmp_path):
    _, folder = tiny_models["clip"]
    onnx_path = onnx_for(folder, "clip", make_plan("clip", "heavy-reuse"), tmp_path, external_data=True, fixed_sequence=9)
    art = build_engine(onnx_path, "trt-rtx", OPTIONS, tmp_path / "engine.plan", {})
    assert art.metadata["profiles"][0]["input_ids"] == [[1, 9], [2, 9], [4, 9]]
    assert_weights_stored_once(art.metadata, onnx_path)
    # issue 26: the parser got the mapped data file's pages (no copy) and the engine streamed into the file
    assert art.metadata["weights"]["parse"] == PARSE_MAPPED and art.metadata["weights"]["serialize"] == SERIALIZE_STREAM
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
    (tmp_path / "model.onnx.data").unlink()
    with pytest.raises(ArtifactError, match="needs its external data file"):
        build_engine(onnx_path, "trt-rtx", OPTIONS, tmp_path / "engine2.plan", {})
    assert not (tmp_path / "engine2.plan").exists()


@needs_rtx
def test_rtx_minilm_real_weights_from_the_cli(tmp_path):
    from skrr_export.cli import main

    out = tmp_path / "out"
    assert main(["--plan", str(MINILM_PLAN), "--engine", "trt-rtx", "--out", str(out), "--sequence", "1,64,128",
                 "--no-dense-distance", "-q"]) == 0
    meta = json.loads((out / "engine.json").read_text())
    assert_weights_stored_once(meta, out / "model.onnx")
    report = json.loads((out / "report.json").read_text())
    engine_check = report["parity"][-1]
    if not cuda_available():
        assert engine_check["passed"] is None and engine_check["reason"].startswith("built, not executed")
    assert report["engine"]["engine_sha256"] == meta["engine_sha256"]


@needs_rtx
def test_rtx_unparsable_graph_names_the_node(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("FooBarOp", ["x"], ["y"], name="my_bad_node")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    with pytest.raises(ArtifactError, match=r"cannot parse bad.onnx at node 0 \(my_bad_node, FooBarOp\)"):
        build_engine(path, "trt-rtx", OPTIONS, tmp_path / "engine.plan", {})
    assert not (tmp_path / "engine.plan").exists()


def test_profiles_must_contain_the_opt_shape():
    with pytest.raises(UserError, match="must satisfy 1 <= min <= opt <= max"):
        ShapeRange.parse("4,2,8", "--batch")
    with pytest.raises(UserError, match="must be N or MIN,OPT,MAX"):
        ShapeRange.parse("1,2", "--sequence")
    assert ShapeRange.parse("77", "--sequence") == ShapeRange(77, 77, 77)


@needs_rtx
def test_engine_from_another_backend_or_version_is_refused(engines, tmp_path):
    built = engines("bert", "dense")
    art = replace(built, path=Path(shutil.copy(built.path, tmp_path)),  # copies: the edits below stay here
                  metadata_path=Path(shutil.copy(built.metadata_path, tmp_path)))
    backend = load_backend("trt-rtx")
    assert check_engine_metadata(art.path, backend)["backend"] == "trt-rtx"
    meta = json.loads(art.metadata_path.read_text())
    art.metadata_path.write_text(json.dumps(meta | {"version": "1.0.0.0"}))
    with pytest.raises(ArtifactError, match=r"built by tensorrt_rtx 1.0.0.0, but this is tensorrt_rtx"):
        check_engine_metadata(art.path, backend)
    art.metadata_path.write_text(json.dumps(meta | {"backend": "trt", "module": "tensorrt"}))
    with pytest.raises(ArtifactError, match="built by tensorrt"):
        check_engine_metadata(art.path, backend)
    art.metadata_path.write_text(json.dumps(meta)[:-5])  # truncated: one line naming the file, not a traceback
    with pytest.raises(ArtifactError, match=r"engine.json is not JSON: .*; rebuild it from model.onnx"):
        check_engine_metadata(art.path, backend)
    art.metadata_path.write_text(json.dumps(meta))
    art.path.write_bytes(art.path.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        check_engine_metadata(art.path, backend)


@pytest.mark.skipif(available("trt"), reason="tensorrt is installed here")
def test_missing_tensorrt_names_the_package_and_the_alternatives():
    with pytest.raises(UserError) as err:
        load_backend("trt")
    message = str(err.value)
    assert "the Python package 'tensorrt', which is not installed" in message
    assert "usable here: --engine onnx" in message
    assert ("--engine trt-rtx" in message) == available("trt-rtx")


@pytest.mark.skipif(not cuda_available(), reason="running engines needs a CUDA device")
@needs_rtx
def test_rtx_engine_runs_and_matches_pytorch(tiny_models, tmp_path):  # pragma: no cover - GPU machines only
    from skrr_export.trt import execution_blocker

    if execution_blocker("trt-rtx"):
        pytest.skip(execution_blocker("trt-rtx"))
    from skrr_export.cli import main

    _, folder = tiny_models["bert"]
    plan_path = write_plan(tmp_path, make_plan("bert", "heavy-reuse").to_json())
    assert main(["--plan", str(plan_path), "--model", str(folder), "--engine", "trt-rtx", "--out", str(tmp_path / "o"), "-q"]) == 0


def test_standard_tensorrt_path_type_checks_against_tensorrt_stubs(tmp_path):
    site = stubs.installed_stubs()
    if site is None:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs==10.13.0.35.1)")
    pytest.importorskip("mypy")
    config = stubs.prepare(site, tmp_path)
    target = ROOT / "skrr_export" / "trt.py"
    ok = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config), str(target)],
                        capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # the check is real: a misspelled TensorRT name fails it
    broken = tmp_path / "broken.py"
    broken.write_text("import tensorrt as trt\n\ndef f(b: trt.Builder) -> None:\n    b.create_netwrk(0)\n    trt.BuilderFlag.FP17\n")
    bad = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config), str(broken)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1 and "create_netwrk" in bad.stdout and "FP17" in bad.stdout


@needs_rtx
def test_rtx_builder_options_build(onnx_files, tmp_path):
    """The trtexec-style options that TensorRT-RTX supports without a GPU all build (REFIT_IDENTICAL and
    STRIP_PLAN need a GPU at build time in RTX 1.7: Myelin asks CUDA for the device)."""
    onnx_path = onnx_files("t5", "heavy-reuse")
    options = EngineOptions(batch=ShapeRange(1, 2, 4), sequence=ShapeRange(1, 16, 64), workspace_mib=256,
                            optimization_level=1, weight_streaming=True, compute_capabilities=("sm86", "sm89"),
                            timing_cache=tmp_path / "timing.cache")
    art = build_engine(onnx_path, "trt-rtx", options, tmp_path / "engine.plan", {})
    meta = json.loads(art.metadata_path.read_text())
    assert meta["options"]["compute_capabilities"] == ["sm86", "sm89"]
    assert meta["gpu_targets"] == {"compute_capabilities": ["8.6", "8.9"], "source": "--compute-capability"}
    assert_weights_stored_once(art.metadata, onnx_path)
    assert not (tmp_path / "timing.cache").exists(), "RTX has no timing cache; nothing is written"
    with pytest.raises(UserError, match="unknown compute capability 'sm99'"):
        build_engine(onnx_path, "trt-rtx", replace(options, compute_capabilities=("sm99",)), tmp_path / "x.plan", {})
    with pytest.raises(UserError, match="TensorRT-RTX has no hardware compatibility levels"):
        build_engine(onnx_path, "trt-rtx", replace(options, hardware_compatibility="ampere_plus"), tmp_path / "y.plan", {})


@pytest.mark.skipif(not cuda_available(), reason="the refittable weights list needs the engine deserialized on a CUDA device")
@needs_rtx
def test_refit_engine_lists_equal_valued_parameters_as_two_weights(tiny_models, tmp_path):  # pragma: no cover - GPU only
    """Deduplication is by identity: two parameters holding equal values are two refittable weights by name."""
    import torch

    from skrr_export.trt import execution_blocker

    if execution_blocker("trt-rtx"):
        pytest.skip(execution_blocker("trt-rtx"))
    plan = make_plan("bert", "dense")
    module = apply_plan(load_encoder(ModelSource(tiny_models["bert"][1]), plan), plan)
    with torch.no_grad():
        for sub_block in module.kept.values():
            for name, p in sub_block.named_parameters():
                if name.endswith("LayerNorm.bias"):
                    p.fill_(0.25)
    onnx_path = export_onnx(module, tmp_path / "model.onnx", ExportOptions(), vocab_size=96).path
    art = build_engine(onnx_path, "trt-rtx", replace(OPTIONS, refit=True), tmp_path / "engine.plan", {})
    trt = load_backend("trt-rtx").module
    logger = trt.Logger(trt.Logger.ERROR)
    engine = trt.Runtime(logger).deserialize_cuda_engine(art.path.read_bytes())
    listed = set(trt.Refitter(engine, logger).get_all_weights())
    biases = {module.checkpoint_name(n) for n, _ in module.named_parameters()
              if n.endswith("LayerNorm.bias") and n.startswith("kept.")}  # refit addresses them by checkpoint name
    assert biases and biases <= listed


@needs_rtx
@pytest.mark.skipif(cuda_available(), reason="checks the failure a weight-stripped build meets without a GPU")
def test_a_failed_streamed_build_leaves_no_file(onnx_files, tmp_path):
    """TensorRT-RTX 1.7 needs a CUDA device to build a weight-stripped plan (Myelin asks CUDA for the device): the
    build fails, the error names it, and neither engine.plan nor a partial file is left."""
    with pytest.raises(ArtifactError, match="trt-rtx build failed"):
        build_engine(onnx_files("bert", "dense"), "trt-rtx", replace(OPTIONS, strip_weights=True), tmp_path / "engine.plan", {})
    assert list(tmp_path.iterdir()) == []


@needs_rtx
def test_loading_an_engine_says_why_not_on_this_machine(engines):
    """load_engine checks the machine before the plan: without an RTX-class GPU it names the reason (here, where
    the RTX engines of this suite cannot run)."""
    from skrr_export.trt import execution_blocker, load_engine

    blocker = execution_blocker("trt-rtx")
    if blocker is None:
        pytest.skip("an RTX-class GPU is here: test_rtx_weight_stripped_engine_refits_and_runs loads engines")
    art = engines("bert", "dense")
    with pytest.raises(ArtifactError, match=f"cannot load engine.plan: {blocker.split(': ', 1)[1]}"):
        load_engine(art.path, "trt-rtx")


@needs_rtx
@pytest.mark.skipif(not cuda_available(), reason="a weight-stripped TensorRT-RTX build and its refit need a CUDA device")
def test_rtx_weight_stripped_engine_refits_and_runs(tiny_models, tmp_path):  # pragma: no cover - RTX GPUs only
    """--strip-weights: the plan is smaller than the full engine, load_engine refits it from the export's own
    model.onnx(.data), and the refitted engine passes the job's parity check against PyTorch."""
    from skrr_export.cli import main
    from skrr_export.trt import execution_blocker

    if execution_blocker("trt-rtx"):
        pytest.skip(f"needs an RTX-class GPU (compute capability 8.0/8.6/8.9/12.x): {execution_blocker('trt-rtx')}")
    _, folder = tiny_models["bert"]
    plan_path = write_plan(tmp_path, make_plan("bert", "dense").to_json())
    common = ["--plan", str(plan_path), "--model", str(folder), "--engine", "trt-rtx", "--no-dense-distance", "-q"]
    assert main([*common, "--out", str(tmp_path / "full")]) == 0
    assert main([*common, "--strip-weights", "--out", str(tmp_path / "stripped")]) == 0
    stripped = json.loads((tmp_path / "stripped" / "report.json").read_text())
    assert stripped["parity"][-1]["passed"] is True
    assert (tmp_path / "stripped" / "engine.plan").stat().st_size < (tmp_path / "full" / "engine.plan").stat().st_size / 2
