"""The main job: load_plan -> the stage chain (stages.py: load_source -> apply -> export -> build) -> compare -> report.

This module only orchestrates; each stage lives in its own module.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .environment import cuda_available, versions
from .checks import ParityCheck, parity_checks
from .config import ENGINES, EngineOptions, ExportConfig, ExportForm, MeasureConfig, ShapeRange
from .compare import Tolerance, distance, runner_parity, tolerance_for
from .errors import AccuracyError, UserError
from .inputs import find_tokenizer, tokenizer_used
from .model import RANDOM_WEIGHTS_SEED
from .ort_fusion import check_optimize
from .plan import Plan, load_plan
from .progress import each, finished, peak_memory, stage_bar
from .provenance import manifest_record, report_record
from .recipes import pipeline_report
from .report import write_report
from .stages import build, check_footprint, export, export_options, host_footprint, load_applied, release_memory

log = logging.getLogger("skrr_export")


@dataclass
class Stages:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Logs the start and the duration; meanwhile a progress bar (``progress.stage_bar``: elapsed time, and a
        count with an estimate where the stage's work goes through ``progress.each``)."""
        log.info("%s ...", name)
        start = time.perf_counter()
        with stage_bar(name):
            yield
        self.seconds[name] = time.perf_counter() - start
        log.info("%s done in %.1f s", name, self.seconds[name])


def run_export(cfg: ExportConfig) -> dict[str, Any]:
    """Run the whole job into ``cfg.out``; returns the report. Raises AccuracyError after writing a failing report.

    Memory: the PyTorch module (the kept weights) is dropped after the export, before ONNX Runtime loads the
    graph; the dense model for the distance is streamed one sub-block at a time."""
    start = time.perf_counter()
    try:
        report = _run_export(cfg)
    except AccuracyError:  # a whole run whose parity failed: its time and memory are worth knowing too
        finished("finished (parity failed)", time.perf_counter() - start)
        raise
    finished("finished", time.perf_counter() - start)
    return report


def _run_export(cfg: ExportConfig) -> dict[str, Any]:
    from .artifacts import check_disk, disk_need, staged_folder, write_manifest

    job = _preflight(cfg)
    stages = Stages()
    ref = _pytorch_reference(cfg, job, stages)
    check_disk(cfg.out.parent, disk_need(job.cost.kept_weight_bytes, cfg.engine != "onnx"), "the export")
    with staged_folder(cfg.out, cfg.force) as stage:
        found = _artifacts(cfg, job, ref, stage, stages)
        report = _report(cfg, job, ref, found, stages)
        write_report(stage, report)
        write_manifest(stage, manifest_record(cfg, job.source, job.plan, report))
    failed = [p for p in found.parity if p.get("passed") is False]
    if failed:
        raise AccuracyError(
            f"parity failed ({failed[0]['test']} vs {failed[0]['reference']}); see {cfg.out / 'report.md'}"
        )
    return report


@dataclass
class _Job:
    """The checked request: the plan, where the model comes from and what the plan keeps."""

    plan: Plan
    source: Any
    cost: Any
    tolerances: dict[str, Tolerance]  # the engine's parity: its precision check


@dataclass
class _Reference:
    """The applied (and quantized) module and PyTorch's outputs on the parity batches; the module is dropped after
    the export (``drop``)."""

    applied: Any  # stages.Applied
    quantization: dict[str, Any] | None  # what was quantized, with bytes (kept for the report after ``drop``)
    batches: tuple[Any, ...]
    plan_outputs: dict[str, Any]  # PyTorch in the export's precision
    fp32_outputs: dict[str, Any] | None  # PyTorch computing in fp32 on the same weights (a half export's wiring check)
    checks: tuple[ParityCheck, ...]

    def outputs_for(self, check: ParityCheck) -> dict[str, Any]:
        return self.fp32_outputs if check.fp32_reference and self.fp32_outputs is not None else self.plan_outputs

    def drop(self) -> None:
        self.applied = None  # ONNX Runtime, the engine and the dense model need the memory
        release_memory()  # the freed integers of a quantized module stay in glibc's heap otherwise (XXL int4: 1.4 GiB)


