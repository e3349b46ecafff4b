"""measure's ort-cuda-fused backend, on the CPU (benchmarks/rehearsal.py: ONNX Runtime's CPU provider, CUDA's
memory counters read 0 and are not asserted): the fused copy of the export runs for dense and plan, matches PyTorch,
holds one MultiHeadAttention per executed attention slot, and reads the export's weights from the export's data file;
the hot-path placement target from a profile's events."""

from __future__ import annotations

import shutil

import pytest

from skrr_export.errors import InvariantError
from benchmarks.targets import check_targets
from skrr_export.measure import MeasureConfig
from skrr_export.ort_profile import hot_path
from skrr_export.model import ModelSource, build_meta, load_config
from skrr_export.plan import Plan
from skrr_export.workload import Shape

from .helpers import NUM_BLOCKS

FUSED = "ort-cuda-fused"


def executed_attention_slots(plan: Plan) -> int:
    """Attention sub-blocks are the even slots; a slot executes when it is kept or re-uses another sub-block."""
    return sum(1 for slot in range(0, 2 * NUM_BLOCKS, 2) if slot not in plan.skip or slot in plan.reuse)


def initializers(path):
    """name -> (elements, where): external (file, offset, length) or inline bytes, read without external data."""
    import math

    import onnx

    out = {}
    for t in onnx.load(str(path), load_external_data=False).graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in t.external_data}
            out[t.name] = (math.prod(t.dims), ("external", entries["location"], entries.get("offset", "0"),
                                                int(entries["length"])))
        else:
            out[t.name] = (math.prod(t.dims), ("inline", len(t.SerializeToString())))
    return out


def storage_seen_by_the_session(onnx_path):
    """What sits in the variant's folder while the fused copy is measured (the folder is removed afterwards)."""
    folder = onnx_path.parent
    return {"fused": initializers(onnx_path), "export": initializers(folder / "model.onnx"),
            "data_files": sorted(p.name for p in folder.iterdir() if p.suffix == ".data"), "path": onnx_path}


@pytest.fixture
def on_cpu():  # type: ignore[no-untyped-def]
    from benchmarks.rehearsal import rehearsal_on_cpu

    with rehearsal_on_cpu():
        yield


def test_fused_variant_runs_for_dense_and_plan_on_the_exports_weights(tiny_models, tmp_path, monkeypatch, on_cpu):
    import skrr_export.measure as measure

    _, folder = tiny_models["t5"]
    plan = Plan("t5", NUM_BLOCKS, skip=(1, 2, 3, 4), reuse={2: 0})  # attention slots 0 and 2 (block 0's again) run
    seen = []
    real = measure.measure_ort
    monkeypatch.setattr(measure, "measure_ort", lambda path, *a, **k: seen.append(storage_seen_by_the_session(path))
                        or real(path, *a, **k))
    cfg = MeasureConfig(plan=tmp_path / "unused.json", out=tmp_path / "unused", precision="fp32", warmup=1,
                        iterations=2, parity=("dense", "plan"))
    meta = build_meta(load_config(ModelSource(folder)))
    results = measure.run_measurements(meta, ModelSource(folder), plan, (FUSED,), [Shape(2, 16)], cfg,
                                       tmp_path / "work")

    runs = {r["variant"]: r for r in results["runs"]}
    assert [(r["variant"], r["backend"]) for r in results["runs"]] == [("dense", FUSED), ("plan", FUSED)]
    assert not results["errors"]
    checks = [(p["variant"], p["backend"], p["passed"]) for p in results["parity"]]
    assert checks == [("dense", FUSED, True)] * 2 + [("plan", FUSED, True)] * 2  # two parity batches each
    for variant, variant_plan in (("dense", Plan.dense("t5", NUM_BLOCKS)), ("plan", plan)):
        executed = executed_attention_slots(variant_plan)
        ops = runs[variant]["placement"]["ops"]  # what ONNX Runtime ran, from its profile
        assert ops.get("MultiHeadAttention") == runs[variant]["fusion"]["fused_attention"] == executed, ops
        assert "Softmax" not in ops
    assert executed_attention_slots(plan) == 2 and executed_attention_slots(Plan.dense("t5", NUM_BLOCKS)) == 3

    assert [s["path"].name for s in seen] == ["model.ort.onnx"] * 2
    for s in seen:
        assert s["data_files"] == ["model.onnx.data"], "one data file: the fused copy wrote none of its own"
        for name, (elements, where) in s["fused"].items():
            if elements > 8:  # every weight stored as the export stored it: the same bytes of the same data file
                assert where == s["export"][name][1], name
        external = [w for _, w in s["fused"].values() if w[0] == "external"]
        assert {w[1] for w in external} == {"model.onnx.data"}
        inline = [w[-1] for _, w in s["fused"].values() if w[0] == "inline"]
        assert sum(w[-1] for w in external) > 10 * sum(inline), "the weights are in the data file, not the graph's"
        assert sum(inline) <= sum(w[-1] for _, w in s["export"].values() if w[0] == "inline"), "no extra weight bytes"
    assert not any((tmp_path / "work").rglob("*.onnx")), "the copies and exports are removed"


