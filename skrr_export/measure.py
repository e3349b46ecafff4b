"""measure: device memory and latency of the dense model and the plan, per backend, on CUDA; parity there too.

One memory method for every backend (``device_memory.DeviceMemory``, stated in the results as ``memory``): the
process's device memory (NVML, else the driver's total - free) above a clean baseline taken after the CUDA context
and the matrix libraries' one-time allocations; resident = after the model is on the device (PyTorch) or the session
or engine is created; peak = after one more forward at each shape (PyTorch's cache emptied before it; shapes run
smallest first, so a runtime arena's high-water mark after a shape is that shape's need). PyTorch's allocator figure
is a second column for the PyTorch backends. Latency: warm-up runs, then every timed run starts and ends on a
synchronized device (``Bound.run``); median and p90. TF32 is off while measuring and restored afterwards.

Backends come from ``backends.MEASURE_BACKENDS`` (runner factories; nothing here chooses by a backend's name). Feeds
come from the artifact measured: the dtypes and fixed sizes of the ONNX's inputs (``workload.InputForm``; the main
job's file, or measure's own export, checked once written) and of an engine's profile (its engine.json). A shape an
artifact cannot take is skipped with the reason before any work; a backend that fails records one reason and keeps
what it measured before the failure. Rendering: ``measure_report``; the issues' targets: benchmarks/targets.py.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import backends as registry
from .backends import ENGINE, MEASURE_BACKENDS, MODULE, Backend, backend_blockers, require_cuda, resolve_backends
from .config import MeasureConfig
from .device_memory import DeviceMemory
from .errors import InvariantError, UserError
from .units import size
from .measure_report import row_at, write_results
from .stages import build, export, export_options, load_applied
from .ort_profile import hot_path, placement, read_profile
from .workload import (InputForm, Shape, check_shapes, engine_input_form, executed_flops, onnx_input_form, planned_form,
                       shapes_taken)

log = logging.getLogger("skrr_export")

# What a backend's failure can raise: our errors (a runtime refusing the model, a broken invariant of a fused copy) and
# the runtimes' own RuntimeErrors (CUDA out of memory, a compile failure). It ends that backend, not the measurement.
BACKEND_FAILURES = (UserError, InvariantError, RuntimeError)


def timing_feed(config: Any, shape: Shape, seed: int = 0, form: InputForm | None = None) -> dict[str, np.ndarray]:
    """Full-length rows of random ids (no padding), and every other input the family declares: every token costs
    what a real prompt's does. ``form``: as the artifact takes them (its inputs, their dtypes); None: int64."""
    from .adapters import adapter_for
    from .inputs import random_ids

    ids = random_ids(config, (shape.batch, shape.seq), np.random.default_rng(seed)).astype(np.int64)
    feed = adapter_for(config).complete_feed({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return form.fit(feed) if form is not None else feed


def latency(run: Callable[[], None], warmup: int, iterations: int) -> dict[str, float]:
    """Milliseconds per call of ``run`` (which returns only when the device is done): median, p90, min, max."""
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1e3)
    ms = np.asarray(samples)
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "min_ms": float(ms.min()),
            "max_ms": float(ms.max()), "iterations": iterations, "warmup": warmup}


@contextmanager
def kept_on_failure(run: dict[str, Any]) -> Iterator[None]:
    """A backend's failure ends it with one reason, ``run["error"]``; what ``run`` holds by then is kept."""
    try:
        yield
    except BACKEND_FAILURES as exc:
        lines = str(exc).strip().splitlines()
        run["error"] = f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"