@dataclass
class _Found:
    """What the stages after the export found: the ONNX (and its fusion), parity, and the optional stages."""

    onnx: Any
    fusion: Any = None
    parity: list[dict[str, Any]] = field(default_factory=list)
    polygraphy: dict[str, Any] | None = None
    engine: Any = None
    dense: dict[str, Any] | None = None
    measured: dict[str, Any] | None = None
    options: Any = None  # the ExportOptions it was written with


def _preflight(cfg: ExportConfig) -> _Job:
    """Everything that can be refused before any work: flags, plan, model, resources, output folder, backends."""
    from .artifacts import check_writable
    from .model import source_of

    if cfg.engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got '{cfg.engine}'")
    check_optimize(cfg.optimize, cfg.engine)
    plan = load_plan(cfg.plan)
    source = source_of(cfg)
    find_tokenizer(source)  # a folder without one is refused before any work
    tolerances = {"*": _tolerance(cfg, f"precision-{cfg.precision}")}
    for check in parity_checks(cfg.precision, cuda=False):
        _tolerance(cfg, check.tolerance_key)  # a recipe that loosens a default is refused before any work
    cost = _check_resources(source, plan, cfg)
    check_writable(cfg.out, cfg.force)
    backend = None
    if cfg.engine != "onnx":
        from .trt import check_options, load_backend

        backend = load_backend(cfg.engine)  # fail before any work when the backend is missing
        check_options(backend, cfg.engine_options or EngineOptions())
    if cfg.quantization is not None:
        from .quantize import check_backends

        check_backends(cfg.quantization, backend)
    return _Job(plan, source, cost, tolerances)


def _pytorch_reference(cfg: ExportConfig, job: _Job, stages: Stages) -> _Reference:
    """Load the kept weights, apply the plan (quantize) through the stage chain, and run PyTorch on the parity
    batches."""
    from .inputs import load_tokenizer, prompt_batch

    applied = load_applied(job.source, job.plan, cfg, stages.stage)
    module = applied.module
    tokenizer = load_tokenizer(job.source)
    batches = prompt_batch(tokenizer, applied.enc.config, cfg.input_dtype, cfg.fixed_sequence,
                           attention_mask=cfg.attention_mask)
    checks = machine_checks(cfg.precision)
    with stages.stage("pytorch reference"):
        plan_outputs = reference_outputs(module, batches)
        _check_finite(module, batches, plan_outputs)
        fp32 = reference_outputs(module, batches, fp32_arithmetic=True) if any(c.fp32_reference for c in checks) else None
    return _Reference(applied, applied.quantization, batches, plan_outputs, fp32, checks)


def _artifacts(cfg: ExportConfig, job: _Job, ref: _Reference, stage: Path, stages: Stages) -> _Found:
    """Export (and fuse), then parity on the file, Polygraphy's data, the engine, the distance and the measurement."""
    from .ort_fusion import fuse_artifact
    from .polygraphy_io import save_parity_data

    with stages.stage("export"):
        options = export_options(cfg, mapped=cfg.engine != "onnx")  # the engine build maps the weights file
        onnx = export(ref.applied, stage / "model.onnx", options)
        found = _Found(*fuse_artifact(onnx, ref.applied.enc.adapter)) if cfg.optimize else _Found(onnx)
        found.options = options
    ref.drop()
    with stages.stage("parity"):
        found.parity = run_checks(cfg, ref, found.onnx.path)
    found.polygraphy = save_parity_data(stage, ref.batches, ref.plan_outputs, cfg.precision)
    if cfg.engine != "onnx":
        with stages.stage("engine"):
            found.engine, engine_parity = _engine(cfg, found.onnx.path, job.plan, stage, ref.plan_outputs, ref.batches,
                                                  job.tolerances)
        found.parity += engine_parity
    if cfg.dense_distance:
        with stages.stage("dense distance"):
            found.dense = _distance_to_dense(job.source, cfg.precision, ref.batches, ref.plan_outputs)
    if cfg.measure and cuda_available():
        with stages.stage("measure"):
            found.measured = _measure(cfg, job.source, job.plan, stage, found.onnx.path, found.engine)
    return found


# Checked while loading (model.check_precision_policy): a violation stops the job before anything is written.
POLICY_CHECK = {"check": "policy", "method": "every loaded and exported weight has the dtype transformers gives it when "
                "loading in this precision (its keep-in-fp32 lists)"}


