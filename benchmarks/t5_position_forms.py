"""Which form T5's position information takes in a fixed-sequence export, measured.

  python benchmarks/t5_position_forms.py [--seq 300] [--scale 8] [--iterations 10]

With a fixed sequence S, the relative-position buckets (an [S, S] index into the position table) depend on
nothing but S, so constant folding can store them. Forms compared, on the PixArt-Sigma 41.9 % plan applied to a
24-block T5 with T5-v1.1-XXL's config scaled down in width by --scale (random weights, fp32):

- computed:  the bucket arithmetic stays in the graph (folding writes no constant above 1,024 elements);
- exporter:  torch's exporter's own limits (inputs up to 8,192 elements, outputs up to 512 x 512): it folds the
             [S, S] relative positions and a fill tensor, and computes the rest;
- int64:     the buckets folded whole into an [S, S] int64 table;
- int32:     that table as int32 (Gather takes int32 indices);
- int8:      that table as int8, widened to int32 by a Cast node at run time.

In every form the position table itself stays a named, refittable weight. Per form: bytes of graph constants,
ONNX Runtime CPU session creation and latency (batch 1), parity against PyTorch, and a TensorRT-RTX build
(seconds, the builder's weight bytes). Writes benchmarks/results/t5-position-forms-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FORMS = ("computed", "exporter", "int64", "int32", "int8")
EXPORTER_LIMITS = {"input_size_limit": 8192, "output_size_limit": 512 * 512}  # onnxscript's defaults
TABLE_LIMITS = {"input_size_limit": 512 * 512, "output_size_limit": 512 * 512}


def scaled_config(folder: Path, scale: int) -> None:
    config = json.loads((ROOT / "recipes" / "t5-v1_1-xxl" / "config.json").read_text())
    config.update(d_model=4096 // scale, d_ff=10240 // scale, num_heads=64 // scale, vocab_size=32128 // scale)
    (folder / "config.json").write_text(json.dumps(config))


def narrowed_passes(dtype: str):  # type: ignore[no-untyped-def]
    """The export's passes with the bucket table narrowed to ``dtype`` just before the constants are merged."""
    import onnx_ir as ir

    from skrr_export.graph.passes import PASSES

    class NarrowBucketTable(ir.passes.InPlacePass):
        def call(self, model):  # type: ignore[no-untyped-def]
            return ir.passes.PassResult(model, bool(narrow_bucket_table(model, dtype)))

    return lambda weights: ir.passes.Sequential(
        PASSES["keep-weights-optimize"].cls(weights), PASSES["rms-norm-as-div"].cls(), NarrowBucketTable(),
        PASSES["merge-equal-constants"].cls(weights), PASSES["strip-debug-metadata"].cls())


def narrow_bucket_table(model, dtype: str) -> int:  # type: ignore[no-untyped-def]
    """Replace the folded [S, S] int64 bucket table by an int32 one, or an int8 one behind a Cast."""
    import onnx_ir as ir

    changed = 0
    for name, value in tuple(model.graph.initializers.items()):
        array = value.const_value.numpy()
        if array.dtype != np.int64 or array.ndim != 2 or array.size < 1024:
            continue
        if not all(n.op_type == "Gather" and n.inputs[1] is value for n in value.consumers()):
            continue  # an intermediate of the bucket arithmetic, not the index table
        narrow = ir.Value(name=name + f"_{dtype}", const_value=ir.tensor(array.astype(dtype), name=name + f"_{dtype}"))
        model.graph.register_initializer(narrow)
        if dtype == "int8":
            cast = ir.node("Cast", [narrow], attributes={"to": ir.DataType.INT32})
            model.graph.insert_before(next(iter(value.consumers())), cast)
            narrow = cast.outputs[0]
        value.replace_all_uses_with(narrow)
        model.graph.initializers.pop(name)
        changed += 1
    return changed


def main() -> None:
    import onnx
    import onnxruntime as ort
    from onnxscript import optimizer

    import skrr_export.export as export
    from skrr_export.apply import apply_plan
    from skrr_export.compare import DEFAULT_TOLERANCES, compare
    from skrr_export.errors import ArtifactError
    from skrr_export.measure import latency, timing_feed
    from skrr_export.workload import Shape
    from skrr_export.model import ModelSource, load_encoder
    from skrr_export.plan import load_plan
    from skrr_export.runners import OrtRunner, TorchRunner
    from skrr_export.trt import EngineOptions, ShapeRange, available, build_engine

    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=300)
    p.add_argument("--scale", type=int, default=8)
    p.add_argument("--iterations", type=int, default=10)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp())
    scaled_config(work, args.scale)
    plan = load_plan(ROOT / "recipes" / "pixart-sigma-41.9" / "plan.json")
    encoder = load_encoder(ModelSource(work, random_weights=True), plan)
    module = apply_plan(encoder, plan)
    feed = timing_feed(encoder.config, Shape(1, args.seq))
    with TorchRunner(module, module.output_names) as torch_runner:
        reference = torch_runner.infer(feed)
    passes, fold = export.graph_passes, optimizer.fold_constants
    results = {}
    for form in FORMS:
        limits = {"computed": {}, "exporter": EXPORTER_LIMITS}.get(form, TABLE_LIMITS)
        optimizer.fold_constants = lambda model, limits=limits, **kw: fold(model, **(kw | limits))
        export.graph_passes = passes if form not in ("int32", "int8") else narrowed_passes(form)
        art = export.export_onnx(module, work / f"{form}.onnx", export.ExportOptions(fixed_sequence=args.seq), encoder.config.vocab_size)
        nodes = [n.op_type for n in onnx.load(str(art.path)).graph.node]
        start = time.perf_counter()
        with OrtRunner(art.path) as runner:
            created = time.perf_counter() - start
            parity = compare(("pytorch", reference), ("onnxruntime", runner.infer(feed)), feed["attention_mask"],
                             {"*": DEFAULT_TOLERANCES["wiring"]})
            stats = latency(runner.bind(feed).run, 2, args.iterations)
        row = {"constants": art.to_json()["constants"], "weights": art.to_json()["weights"], "nodes": len(nodes),
               "ort_session_seconds": round(created, 3), "ort_cpu": stats, "parity_max_abs": parity.outputs[0].max_abs, "parity_max_rel": parity.outputs[0].max_rel,
               "parity_min_cosine": parity.outputs[0].min_cosine, "reference_max_abs": float(np.abs(reference["last_hidden_state"]).max()),
               "parity_passed": bool(parity)}
        if available("trt-rtx"):
            options = EngineOptions(batch=ShapeRange(1, 1, 4), sequence=ShapeRange(args.seq, args.seq, args.seq))
            try:
                engine = build_engine(art.path, "trt-rtx", options, work / f"{form}.plan", {})
                row["trt_rtx"] = {"build_seconds": engine.metadata["build_seconds"], "weights": engine.metadata["weights"],
                                  "onnx_weight_bytes_aligned": engine.metadata["onnx_weight_bytes_aligned"],
                                  "serialized_bytes": engine.metadata["serialized_bytes"]}
            except ArtifactError as exc:
                row["trt_rtx"] = {"error": str(exc)}
        results[form] = row
        print(form, json.dumps(row), flush=True)
    export.graph_passes, optimizer.fold_constants = passes, fold
    record = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU", "onnxruntime": ort.__version__,
              "model": f"24-block T5, T5-v1.1-XXL config / {args.scale} in width, random weights, fp32",
              "plan": "pixart-sigma-41.9", "shape": f"1x{args.seq}", "results": results}
    out = ROOT / "benchmarks" / "results" / "t5-position-forms-cpu.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
