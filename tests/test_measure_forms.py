"""measure on the forms the recipes ship (issue 27), rehearsed on the CPU (benchmarks/rehearsal.py: ONNX Runtime's
CPU provider stands in for CUDA, memory figures read 0 and are never asserted): a fixed-sequence export and an int32
export, measured by the main job's measure stage and by ``skrr-export measure``; fp16 and bf16 exports; an engine's
profile; a backend failing half-way. What each artifact takes is checked against ONNX Runtime's own view of the graph
(``InferenceSession.get_inputs``) and TensorRT's parse of it (engine.json), not against the package's reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from skrr_export.apply import apply_plan
from skrr_export.cli import main
from skrr_export.errors import ArtifactError
from skrr_export.export import ExportOptions, export_onnx
from skrr_export.model import ModelSource, build_meta, load_config, load_encoder
from skrr_export.plan import Plan
from skrr_export.trt import available
from skrr_export.workload import Shape

from .helpers import NUM_BLOCKS
from .test_cli import write_plan

PLAN = Plan("t5", NUM_BLOCKS, skip=(1, 2, 3, 4), reuse={2: 0})  # slots 0, 2 (block 0's attention again), 5 run
FIXED = 16
QUICK = ["--warmup", "1", "--iterations", "2"]


@pytest.fixture
def rehearsal():  # type: ignore[no-untyped-def]
    from benchmarks.rehearsal import rehearsal_on_cpu

    with rehearsal_on_cpu():
        yield


@pytest.fixture(scope="module")
def int32_fixed_export(tiny_models, tmp_path_factory):
    """The tiny T5 with PLAN, exported as NVIDIA's demo exports T5: int32 inputs, sequence fixed (at 16)."""
    _, folder = tiny_models["t5"]
    out = tmp_path_factory.mktemp("int32-fixed")
    module = apply_plan(load_encoder(ModelSource(folder), PLAN), PLAN)
    return export_onnx(module, out / "model.onnx", ExportOptions(input_dtype="int32", fixed_sequence=FIXED), 96).path


def graph_inputs(path) -> dict[str, tuple[str, list]]:
    """ONNX Runtime's own view of what a graph takes: input name -> (type, shape)."""
    import onnxruntime as ort

    return {i.name: (i.type, list(i.shape)) for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()}


def spy_on_ort(monkeypatch) -> list[dict]:
    """Every ONNX Runtime measurement's graph (as ONNX Runtime reads it) and the feeds it was given."""
    import skrr_export.measure as measure

    seen: list[dict] = []
    real = measure.measure_ort

    def spy(path, shapes, feeds, *args, **kwargs):
        seen.append({"graph": graph_inputs(path), "feeds": {str(s): {k: (v.dtype.name, v.shape) for k, v in f.items()}
                                                            for s, f in feeds.items()}})
        return real(path, shapes, feeds, *args, **kwargs)

    monkeypatch.setattr(measure, "measure_ort", spy)
    return seen


def test_main_jobs_measure_stage_feeds_its_int32_fixed_sequence_export(tiny_models, int32_fixed_export, tmp_path,
                                                                      monkeypatch, rehearsal):
    """The main job's measure stage (pipeline._measure) on the ONNX it wrote, with no second export: ONNX Runtime gets
    int32 feeds of the fixed length, timings and parity at that length, nothing lost (before: both rejected, the
    backend not measured); the dense model in PyTorch only; the job's own file left where it was."""
    import skrr_export.measure as measure
    from skrr_export.pipeline import ExportConfig, _measure

    _, folder = tiny_models["t5"]
    assert graph_inputs(int32_fixed_export)["input_ids"] == ("tensor(int32)", ["batch", FIXED])
    monkeypatch.setattr(measure, "_export", lambda *a: pytest.fail("the measure stage exported the model again"))
    seen = spy_on_ort(monkeypatch)
    cfg = ExportConfig(plan=tmp_path / "unused.json", out=tmp_path / "unused", input_dtype="int32", fixed_sequence=FIXED)
    results = _measure(cfg, ModelSource(folder), PLAN, tmp_path, int32_fixed_export, None)

    assert not results["errors"] and not results["skipped"], (results["errors"], results["skipped"])
    runs = {(r["variant"], r["backend"]): [(s["batch"], s["seq"]) for s in r["shapes"]] for r in results["runs"]}
    assert runs == {("dense", "torch"): [(1, FIXED)], ("plan", "torch"): [(1, FIXED)], ("plan", "ort-cuda"): [(1, FIXED)]}
    assert [(p["backend"], p["passed"]) for p in results["parity"]] == [("ort-cuda", True)] * 2  # prompts, empty prompt
    assert seen[0]["feeds"] == {f"1x{FIXED}": {"input_ids": ("int32", (1, FIXED)), "attention_mask": ("int32", (1, FIXED))}}
    assert int32_fixed_export.is_file(), "the job's own artifact is left where it was"