def run_checks(cfg: ExportConfig, ref: _Reference, onnx_path: Path) -> list[dict[str, Any]]:
    """Every parity check of ``ref.checks`` on the graph at ``onnx_path``: one result per check and batch."""
    results: list[dict[str, Any]] = []
    for check in each(ref.checks, "checks"):
        parity = runner_parity(ref.outputs_for(check), check.runner(onnx_path), ref.batches,
                               {"*": _tolerance(cfg, check.tolerance_key)}, check.reference, check.kind)
        results += [p | check.describe() for p in parity]
    return results


def _report(cfg: ExportConfig, job: _Job, ref: _Reference, found: _Found, stages: Stages) -> dict[str, Any]:

    plan, source, cost = job.plan, job.source, job.cost
    onnx = found.onnx.to_json() | {"export_options": asdict(found.options)}
    return {
        "tool": {"name": "skrr-export", **versions()},
        "model": {"path": str(source.folder), "family": plan.family, "random_weights": source.random_weights,
                  "random_weights_seed": RANDOM_WEIGHTS_SEED if source.random_weights else None,
                  "tokenizer": tokenizer_used(source)},
        "precision": cfg.precision,
        "pipeline": pipeline_report(cfg.recipe, cfg.attention_mask),
        "plan": {**plan.to_json(), "sha256": plan.digest(), "skipped": len(plan.skip), "reused": len(plan.reuse)},
        "cost": asdict(cost) | {"sparsity": cost.sparsity},
        "onnx": onnx | ({"ort_fusion": found.fusion.to_json()} if found.fusion else {}),
        "quantization": ref.quantization,
        "checks": [c.describe() | {"tolerance": asdict(_tolerance(cfg, c.tolerance_key))} for c in ref.checks]
        + [POLICY_CHECK | {"precision": cfg.precision, "passed": True}],
        "parity": found.parity,
        "polygraphy": found.polygraphy,
        "distance_to_dense": found.dense,
        "engine": found.engine.metadata if found.engine else None,
        "measure": found.measured,
        "seconds": stages.seconds,
        "peak_memory_bytes": peak_memory(),  # resident, this process, up to the report (progress.peak_memory)
        "provenance": report_record(cfg, source),
    }


def _check_resources(source: Any, plan: Plan, cfg: ExportConfig) -> Any:
    """Refuse before loading when the run cannot fit in host memory (the stage chain's footprint rule:
    stages.host_footprint, check_footprint); the checkpoint and the shapes are checked first."""
    from .apply import plan_cost
    from .workload import check_shapes
    from .model import DTYPES, build_meta, check_plan_fits, load_config

    meta = build_meta(load_config(source))
    if cfg.recipe is not None:  # first: its message names the checkpoint the recipe was made for
        cfg.recipe.check_config(meta.config)
    check_plan_fits(plan, meta)
    if cfg.fixed_sequence is not None:
        check_shapes(meta.config, (1,), (cfg.fixed_sequence,))
    meta.dtype = DTYPES[cfg.precision]
    cost = plan_cost(meta, plan)
    check_footprint(host_footprint(meta, plan, cost, cfg, cfg.dense_distance, cfg.engine, cfg.engine_options),
                    cfg.skip_memory_check)
    return cost


def _check_finite(module: Any, batches: tuple[Any, ...], outputs: dict[str, Any]) -> None:
    """NaN/Inf in PyTorch's outputs: name the first slot of the plan that produces them."""
    import numpy as np

    from .apply import first_nonfinite

    for batch in batches:
        bad = [name for name, value in outputs[batch.label].items() if not np.isfinite(value).all()]
        if bad:
            where = first_nonfinite(module, *module.args_of(batch.feed)) or "no single slot (only in the full run)"
            raise AccuracyError(f"PyTorch output {bad[0]} holds NaN/Inf on the {batch.label}; first produced by {where}")


def reference_outputs(module: Any, batches: tuple[Any, ...], fp32_arithmetic: bool = False) -> dict[str, Any]:
    from contextlib import nullcontext

    from .apply import computed_in_fp32
    from .runners import TorchRunner

    with computed_in_fp32(module) if fp32_arithmetic else nullcontext(), TorchRunner(module, module.output_names) as runner:
        return {batch.label: runner.infer(batch.feed) for batch in each(batches, "batches")}