def test_a_fused_copy_that_stores_weights_anew_is_refused(tiny_models, tmp_path):
    import onnx

    from skrr_export.apply import apply_plan
    from skrr_export.export import ExportOptions, export_onnx
    from skrr_export.fused_copy import fused_copy, shared_weight_storage
    from skrr_export.model import load_encoder

    _, folder = tiny_models["t5"]
    plan = Plan("t5", NUM_BLOCKS, skip=(2, 3, 4, 5))  # one block: a short export
    export = export_onnx(apply_plan(load_encoder(ModelSource(folder), plan), plan), tmp_path / "model.onnx",
                         ExportOptions(external_data=True), 96).path
    fused, fusion = fused_copy(export, "t5")
    assert fusion["storage"]["data_files"] == ["model.onnx.data"]
    inline = tmp_path / "inline.onnx"  # the same graph with its weights written into the graph file
    onnx.save(onnx.load(str(fused)), str(inline))
    with pytest.raises(InvariantError, match="breaks weights once: .* is not the weight the original stored .*inline"):
        shared_weight_storage(export, inline)
    other = tmp_path / "other"  # the same graph reading a data file of its own
    other.mkdir()
    shutil.copyfile(tmp_path / "model.onnx.data", other / "copy.data")
    moved = onnx.load(str(fused), load_external_data=False)
    for t in moved.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "copy.data"
    onnx.save(moved, str(other / "model.ort.onnx"))
    with pytest.raises(InvariantError, match="is not the weight the original stored .* it is .* copy.data at byte"):
        shared_weight_storage(export, other / "model.ort.onnx")


def node(name, op, provider, *shapes):
    return {"cat": "Node", "name": f"{name}_kernel_time",
            "args": {"op_name": op, "provider": provider, "output_type_shape": [{"float": list(s)} for s in shapes]}}


def test_hot_path_lists_what_leaves_cuda_on_the_batchs_data():
    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    events = [node("mm", "MatMul", cuda, (1, 16, 32)), node("shape", "Shape", cpu, (3,)),
              node("concat", "Concat", cpu, (4,)), node("where", "Where", cpu, (16, 16)),
              node("where2", "Where", cpu, (1, 16)), node("copy", "MemcpyToHost", cuda, (1, 16, 32)),
              node("mm", "MatMul", cuda, (1, 16, 32)), {"cat": "Session", "name": "model_run"}]
    assert hot_path(events) == [
        {"op": "Where", "provider": cpu, "nodes": 2, "max_output_elements": 256, "example": "where"},
        {"op": "MemcpyToHost", "provider": cuda, "nodes": 1, "max_output_elements": 512, "example": "copy"}]
    run = {"variant": "plan", "backend": FUSED, "unique_weight_bytes": 1, "resident_over_unique": 1.0, "shapes": [],
           "placement": {"hot_path": hot_path(events)}}
    clean = run | {"placement": {"hot_path": hot_path(events[:3])}}
    for r, met in ((run, False), (clean, True)):
        targets = [t for t in check_targets({"runs": [r], "flops": []}) if "hot path" in t["target"]]
        assert [(t["target"], t["value"], t["met"]) for t in targets] == [
            (f"{FUSED} (plan): nodes off CUDA or memcpy on the hot path", 0 if met else 3, met)]