def test_main_jobs_measure_stage_feeds_an_unmasked_export(tiny_models, tmp_path, monkeypatch, rehearsal):
    """An SD3/FLUX-style export takes input_ids only: PyTorch runs the module without the mask, ONNX Runtime is fed
    input_ids alone, and parity scores every position (there is no mask to score by)."""
    from skrr_export.pipeline import ExportConfig, _measure

    _, folder = tiny_models["t5"]
    module = apply_plan(load_encoder(ModelSource(folder), PLAN), PLAN, attention_mask=False)
    onnx = export_onnx(module, tmp_path / "model.onnx", ExportOptions(fixed_sequence=FIXED), 96).path
    assert graph_inputs(onnx) == {"input_ids": ("tensor(int64)", ["batch", FIXED])}
    seen = spy_on_ort(monkeypatch)
    cfg = ExportConfig(plan=tmp_path / "unused.json", out=tmp_path / "unused", fixed_sequence=FIXED)
    results = _measure(cfg, ModelSource(folder), PLAN, tmp_path, onnx, None)

    assert not results["errors"] and not results["skipped"], (results["errors"], results["skipped"])
    assert {(r["variant"], r["backend"]) for r in results["runs"]} == {("dense", "torch"), ("plan", "torch"),
                                                                        ("plan", "ort-cuda")}
    assert [p["passed"] for p in results["parity"]] == [True, True]
    assert seen[0]["feeds"] == {f"1x{FIXED}": {"input_ids": ("int64", (1, FIXED))}}


def test_measure_exports_without_the_mask_when_asked(tiny_models, tmp_path, monkeypatch, rehearsal):
    """MeasureConfig.attention_mask=False (an SD3/FLUX recipe's call): measure's own export takes input_ids only."""
    import skrr_export.measure as measure

    _, folder = tiny_models["t5"]
    seen = spy_on_ort(monkeypatch)
    cfg = measure.MeasureConfig(plan=tmp_path / "unused.json", out=tmp_path / "unused", precision="fp32", warmup=1,
                                iterations=2, variants=("plan",), attention_mask=False)
    results = measure.run_measurements(build_meta(load_config(ModelSource(folder))), ModelSource(folder), PLAN,
                                       ("ort-cuda",), [Shape(2, 8)], cfg, tmp_path / "work")
    assert [s["graph"] for s in seen] == [{"input_ids": ("tensor(int64)", ["batch", "sequence"])}]
    assert [p["passed"] for p in results["parity"]] == [True, True] and not results["errors"]


@pytest.mark.parametrize("recipe", ["sd3-40.5", "pixart-sigma-41.9", "flux-dev-40.5", "minilm"])
def test_measure_command_measures_what_a_recipe_ships(recipe, monkeypatch, tmp_path):
    """--recipe: the export form measured is the recipe's (its export block and its pipeline's call, read here from
    recipe.json itself); --seq defaults to the fixed length."""
    import skrr_export.measure as measure
    from skrr_export.recipes import available_recipes

    seen = []
    monkeypatch.setattr(measure, "measure", lambda cfg: seen.append(cfg) or {"summary": []})
    args = ["measure", "--recipe", recipe, "--out", str(tmp_path / "m")]
    assert main(args + ([] if recipe == "minilm" else ["--random-weights"])) == 0
    declared = json.loads((available_recipes()[recipe] / "recipe.json").read_text())
    fixed = declared["export"]["fixed_sequence"]
    assert (seen[0].fixed_sequence, seen[0].input_dtype) == (fixed, declared["export"]["input_dtype"])
    assert seen[0].attention_mask == declared.get("pipeline", {}).get("attention_mask", True)
    assert seen[0].sequences == ((fixed,) if fixed else (256, 512))