def not_executed(test: str, reason: str) -> dict[str, Any]:
    log.warning("%s: %s", test, reason)
    return {"reference": "pytorch", "test": test, "passed": None, "reason": reason}


def _tolerance(cfg: ExportConfig, check: str) -> Tolerance:
    return tolerance_for(check, cfg.recipe.tolerances if cfg.recipe else None, cfg.tolerance_overrides)


def machine_checks(precision: str) -> tuple[ParityCheck, ...]:
    """The parity checks this machine runs on an export in ``precision`` (checks.py): the precision check on ONNX
    Runtime's CUDA provider (TF32 off) where it can run, emulated on the CPU otherwise."""
    from .backends import backend_blockers

    return parity_checks(precision, cuda=cuda_available() and backend_blockers()["ort-cuda"] is None)


def _measure(cfg: ExportConfig, source: Any, plan: Plan, stage: Path, onnx_path: Path, engine: Any) -> dict[str, Any]:
    """The measure command's numbers at batch 1 and one sequence length: the artifacts this job wrote (its ONNX in
    ONNX Runtime CUDA, its engine), and PyTorch for both the plan and the dense model."""
    import shutil

    from .backends import backend_blockers
    from .measure import MeasuredArtifacts, run_measurements
    from .measure_report import plot_memory
    from .model import build_meta, load_config
    from .workload import check_shapes, default_sequence

    blockers = backend_blockers()
    backends = tuple(b for b in ("torch", "ort-cuda", cfg.engine) if b in blockers and blockers[b] is None)
    meta = build_meta(load_config(source))
    seq = cfg.fixed_sequence or default_sequence(meta.config, 128)
    form = {f.name: getattr(cfg, f.name) for f in fields(ExportForm)}  # the job's: a quantized plan runs quantized
    settings = MeasureConfig(plan=cfg.plan, out=cfg.out, batches=(1,), sequences=(seq,), warmup=3, iterations=10, **form)
    work = stage / "measure-work"
    artifacts = MeasuredArtifacts(onnx_path, {cfg.engine: engine} if engine else {})
    results = run_measurements(meta, source, plan, backends, check_shapes(meta.config, (1,), (seq,)), settings, work,
                               artifacts)
    shutil.rmtree(work, ignore_errors=True)
    plot_memory(results, stage / "memory.png")
    return results


def _distance_to_dense(source: Any, precision: str, batches: tuple[Any, ...], plan_outputs: dict[str, Any]) -> dict[str, Any]:
    """The plan's cost in quality: its outputs against the dense model's (streamed one sub-block at a time), on
    the prompts and the empty prompt."""
    import torch

    from .apply import dense_outputs_streamed
    from .runners import to_numpy

    feeds = [tuple(torch.from_numpy(v) for v in b.feed.values()) for b in batches]  # complete, in the inputs' order
    names = list(plan_outputs[batches[0].label])
    dense = dense_outputs_streamed(source, precision, feeds, batches[0].mask is not None)
    return {
        batch.label: distance({n: to_numpy(t) for n, t in zip(names, outputs)}, plan_outputs[batch.label], batch.mask)
        for batch, outputs in zip(batches, dense)
    }


def _engine(cfg: ExportConfig, onnx_path: Path, plan: Plan, stage: Path, reference: dict[str, Any], batches: tuple[Any, ...],
            tolerances: dict[str, Tolerance]) -> tuple[Any, list[dict[str, Any]]]:
    """Build the engine; run it against PyTorch where a CUDA runtime can, else say why it was not run."""
    from .trt import TrtRunner, execution_blocker

    options = cfg.engine_options or EngineOptions()
    if cfg.fixed_sequence:
        options = replace(options, sequence=ShapeRange(cfg.fixed_sequence, cfg.fixed_sequence, cfg.fixed_sequence))
    artifact = build(onnx_path, cfg.engine, options, stage / "engine.plan", {"plan_sha256": plan.digest()})
    blocker = execution_blocker(cfg.engine)
    if blocker:
        return artifact, [not_executed(cfg.engine, blocker)]
    runner = TrtRunner(artifact.path, cfg.engine, cfg.weight_streaming_budget)
    return artifact, runner_parity(reference, runner, batches, tolerances)