@contextmanager
def exact_matmuls() -> Iterator[None]:
    """TF32 off for PyTorch while measuring (parity and timings in the precision asked for); restored afterwards."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class Meter:
    """One backend's memory readings, all by ``probe``'s one method above the baseline taken at creation; PyTorch's
    allocator beside them where ``allocator`` (a PyTorch backend)."""

    def __init__(self, probe: DeviceMemory, allocator: bool):
        self.probe, self.allocator = probe, allocator
        self.base = probe.settle()
        self.base_allocated = probe.allocated() if allocator else 0

    def resident(self, run: dict[str, Any]) -> int:
        """Record the resident bytes (after the model, session or engine is on the device); returns them."""
        run["resident_bytes"] = self.probe.used() - self.base
        run["allocator_resident_bytes"] = self.probe.allocated() - self.base_allocated if self.allocator else None
        return run["resident_bytes"]

    def peak(self, bound: Any) -> dict[str, Any]:
        """One more forward from a settled device: the process's bytes after it, and the allocator's high-water mark."""
        self.probe.settle()
        if self.allocator:
            self.probe.reset_allocator_peak()
        bound.run()
        return {"peak_bytes": self.probe.used() - self.base,
                "allocator_peak_bytes": self.probe.allocator_peak() - self.base_allocated if self.allocator else None}


def _shape_rows(runner: Any, shapes: list[Shape], feeds: dict[Shape, Any], cfg: MeasureConfig, meter: Meter,
                resident: int, first_run: Callable[[Any], None] | None = None,
                rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Per shape: latency after warm-up, then the memory peak of one more run. Each shape's row is appended to
    ``rows`` as soon as it is measured, so that a later failure keeps it."""
    rows = [] if rows is None else rows
    for shape in shapes:
        bound = runner.bind(feeds[shape])
        if first_run is not None:
            first_run(bound)
            first_run = None
        timing = latency(bound.run, cfg.warmup, cfg.iterations)
        memory = meter.peak(bound)
        rows.append({"batch": shape.batch, "seq": shape.seq, **memory,
                     "activation_bytes": memory["peak_bytes"] - resident, **timing})
        log.info("%s %s: %.2f ms median, %.2f ms p90, peak %s", runner.name, shape, timing["median_ms"],
                 timing["p90_ms"], size(memory["peak_bytes"]))
        del bound
    return rows


def measure_torch(module: Any, modes: list[Backend], shapes: list[Shape], feeds: dict[Shape, Any], cfg: MeasureConfig,
                  probe: DeviceMemory, parity: tuple[Any, Any] | None = None, hf_model: Any = None) -> tuple[dict[str, Any], Any]:
    """Moves ``module`` to the device and measures each of ``modes`` (backends that run the module: eager, compiled,
    the Hugging Face model ``hf_model``, which holds the same weights, run by its own forward). ``parity`` =
    (batches, tolerances): the eager outputs become the reference every other backend is checked against (returned);
    every mode but the reference's own computation is checked too."""
    meter = Meter(probe, allocator=True)
    module.to(registry.DEVICE)
    resident: dict[str, Any] = {}
    meter.resident(resident)
    reference = _reference(module, *parity) if parity else None
    out: dict[str, dict[str, Any]] = {}
    for mode in modes:
        start = time.perf_counter()
        run: dict[str, Any] = resident | {"shapes": [], "parity": []}
        out[mode.name] = run
        with kept_on_failure(run), mode.runner((module, hf_model), compile_dynamic=cfg.compile_dynamic) as runner:
            _shape_rows(runner, shapes, feeds, cfg, meter, resident["resident_bytes"], rows=run["shapes"])
            run["parity"] = reference(runner) if reference and mode.checked else []
        run["seconds"] = round(time.perf_counter() - start, 1)
        _forget_compiled()
    return out, reference


def _forget_compiled() -> None:
    """torch.compile's caches hold the compiled graphs and through them the module's weights: dropped after a mode."""
    import torch

    torch._dynamo.reset()