def test_measure_command_exports_and_feeds_the_form_asked_for(tiny_models, tmp_path, monkeypatch, rehearsal):
    """``skrr-export measure --input-dtype int32 --fixed-sequence 16``: both variants exported in that form, every
    backend fed it; a --seq the fixed graph cannot take is skipped with the reason before any work."""
    _, folder = tiny_models["t5"]
    seen = spy_on_ort(monkeypatch)
    plan, out = write_plan(tmp_path, PLAN.to_json()), tmp_path / "m"
    assert main(["measure", "--plan", str(plan), "--model", str(folder), "--out", str(out), "--precision", "fp32",
                 "--backends", "torch,ort-cuda", "--batch", "1,2", "--seq", f"8,{FIXED}", "--input-dtype", "int32",
                 "--fixed-sequence", str(FIXED), *QUICK]) == 0
    results = json.loads((out / "results.json").read_text())

    assert [(s["shape"], s["reason"]) for s in results["skipped"]] == [
        (shape, f"the export takes sequence length only {FIXED}, not 8") for shape in ("1x8", "2x8")]
    assert not results["errors"]
    taken = [(1, FIXED), (2, FIXED)]
    assert {(r["variant"], r["backend"]): [(s["batch"], s["seq"]) for s in r["shapes"]] for r in results["runs"]} == {
        (v, b): taken for v in ("dense", "plan") for b in ("torch", "ort-cuda")}
    assert [(p["variant"], p["passed"]) for p in results["parity"]] == [("plan", True)] * 2
    for measured in seen:  # dense and plan: ONNX Runtime's view of each export, and what it was fed
        assert measured["graph"]["input_ids"] == ("tensor(int32)", ["batch", FIXED])
        assert {f["input_ids"] for f in measured["feeds"].values()} == {("int32", (1, FIXED)), ("int32", (2, FIXED))}
    assert len(seen) == 2
    assert f"**Skipped:** 1x8 on every (both): the export takes sequence length only {FIXED}" in (out / "results.md").read_text()


