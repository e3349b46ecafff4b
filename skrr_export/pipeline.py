"""The main job: load_plan -> load_encoder -> apply_plan -> export_onnx -> (build_engine) -> compare -> report.

This module only orchestrates; each stage lives in its own module.
"""

from __future__ import annotations

import gc
import logging
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .compare import DEFAULT_TOLERANCES, Comparison, Tolerance, compare, distance
from .errors import AccuracyError, UserError
from .plan import Plan, load_plan

log = logging.getLogger("skrr_export")

ENGINES = ("onnx", "trt", "trt-rtx")


@dataclass(frozen=True)
class ExportConfig:
    plan: Path
    out: Path
    model: Path | None = None  # None: the embedded MiniLM
    subfolder: str | None = None
    random_weights: bool = False
    engine: str = "onnx"
    precision: str = "fp32"
    input_dtype: str = "int64"
    fixed_sequence: int | None = None
    external_data: bool | None = None
    tolerance: Tolerance | None = None  # None: the precision's default
    dense_distance: bool = True
    force: bool = False


@dataclass
class Stages:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info("%s ...", name)
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        log.info("%s done in %.1f s", name, self.seconds[name])


def run_export(cfg: ExportConfig) -> dict[str, Any]:
    """Run the whole job into ``cfg.out``; returns the report. Raises AccuracyError after writing a failing report."""
    from .apply import apply_plan, plan_cost
    from .artifacts import check_writable, staged_folder
    from .export import ExportOptions, export_onnx
    from .inputs import load_tokenizer, prompt_batch
    from .model import ModelSource, default_model_path, load_encoder
    from .runners import OrtRunner, TorchRunner

    if cfg.engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got '{cfg.engine}'")
    check_writable(cfg.out, cfg.force)
    stages = Stages()
    plan = load_plan(cfg.plan)
    source = ModelSource(cfg.model or default_model_path(), cfg.subfolder, cfg.random_weights)
    tol = cfg.tolerance or DEFAULT_TOLERANCES[cfg.precision]
    tolerances = {"*": tol}
    with stages.stage("load"):
        enc = load_encoder(source, plan, cfg.precision)
    with stages.stage("apply"):
        module = apply_plan(enc, plan)
    cost = plan_cost(enc, plan)
    options = ExportOptions(cfg.input_dtype, cfg.fixed_sequence, cfg.external_data)
    vocab = getattr(enc.config, "text_config", enc.config).vocab_size
    tokenizer = None if cfg.random_weights else load_tokenizer(source.folder)
    prompts, empty = prompt_batch(tokenizer, enc.config, cfg.input_dtype, cfg.fixed_sequence)
    with staged_folder(cfg.out, cfg.force) as stage:
        with stages.stage("export"):
            onnx = export_onnx(module, stage / "model.onnx", options, vocab)
        with stages.stage("parity"):
            torch_runner = TorchRunner(module, module.output_names)
            parity, plan_outputs = _parity(torch_runner, OrtRunner(onnx.path), prompts, empty, tolerances, cfg.precision)
        engine = None
        if cfg.engine != "onnx":
            with stages.stage("engine"):
                engine = _engine(cfg, onnx, stage)
        del module, enc
        gc.collect()
        dense = None
        if cfg.dense_distance:
            with stages.stage("dense distance"):
                dense = _distance_to_dense(source, plan, cfg.precision, prompts, empty, plan_outputs)
        report = {
            "tool": {"name": "skrr-export", "version": __version__, "python": platform.python_version(), **_versions()},
            "model": {"path": str(source.folder), "family": plan.family, "random_weights": source.random_weights},
            "precision": cfg.precision,
            "plan": {
                **plan.to_json(),
                "sha256": plan.digest(),
                "skipped": len(plan.skip),
                "reused": len(plan.reuse),
            },
            "cost": {
                "total_params": cost.total_params,
                "kept_params": cost.kept_params,
                "sparsity": cost.sparsity,
                "total_bytes": cost.total_bytes,
                "kept_bytes": cost.kept_bytes,
                "executed_slots": cost.executed_slots,
                "num_slots": cost.num_slots,
                "compute_fraction": cost.compute_fraction,
            },
            "onnx": onnx.to_json() | {"export_options": asdict(options)},
            "parity": parity,
            "distance_to_dense": dense,
            "engine": engine,
            "seconds": stages.seconds,
        }
        from .report import write_report

        write_report(stage, report)
    failed = [p for p in parity if p.get("passed") is False]
    if failed:
        raise AccuracyError(
            f"parity failed ({failed[0]['test']} vs {failed[0]['reference']}); see {cfg.out / 'report.md'}"
        )
    return report


def _parity(torch_runner: Any, other: Any, prompts: Any, empty: Any, tolerances: dict[str, Tolerance], precision: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """PyTorch (plan) vs the exported model on the prompts and the empty prompt."""
    from .errors import ArtifactError

    results: list[dict[str, Any]] = []
    outputs: dict[str, Any] = {}
    with torch_runner:
        for batch in (prompts, empty):
            outputs[batch.label] = torch_runner.infer(batch.feed)
    try:
        other.activate()
    except ArtifactError as exc:
        if precision != "bf16":
            raise
        reason = f"{exc} (ONNX Runtime's CPU provider has no bf16 kernels; run on CUDA or build an engine)"
        return [{"reference": torch_runner.name, "test": other.name, "passed": None, "reason": reason}], outputs
    try:
        for batch in (prompts, empty):
            result: Comparison = compare(
                (torch_runner.name, outputs[batch.label]), (other.name, other.infer(batch.feed)), batch.mask, tolerances
            )
            log.info("%s", result)
            results.append(result.to_json() | {"batch": f"{batch.label}, {batch.source}"})
    finally:
        other.deactivate()
    return results, outputs


def _distance_to_dense(source: Any, plan: Plan, precision: str, prompts: Any, empty: Any, plan_outputs: dict[str, Any]) -> dict[str, Any]:
    """The plan's cost in quality: its outputs against the dense model's, on the prompts and the empty prompt."""
    from .apply import apply_plan
    from .model import load_encoder
    from .runners import TorchRunner

    dense_plan = Plan.dense(plan.family, plan.num_blocks)
    dense = apply_plan(load_encoder(source, dense_plan, precision), dense_plan)
    out = {}
    with TorchRunner(dense, dense.output_names) as runner:
        for batch in (prompts, empty):
            out[batch.label] = distance(runner.infer(batch.feed), plan_outputs[batch.label], batch.mask)
    return out


def _engine(cfg: ExportConfig, onnx: Any, stage: Path) -> dict[str, Any]:
    raise UserError(
        f"--engine {cfg.engine} is not available in this version yet (TensorRT engine building is tracked in "
        "issue 3); use --engine onnx and build with trtexec from model.onnx"
    )


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
