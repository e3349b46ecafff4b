"""ONNX Runtime latency of a T5 export with and without the RMSNorm rewrite that lets ONNX Runtime fuse it.

  python benchmarks/ort_norm_fusion.py [--device cpu|cuda] [--batch 1] [--seq 256]

T5-v1.1-base shapes (12 blocks, d_model 768), random weights, fp32, dense plan. "Without" exports with the
rewrite pass replaced by a no-op (here only); both graphs are otherwise identical. Writes
benchmarks/results/ort-norm-fusion-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T5_BASE = {"architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": 768, "d_ff": 2048, "d_kv": 64,
           "num_heads": 12, "num_layers": 12, "feed_forward_proj": "gated-gelu", "vocab_size": 32128,
           "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "is_encoder_decoder": False,
           "use_cache": False, "layer_norm_epsilon": 1e-6}


def main() -> None:
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    import skrr_export.export as export
    from skrr_export.graph.passes import PASSES
    from skrr_export.apply import apply_plan
    from skrr_export.measure import latency, timing_feed
    from skrr_export.model import ModelSource, load_encoder
    from skrr_export.plan import Plan
    from skrr_export.runners import OrtRunner
    from skrr_export.workload import Shape

    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iterations", type=int, default=20)
    args = p.parse_args()
    providers = ("CUDAExecutionProvider",) if args.device == "cuda" else ("CPUExecutionProvider",)
    work = Path(tempfile.mkdtemp())
    (work / "config.json").write_text(json.dumps(T5_BASE))
    plan = Plan("t5", 12)
    encoder = load_encoder(ModelSource(work, random_weights=True), plan)
    module = apply_plan(encoder, plan)
    passes = export.graph_passes

    def unrewritten(weights: set[str]) -> ir.passes.Sequential:  # the export's passes but RmsNormAsDiv
        return ir.passes.Sequential(PASSES["keep-weights-optimize"].cls(weights),
                                    PASSES["merge-equal-constants"].cls(weights), PASSES["strip-debug-metadata"].cls())

    shape = Shape(args.batch, args.seq)
    results = {}
    for name, rewritten in (("as exported by torch", False), ("norms rewritten (fusable)", True)):
        export.graph_passes = passes if rewritten else unrewritten
        path = export.export_onnx(module, work / f"{rewritten}.onnx", export.ExportOptions(), 32128).path
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(work / f"{rewritten}.optimized.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), opts, providers=list(providers))
        nodes = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
        with OrtRunner(path, providers) as runner:
            bound = runner.bind(timing_feed(encoder.config, shape))
            stats = latency(bound.run, 3, args.iterations)
        results[name] = {"optimized_nodes": len(nodes), "fused_norms": nodes.count("SimplifiedLayerNormalization"), **stats}
        print(name, results[name])
    export.graph_passes = passes
    record = {"machine": f"{platform.machine()}, {ort.get_device()}", "onnxruntime": ort.__version__,
              "providers": providers, "shape": f"{shape}", "model": "T5-v1.1-base shapes, fp32, dense", "results": results}
    out = ROOT / "benchmarks" / "results" / f"ort-norm-fusion-{args.device}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