def test_measure_command_refuses_shapes_none_of_which_the_export_takes(tiny_models, tmp_path, capsys, rehearsal):
    _, folder = tiny_models["t5"]
    plan, out = write_plan(tmp_path, PLAN.to_json()), tmp_path / "m"
    assert main(["measure", "--plan", str(plan), "--model", str(folder), "--out", str(out), "--precision", "fp32",
                 "--backends", "torch", "--seq", "8", "--fixed-sequence", str(FIXED), *QUICK]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"nothing to measure: the export takes sequence length only {FIXED}, not 8" in err
    assert not out.exists() and not list(tmp_path.glob("m.*"))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_exports_in_the_rehearsal(precision, tiny_models, tmp_path, rehearsal):
    """fp16: ONNX Runtime's CPU provider stands in and matches PyTorch. bf16: it has no kernels, so the ONNX Runtime
    backend records that one reason; PyTorch's rows are there. (The plan only: the dense export takes the same path.)"""
    import skrr_export.measure as measure

    _, folder = tiny_models["t5"]
    cfg = measure.MeasureConfig(plan=tmp_path / "unused.json", out=tmp_path / "unused", precision=precision, warmup=1,
                                iterations=2, variants=("plan",))
    results = measure.run_measurements(build_meta(load_config(ModelSource(folder))), ModelSource(folder), PLAN,
                                       ("torch", "ort-cuda"), [Shape(2, 12)], cfg, tmp_path / "work")
    measured = {r["backend"] for r in results["runs"] if len(r["shapes"]) == 1}
    if precision == "fp16":
        assert measured == {"torch", "ort-cuda"} and not results["errors"]
        assert [p["passed"] for p in results["parity"]] == [True, True]
        return
    assert measured == {"torch"}
    assert [(e["variant"], e["backend"], e["shapes_kept"]) for e in results["errors"]] == [("plan", "ort-cuda", 0)]
    assert all("skipped in the CPU rehearsal" in e["error"] and "NOT_IMPLEMENTED" in e["error"] for e in results["errors"])


def test_a_backend_failing_half_way_keeps_what_it_measured(tiny_models, tmp_path, monkeypatch, rehearsal):
    """ONNX Runtime runs out of device memory at the largest shape: that backend keeps its two smaller shapes and
    records the one reason; the next backend is measured in full."""
    import skrr_export.measure as measure
    from skrr_export import runners

    real = runners._OrtBound.run
    failed = []

    def run(self):  # type: ignore[no-untyped-def]
        if self.values[0].shape()[0] == 4 and not failed:
            failed.append(True)
            raise ArtifactError("ONNX Runtime failed to run the model: Failed to allocate memory for requested buffer")
        real(self)

    monkeypatch.setattr(runners._OrtBound, "run", run)
    _, folder = tiny_models["t5"]
    cfg = measure.MeasureConfig(plan=tmp_path / "unused.json", out=tmp_path / "unused", precision="fp32", warmup=1,
                                iterations=2, variants=("plan",))
    meta = build_meta(load_config(ModelSource(folder)))
    shapes = [Shape(1, 8), Shape(2, 8), Shape(4, 8)]
    results = measure.run_measurements(meta, ModelSource(folder), PLAN, ("ort-cuda", "ort-cuda-stock"), shapes, cfg,
                                       tmp_path / "work")

    kept = {r["backend"]: [(s["batch"], s["seq"]) for s in r["shapes"]] for r in results["runs"]}
    assert kept == {"ort-cuda": [(1, 8), (2, 8)], "ort-cuda-stock": [(1, 8), (2, 8), (4, 8)]}
    assert all(s["median_ms"] > 0 for r in results["runs"] for s in r["shapes"])
    assert results["errors"] == [{"variant": "plan", "backend": "ort-cuda", "shapes_kept": 2,
                                  "error": "ArtifactError: ONNX Runtime failed to run the model: Failed to allocate "
                                           "memory for requested buffer"}]
    assert [p["backend"] for p in results["parity"]] == ["ort-cuda-stock"] * 2  # the stopped one checked nothing
    from skrr_export.measure_report import render

    md = render(results | {"tool": {"device": "cpu"}, "model": {"path": "m", "family": "t5",
                                                                                 "random_weights": False}, "targets": []})
    assert "**Stopped after 2 shapes:** ort-cuda (plan): ArtifactError" in md


def test_a_pytorch_mode_failing_half_way_keeps_what_it_measured(tiny_models, tmp_path, monkeypatch, rehearsal):
    """PyTorch runs out of device memory at the larger shape: its first row is kept, the reason recorded."""
    import torch

    import skrr_export.measure as measure
    from skrr_export import runners

    real = runners._TorchBound.run

    def run(self):  # type: ignore[no-untyped-def]
        if self.inputs[0].shape[0] == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        real(self)

    monkeypatch.setattr(runners._TorchBound, "run", run)
    _, folder = tiny_models["t5"]
    cfg = measure.MeasureConfig(plan=tmp_path / "unused.json", out=tmp_path / "unused", precision="fp32", warmup=1,
                                iterations=2, variants=("plan",))
    results = measure.run_measurements(build_meta(load_config(ModelSource(folder))), ModelSource(folder), PLAN,
                                       ("torch",), [Shape(1, 8), Shape(4, 8)], cfg, tmp_path / "work")
    assert [(r["backend"], [(s["batch"], s["seq"]) for s in r["shapes"]]) for r in results["runs"]] == [("torch", [(1, 8)])]
    assert results["errors"] == [{"variant": "plan", "backend": "torch", "shapes_kept": 1,
                                  "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}]


@pytest.mark.skipif(not available("trt-rtx"), reason="tensorrt-rtx is not installed (pip install tensorrt-rtx)")
def test_an_engines_profile_decides_what_it_is_fed(int32_fixed_export, tiny_models, tmp_path, rehearsal):
    """The main job's engine: what TensorRT parsed (engine.json: int32, sequence 16, batch 1..4) decides its feeds;
    a batch beyond its profile is skipped for the engine only, before it is loaded."""
    import skrr_export.measure as measure
    from skrr_export.trt import EngineOptions, ShapeRange, build_engine
    from skrr_export.workload import engine_input_form

    engine = build_engine(int32_fixed_export, "trt-rtx", EngineOptions(batch=ShapeRange(1, 2, 4),
                                                                       sequence=ShapeRange(FIXED, FIXED, FIXED)),
                          tmp_path / "engine.plan", {})
    parsed = {i["name"]: (i["dtype"], i["shape"]) for i in engine.metadata["inputs"]}
    assert parsed["input_ids"] == ("INT32", [-1, FIXED])
    form = engine_input_form(engine.path, engine.metadata)
    assert dict(form.dtypes)["input_ids"] == "int32" and (form.batch, form.sequence) == ((1, 4), (FIXED, FIXED))

    _, folder = tiny_models["t5"]
    cfg = measure.MeasureConfig(plan=tmp_path / "unused.json", out=tmp_path / "unused", precision="fp32", warmup=1,
                                iterations=2, variants=("plan",))
    results = measure.run_measurements(build_meta(load_config(ModelSource(folder))), ModelSource(folder), PLAN,
                                       ("ort-cuda", "trt-rtx"), [Shape(1, FIXED), Shape(8, FIXED)], cfg, tmp_path / "w",
                                       measure.MeasuredArtifacts(int32_fixed_export, {"trt-rtx": engine}))
    assert [(s["backend"], s["shape"], s["reason"]) for s in results["skipped"]] == [
        ("trt-rtx", f"8x{FIXED}", f"engine.plan (its profile) takes batch size 1 to 4, not 8")]
    assert [(r["backend"], len(r["shapes"])) for r in results["runs"]] == [("ort-cuda", 2)]
    assert [(e["backend"], e["shapes_kept"]) for e in results["errors"]] == [("trt-rtx", 0)]
    assert "built, not executed" in results["errors"][0]["error"]


def test_feeds_fit_what_onnx_runtime_says_the_graph_takes(int32_fixed_export, tiny_models):
    """timing_feed and the parity batches for a form read from the file: ONNX Runtime runs them as they are."""
    import onnxruntime as ort

    from skrr_export.measure import parity_batches, timing_feed
    from skrr_export.workload import onnx_input_form

    model, _ = tiny_models["t5"]
    form = onnx_input_form(int32_fixed_export)
    session = ort.InferenceSession(str(int32_fixed_export), providers=["CPUExecutionProvider"])
    feeds = [timing_feed(model.config, Shape(3, FIXED), form=form)] + [b.feed for b in parity_batches(model.config, form)]
    for feed in feeds:
        assert {k: v.dtype for k, v in feed.items()} == {i.name: np.dtype("int32") for i in session.get_inputs()}
        assert np.isfinite(session.run(None, feed)[0]).all()
    assert [f["input_ids"].shape for f in feeds] == [(3, FIXED), (3, FIXED), (1, FIXED)]
    assert form.refusal(1, FIXED + 1) == f"model.onnx takes sequence length only {FIXED}, not {FIXED + 1}"


def test_an_export_read_back_is_compared_with_its_options(int32_fixed_export):
    """What measure checks once its own export is written: names, dtypes and sizes each count."""
    from skrr_export.workload import onnx_input_form, planned_form

    read, both = onnx_input_form(int32_fixed_export), ("input_ids", "attention_mask")
    assert planned_form(both, "int32", FIXED).differences(read) == []
    assert planned_form(both, "int64", FIXED).differences(read) == ["input_ids: int64 vs int32",
                                                                    "attention_mask: int64 vs int32"]
    assert planned_form(both, "int32", None).differences(read) == [f"sequence: (1, None) vs ({FIXED}, {FIXED})"]
    assert planned_form(("input_ids",), "int32", FIXED).differences(read) == ["inputs: input_ids vs input_ids, attention_mask"]


def test_measure_command_measures_a_quantized_plan_through_the_stage_chain(tiny_models, tmp_path, monkeypatch, rehearsal):
    """``skrr-export measure --quantize int8``: the plan is quantized by the stage chain and its export stores the integers
    (DequantizeLinear, read from the file ONNX Runtime is given), which ONNX Runtime's CPU provider runs and which
    matches PyTorch computing with the same dequantized weights; the dense model stays the unquantized baseline. The
    ONNX backend's weight bytes are the quantized ones, PyTorch's the dequantized values it runs. (int4 takes the same
    chain; the tiny T5's widths fit no int4 block, and test_quantize runs int4's DequantizeLinear on ONNX Runtime.)"""
    import onnx

    import skrr_export.measure as measure

    _, folder = tiny_models["t5"]
    dequantize_ops = []
    real = measure.measure_ort

    def spy(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        graph = onnx.load(str(path), load_external_data=False).graph
        dequantize_ops.append(sum(n.op_type == "DequantizeLinear" for n in graph.node))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(measure, "measure_ort", spy)
    plan, out = write_plan(tmp_path, PLAN.to_json()), tmp_path / "m"
    assert main(["measure", "--plan", str(plan), "--model", str(folder), "--out", str(out), "--precision", "fp32",
                 "--backends", "torch,ort-cuda", "--batch", "1", "--seq", "8", "--quantize", "int8", *QUICK]) == 0
    results = json.loads((out / "results.json").read_text())

    assert results["quantization"] == {"scheme": "int8", "block": None}
    assert not results["errors"]
    assert dequantize_ops[0] == 0 and dequantize_ops[1] > 0  # dense, then the plan
    assert [(p["variant"], p["passed"]) for p in results["parity"]] == [("plan", True)] * 2
    weights = {(r["variant"], r["backend"]): r["unique_weight_bytes"] for r in results["runs"]}
    assert weights[("plan", "ort-cuda")] < weights[("plan", "torch")]
    assert weights[("dense", "ort-cuda")] == weights[("dense", "torch")]