def measure_ort(onnx_path: Path, shapes: list[Shape], feeds: dict[Shape, Any], cfg: MeasureConfig, probe: DeviceMemory,
                work: Path, reference: Any = None, backend: Backend = MEASURE_BACKENDS["ort-cuda"],
                run: dict[str, Any] | None = None) -> dict[str, Any]:
    """An ONNX Runtime backend (its provider and settings from ``backend``) with IO binding; node placement profiled.
    Fills ``run`` (returned) as it goes: a failure leaves in it what was measured before."""
    run = {} if run is None else run
    run |= {"shapes": [], "placement": {}, "parity": [], "settings": registry.ort_settings(backend)}
    meter = Meter(probe, allocator=False)
    runner = backend.runner(onnx_path, profile=work / "ort-profile")

    def profile_first(bound: Any) -> None:
        bound.run()
        events = read_profile(runner.end_profiling())
        run["placement"].update(placement(events) | {"hot_path": hot_path(events)} if events else {})

    with runner:
        resident = meter.resident(run)
        _shape_rows(runner, shapes, feeds, cfg, meter, resident, profile_first, run["shapes"])
        run["parity"] = reference(runner) if reference else []
    return run


def build_for(engine: str, onnx_path: Path, shapes: list[Shape], work: Path) -> Any:
    """An engine (trt.EngineArtifact) whose one profile spans ``shapes`` (the timed ones and the parity batches')."""
    from .config import EngineOptions, ShapeRange

    b, s = [sh.batch for sh in shapes], [sh.seq for sh in shapes]
    options = EngineOptions(batch=ShapeRange(min(b), max(b), max(b)), sequence=ShapeRange(min(s), max(s), max(s)))
    return build(onnx_path, engine, options, work / f"{engine}.plan", {})


def measure_trt(artifact: Any, backend: Backend, shapes: list[Shape], feeds: dict[Shape, Any], cfg: MeasureConfig,
                probe: DeviceMemory, reference: Any = None, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measure ``artifact`` (a trt.EngineArtifact) like ONNX Runtime, filling ``run`` (returned) as it goes."""
    run = {} if run is None else run
    run |= {"engine_weights": artifact.metadata["weights"], "shapes": [], "parity": []}
    meter = Meter(probe, allocator=False)
    with backend.runner(artifact) as runner:
        resident = meter.resident(run)
        _shape_rows(runner, shapes, feeds, cfg, meter, resident, rows=run["shapes"])
        run["parity"] = reference(runner) if reference else []
    return run


def measure(cfg: MeasureConfig) -> dict[str, Any]:
    """Measure into ``cfg.out`` (results.json, results.md, memory.png); returns the results."""
    from .artifacts import check_writable, staged_folder
    from .model import build_meta, check_plan_fits, load_config, source_of
    from .plan import load_plan

    require_cuda()
    names = resolve_backends(cfg.backends, backend_blockers())
    plan = load_plan(cfg.plan)
    source = source_of(cfg)
    meta = build_meta(load_config(source))
    check_plan_fits(plan, meta)
    shapes = check_shapes(meta.config, cfg.batches, cfg.sequences)
    check_writable(cfg.out, cfg.force)  # after the inputs: a bad plan is named before an existing folder
    with staged_folder(cfg.out, cfg.force) as stage:
        results = run_measurements(meta, source, plan, names, shapes, cfg, stage / "work")
        shutil.rmtree(stage / "work", ignore_errors=True)
        write_results(stage, results)
    return results


@dataclass(frozen=True)
class MeasuredArtifacts:
    """The main job's exported ONNX and the engines it built (backend -> trt.EngineArtifact)."""

    onnx: Path
    engines: dict[str, Any]


@dataclass
class _Job:
    """What the measurements of both variants share; ``results`` fills up as they run."""

    source: Any
    backends: tuple[Backend, ...]
    shapes: list[Shape]
    cfg: MeasureConfig
    probe: DeviceMemory
    form: InputForm  # what the ONNX measured takes (the main job's, read from it; measure's own, checked once written)
    feeds: dict[Shape, Any]  # the timing feeds, as ``form`` takes them
    batches: Any  # the parity batches (seeded random ids with padding, and the empty prompt), as ``form`` takes them
    tolerances: dict[str, Any]
    vocab: int
    ort_model_type: str  # the family's model type for ONNX Runtime's transformer optimizer (ort-cuda-fused)
    results: dict[str, Any]
    artifacts: Any = None  # the main job's: its ONNX and engine are measured as the plan; the dense side in PyTorch only

    def record(self, variant: str, backend: str, unique: int, result: dict[str, Any]) -> None:
        """A backend's run; one that failed (``result["error"]``) as an error, with its run when it measured any."""
        if error := result.pop("error", None):
            log.warning("%s (%s): stopped after %d shapes: %s", backend, variant, len(result.get("shapes", [])), error)
            self.results["errors"].append({"variant": variant, "backend": backend, "error": error,
                                           "shapes_kept": len(result.get("shapes", []))})
        if "resident_bytes" not in result:  # it failed before it could hold the model
            return
        self.results["parity"] += [p | {"backend": backend, "variant": variant} for p in result.pop("parity", [])]
        self.results["runs"].append({"variant": variant, "backend": backend, "unique_weight_bytes": unique, **result})

    def taken(self, variant: str, backend: str, form: InputForm, shapes: list[Shape]) -> list[Shape]:
        """The shapes ``form`` takes; each other one is recorded as skipped, with the reason."""
        taken, refused = shapes_taken(form, shapes)
        self.results["skipped"] += [{"variant": variant, "backend": backend, "shape": str(shape), "reason": reason}
                                    for shape, reason in refused.items()]
        return taken

    def inputs_for(self, variant: str, backend: str, form: InputForm, reference: Any) -> tuple[list[Shape], dict[Shape, Any], Any]:
        """What a backend running an artifact of ``form`` is fed, decided before it loads anything: the shapes it
        takes (the others skipped, with the reason), their feeds in its dtypes, and ``reference``'s parity check on
        the batches it takes (None without a reference)."""
        from .inputs import Batch

        shapes = self.taken(variant, backend, form, self.shapes)
        feeds = {shape: form.fit(self.feeds[shape]) for shape in shapes}
        batches = [Batch(form.fit(b.feed), b.label, b.source) for b in self.batches
                   if self.taken(variant, f"{backend} parity ({b.label})", form, [batch_shape(b)])]
        return shapes, feeds, (lambda runner: reference(runner, batches)) if reference else None

    @contextmanager
    def stage(self, variant: str, name: str) -> Iterator[None]:
        """Time one stage of a variant (loading, export, fusion): the record of what a device run spends."""
        start = time.perf_counter()
        yield
        self.results["stages"].append({"variant": variant, "stage": name, "seconds": round(time.perf_counter() - start, 1)})


def measure_plans(meta: Any, source: Any, plans: dict[str, Any], backends: tuple[str, ...], shapes: list[Shape],
                  cfg: MeasureConfig, work: Path, dense: list[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """``run_measurements`` for several plans of one model: the dense model is measured once, with the first plan
    (or given: ``dense``, the dense runs of an earlier call), and its runs are reused for every other plan (same
    model, backends, shapes and settings)."""
    out: dict[str, dict[str, Any]] = {}
    for label, plan in plans.items():
        out[label] = run_measurements(meta, source, plan, backends, shapes, cfg, work / label, dense=dense)
        dense = [run for run in out[label]["runs"] if run["variant"] == "dense"]
    return out


def run_measurements(meta: Any, source: Any, plan: Any, backends: tuple[str, ...], shapes: list[Shape],
                     cfg: MeasureConfig, work: Path, artifacts: Any = None, dense: list[dict[str, Any]] | None = None
                     ) -> dict[str, Any]:
    """Dense model and plan, each backend, each shape; parity of every backend against PyTorch for the plan.
    ``meta``: the model's structure (build_meta of ``source``'s config), which the caller has already built.
    ``artifacts``: what the main job wrote (``MeasuredArtifacts``), measured instead of exporting and building again.
    ``dense``: the dense runs of an earlier call on the same model and shapes, reused instead of measured again."""
    from .model import DTYPES
    from .plan import Plan

    variants = {"dense": Plan.dense(plan.family, plan.num_blocks), "plan": plan}
    job = _new_job(meta, source, plan, backends, shapes, cfg, artifacts)
    results = job.results
    results["flops"] = _flops(meta, variants, job.shapes)
    with exact_matmuls():
        job.probe.warm(DTYPES[cfg.precision])
        for variant, variant_plan in variants.items():
            if variant not in cfg.variants:
                continue
            if variant == "dense" and dense is not None:
                results["runs"] += [copy.deepcopy(run) | {"reused": True} for run in dense]
                continue
            _measure_variant(job, variant, variant_plan, work / variant)
    for run in results["runs"]:
        run["resident_over_unique"] = run["resident_bytes"] / run["unique_weight_bytes"]
    results["memory"] = job.probe.describe()
    results["summary"] = summarize(results)
    return results


def _new_job(meta: Any, source: Any, plan: Any, backends: tuple[str, ...], shapes: list[Shape], cfg: MeasureConfig,
             artifacts: Any) -> _Job:
    """What both variants share: the form of the ONNX measured, the shapes it takes (the others skipped, with the
    reason; none: a UserError before any work), and its feeds."""
    from .compare import DEFAULT_TOLERANCES

    names = tuple(i.name for i in meta.adapter.inputs if cfg.attention_mask or i.name != "attention_mask")
    form = onnx_input_form(artifacts.onnx) if artifacts else planned_form(names, cfg.input_dtype, cfg.fixed_sequence)
    taken, refused = shapes_taken(form, shapes)
    if not taken:
        raise UserError(f"nothing to measure: {next(iter(refused.values()))}; pass shapes it takes (--seq, --batch)")
    config = meta.adapter.text_config(meta.config)
    results = _results_head(meta, source, plan, cfg, backends, form)
    results["skipped"] += [{"variant": "both", "backend": "every", "shape": str(s), "reason": r} for s, r in refused.items()]
    return _Job(source, tuple(MEASURE_BACKENDS[b] for b in backends), taken, cfg, DeviceMemory(), form,
                {shape: timing_feed(config, shape, form=form) for shape in taken}, parity_batches(meta.config, form),
                {"*": DEFAULT_TOLERANCES[f"precision-{cfg.precision}"]}, meta.adapter.sizes(meta.config).vocab,
                meta.adapter.ort_model_type, results, artifacts)


def parity_batches(config: Any, form: InputForm) -> tuple[Any, ...]:
    """The parity batches (seeded random ids with padding; the empty prompt) as ``form`` takes them: padded to its
    fixed sequence, in its dtypes."""
    from .inputs import Batch, prompt_batch

    return tuple(Batch(form.fit(b.feed), b.label, b.source) for b in prompt_batch(None, config, "int64", form.fixed_sequence))


def batch_shape(batch: Any) -> Shape:
    return Shape(*batch.feed["input_ids"].shape)


def _results_head(meta: Any, source: Any, plan: Any, cfg: MeasureConfig, backends: tuple[str, ...],
                  form: InputForm) -> dict[str, Any]:
    """What was measured, on what and how; the runs, errors and parity checks fill in as they come."""
    from .apply import plan_cost

    return {
        "tool": _environment(),
        "model": {"path": str(source.folder), "family": plan.family, "random_weights": source.random_weights},
        "plan": {"sha256": plan.digest(), "sparsity": plan_cost(meta, plan).sparsity, "skipped": len(plan.skip),
                 "reused": len(plan.reuse)},
        "precision": cfg.precision,
        "quantization": asdict(cfg.quantization) if cfg.quantization else None,  # the plan's (the dense model: none)
        "inputs": {"source": form.source, "dtypes": dict(form.dtypes), "batch": list(form.batch),
                   "sequence": list(form.sequence)},
        "backends": list(backends),
        "flops": [],
        "runs": [], "errors": [], "skipped": [], "parity": [], "stages": [],
    }


def _measure_variant(job: _Job, variant: str, plan: Any, folder: Path) -> None:
    """PyTorch first (it also gives the plan's parity reference), then every backend that runs the ONNX."""
    from .apply import unique_parameter_bytes
    from .artifacts import check_device_memory, need

    form = replace(job.cfg, attention_mask=job.form.takes_mask,  # the inputs the artifact takes, the mask or not
                   quantization=job.cfg.quantization if variant == "plan" else None)  # dense: the baseline
    applied = load_applied(job.source, plan, form, lambda name: job.stage(variant, name))
    module, enc = applied.module, applied.enc
    unique = unique_parameter_bytes(module)  # what PyTorch holds (a quantized plan's dequantized values)
    stored = applied.quantization["total_bytes"] if applied.quantization else unique  # what the ONNX stores
    folder.mkdir(parents=True)
    given = job.artifacts if variant == "plan" else None
    main_jobs_dense = job.artifacts is not None and given is None  # measured in PyTorch only
    exported = [] if main_jobs_dense else [b for b in job.backends if b.runs != MODULE]
    onnx_path = given.onnx if given else (_export(job, variant, applied, form, stored, folder) if exported else None)
    if applied.quantized is not None:
        dequantize_in_place(module, applied.quantized)
    reference = None
    modes = [b for b in job.backends if b.runs == MODULE and (variant == "dense" or not b.dense_only)]
    parity = (job.batches, job.tolerances) if variant in job.cfg.parity else None
    if modes or parity:
        check_device_memory(need(unique, runtime=0), f"the {variant} model's weights ({size(unique)})")
        torch_results, reference = measure_torch(module, modes, job.shapes, job.feeds, job.cfg, job.probe, parity,
                                                 enc.model)
        for name, result in torch_results.items():
            job.record(variant, name, unique, result)
    del module, enc, applied
    _forget_compiled()  # its caches would keep the variant's weights on the device
    job.probe.settle()
    if exported:
        assert onnx_path is not None
        _measure_exported(job, variant, exported, onnx_path, reference, given, folder, stored)
    shutil.rmtree(folder, ignore_errors=True)


def dequantize_in_place(module: Any, quantized: Any) -> None:
    """PyTorch has no int8 / int4 kernels here: its backends run a quantized plan's dequantized values (the numbers
    the ONNX computes with), stored as ordinary weights so that they move to the device with the module. Each weight
    taken out of ``quantized.weights`` is no longer dequantized on call (quantize._dequantize_on_call)."""
    from .quantize import dequantize

    for _, p in module.named_parameters():
        if id(p) in quantized.weights:
            p.data = dequantize(quantized.weights.pop(id(p)), p.dtype)


def _measure_exported(job: _Job, variant: str, backends: list[Backend], onnx_path: Path, reference: Any, given: Any,
                      folder: Path, unique: int) -> None:
    """ONNX Runtime CUDA and the engines on the exported ONNX (or the main job's). A backend that cannot run this
    model, or whose fused copy breaks the weight invariant, records the one reason and keeps what it measured before
    (its resident bytes, the shapes done); the next backend runs."""
    for backend in backends:
        run: dict[str, Any] = {}
        with kept_on_failure(run):
            if backend.runs == ENGINE:
                _measure_engine(job, variant, backend, onnx_path, reference, given, folder, run)
            elif backend.fused:
                _measure_fused(job, variant, backend, onnx_path, reference, folder, run)
            else:
                shapes, feeds, check = job.inputs_for(variant, backend.name, job.form, reference)
                measure_ort(onnx_path, shapes, feeds, job.cfg, job.probe, folder, check, backend, run)
        job.record(variant, backend.name, unique, run)


def _measure_engine(job: _Job, variant: str, backend: Backend, onnx_path: Path, reference: Any, given: Any, folder: Path,
                    run: dict[str, Any]) -> None:
    """The main job's engine (``given``), or one built here spanning the timed shapes and the parity batches; fed as
    its engine.json says (input dtypes, profile)."""
    artifact = given.engines.get(backend.name) if given else None
    if artifact is None:
        with job.stage(variant, f"build {backend.name}"):
            artifact = build_for(backend.name, onnx_path, job.shapes + [batch_shape(b) for b in job.batches], folder)
    form = engine_input_form(artifact.path, artifact.metadata)
    shapes, feeds, check = job.inputs_for(variant, backend.name, form, reference)
    measure_trt(artifact, backend, shapes, feeds, job.cfg, job.probe, check, run)


def _measure_fused(job: _Job, variant: str, backend: Backend, onnx_path: Path, reference: Any, folder: Path,
                   run: dict[str, Any]) -> None:
    """A fused backend: the ``--optimize ort`` variant of ``onnx_path`` (``fused_copy``), measured with the backend's
    settings, fed as its own inputs say, with what was fused; the copy is removed afterwards."""
    from .fused_copy import fused_copy

    with job.stage(variant, "fuse"):
        fused, fusion = fused_copy(onnx_path, job.ort_model_type)
    run["fusion"] = fusion
    try:
        shapes, feeds, check = job.inputs_for(variant, backend.name, onnx_input_form(fused), reference)
        measure_ort(fused, shapes, feeds, job.cfg, job.probe, folder, check, backend, run)
    finally:
        fused.unlink(missing_ok=True)


def _export(job: _Job, variant: str, applied: Any, form: Any, unique: int, folder: Path) -> Path:
    """The variant's ONNX through the stage chain; with its weights in an external data file when ort-cuda-fused is
    asked for, so that the fused copy shares them (at any size: above 2 GB they are external anyway)."""
    from .artifacts import check_disk, disk_need

    check_disk(folder, disk_need(unique, any(b.runs == ENGINE for b in job.backends)), "the measured artifacts")
    with job.stage(variant, "export"):
        path = export(applied, folder / "model.onnx", export_options(form, mapped=any(b.fused for b in job.backends))).path
    if differences := job.form.differences(onnx_input_form(path)):
        raise InvariantError(f"the {variant} export's inputs differ from the form its feeds were made for: "
                             f"{'; '.join(differences)}")
    return path


def _reference(module: Any, batches: Any, tolerances: dict[str, Any]) -> Callable[..., list[dict[str, Any]]]:
    """PyTorch's outputs for the plan on the device; returns the check every other backend's runner goes through
    (on all ``batches``, or on the ones given)."""
    from .compare import runner_parity
    from .runners import TorchRunner

    with TorchRunner(module, module.output_names, registry.DEVICE) as runner:
        outputs = {batch.label: runner.infer(batch.feed) for batch in batches}
    def check(other: Any, some: Any = batches) -> list[dict[str, Any]]:
        return runner_parity(outputs, other, some, tolerances, "pytorch-cuda")

    return check


def _flops(meta: Any, variants: dict[str, Any], shapes: list[Shape]) -> list[dict[str, Any]]:
    rows = []
    for shape in shapes:
        counts = {name: executed_flops(meta, p, shape) for name, p in variants.items()}
        rows.append({"batch": shape.batch, "seq": shape.seq, **counts, "fraction": counts["plan"] / counts["dense"]})
    return rows


def _environment() -> dict[str, Any]:
    """The device, and the versions every report records (report.versions)."""
    import torch

    from .environment import versions

    props = torch.cuda.get_device_properties(0)
    return {"device": torch.cuda.get_device_name(0), "device_memory_bytes": int(props.total_memory),
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))), "cuda": torch.version.cuda,
            **versions()}


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per backend and shape: plan latency over dense latency, next to the plan's executed-FLOP fraction."""
    runs = {(r["variant"], r["backend"]): r for r in results["runs"]}
    rows = []
    for backend in results["backends"]:
        dense, plan = runs.get(("dense", backend)), runs.get(("plan", backend))
        if dense is None or plan is None:
            continue
        for flops in results["flops"]:
            d, p = row_at(dense, flops), row_at(plan, flops)
            if d and p:
                rows.append({"backend": backend, "batch": flops["batch"], "seq": flops["seq"],
                             "dense_ms": d["median_ms"], "plan_ms": p["median_ms"],
                             "latency_ratio": p["median_ms"] / d["median_ms"], "flop_fraction": flops["fraction"],
                             "dense_peak_bytes": d["peak_bytes"], "plan_peak_bytes": p["peak_bytes"]})
    return rows
