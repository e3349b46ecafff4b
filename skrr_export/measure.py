"""measure: device memory and latency of the dense model and the plan, per backend, on CUDA; parity there too.

Memory is read where each runtime allocates it. PyTorch: its allocator's statistics (resident = bytes allocated
by moving the module to the device; peak = the allocator's high-water mark during a forward). ONNX Runtime and
TensorRT allocate outside PyTorch: the device's used memory (total - free) before and after the session or
engine is created, and after runs at each shape (shapes run smallest first, so the arena's high-water mark after
a shape is that shape's need). Latency: warm-up runs, then every timed run starts and ends on a synchronized
device (``Bound.run``); median and p90.

Feeds come from the artifact measured: the dtypes and fixed sizes of the ONNX's inputs (``workload.InputForm``; the
main job's file, or measure's own export, checked once written) and of an engine's profile (its engine.json). A
shape an artifact cannot take is skipped with the reason before any work; a backend that fails records one reason
and keeps what it measured before the failure.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backends import DENSE_ONLY, TORCH_BACKENDS, backend_blockers, require_cuda, resolve_backends
from .errors import InvariantError, UserError
from .workload import (InputForm, Shape, check_shapes, engine_input_form, executed_flops, onnx_input_form, planned_form,
                       shapes_taken)

log = logging.getLogger("skrr_export")

DEVICE = "cuda"
VARIANTS = ("dense", "plan")
# What a backend's failure can raise: our errors (a runtime refusing the model, a broken invariant of a fused copy) and
# the runtimes' own RuntimeErrors (CUDA out of memory, a compile failure). It ends that backend, not the measurement.
BACKEND_FAILURES = (UserError, InvariantError, RuntimeError)


@dataclass(frozen=True)
class MeasureConfig:
    plan: Path
    out: Path
    model: Path | None = None  # None: the embedded MiniLM
    subfolder: str | None = None
    random_weights: bool = False
    allow_pickle: bool = False
    backends: tuple[str, ...] = ()  # empty: every backend that can run here
    batches: tuple[int, ...] = (1, 4)
    sequences: tuple[int, ...] = (256, 512)
    precision: str = "bf16"
    warmup: int = 3
    iterations: int = 20
    force: bool = False
    compile_dynamic: bool | None = None  # torch.compile's ``dynamic``; None: its default (recompile on new shapes)
    variants: tuple[str, ...] = VARIANTS  # which of dense and plan to measure
    parity: tuple[str, ...] = ("plan",)  # the variants whose every backend is checked against PyTorch on the device
    input_dtype: str = "int64"  # the inputs of measure's own exports (a recipe's export settings; export.ExportOptions)
    fixed_sequence: int | None = None  # likewise; the main job's artifacts bring their own (read from the files)
    attention_mask: bool = True  # likewise: False exports input_ids only, as SD3 and FLUX call their T5


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


class DeviceMemory:
    """Used device memory as the driver reports it (total - free), after PyTorch has returned its cached blocks."""

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def settle(self) -> int:
        """Free what can be freed, then return the used bytes: the baseline for a measurement."""
        gc.collect()
        self.torch.cuda.synchronize()
        self.torch.cuda.empty_cache()
        return self.used()

    def used(self) -> int:
        self.torch.cuda.synchronize()
        free, total = self.torch.cuda.mem_get_info()
        return int(total - free)


@contextmanager
def kept_on_failure(run: dict[str, Any]) -> Iterator[None]:
    """A backend's failure ends it with one reason, ``run["error"]``; what ``run`` holds by then is kept."""
    try:
        yield
    except BACKEND_FAILURES as exc:
        lines = str(exc).strip().splitlines()
        run["error"] = f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"


def _shape_rows(runner: Any, shapes: list[Shape], feeds: dict[Shape, Any], cfg: MeasureConfig,
                peak: Callable[[Any], int], resident: int, first_run: Callable[[Any], None] | None = None,
                rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Per shape: latency after warm-up, then the memory peak of one more run (``peak(bound)`` measures it). Each
    shape's row is appended to ``rows`` as soon as it is measured, so that a later failure keeps it."""
    rows = [] if rows is None else rows
    for shape in shapes:
        bound = runner.bind(feeds[shape])
        if first_run is not None:
            first_run(bound)
            first_run = None
        timing = latency(bound.run, cfg.warmup, cfg.iterations)
        peak_bytes = peak(bound)
        rows.append({"batch": shape.batch, "seq": shape.seq, "peak_bytes": peak_bytes,
                     "activation_bytes": peak_bytes - resident, **timing})
        log.info("%s %s: %.2f ms median, %.2f ms p90, peak %.3f GB", runner.name, shape, timing["median_ms"],
                 timing["p90_ms"], peak_bytes / 1e9)
        del bound
    return rows


def measure_torch(module: Any, modes: list[str], shapes: list[Shape], feeds: dict[Shape, Any], cfg: MeasureConfig,
                  probe: DeviceMemory, parity: tuple[Any, Any] | None = None, hf_model: Any = None) -> tuple[dict[str, Any], Any]:
    """Moves ``module`` to the device and measures each of ``modes`` ("torch": eager, "torch-compile", "hf": the
    Hugging Face model ``hf_model``, which holds the same weights, run by its own forward); resident and peak bytes
    from PyTorch's allocator statistics. ``parity`` = (batches, tolerances): the eager outputs become the reference
    every other backend is checked against (returned); torch-compile is too."""
    import torch

    probe.settle()
    base = torch.cuda.memory_allocated()
    module.to(DEVICE)
    resident = torch.cuda.memory_allocated() - base
    reference = _reference(module, *parity) if parity else None

    def peak(bound: Any) -> int:
        torch.cuda.reset_peak_memory_stats()
        bound.run()
        return int(torch.cuda.max_memory_allocated() - base)

    out: dict[str, dict[str, Any]] = {}
    for mode in modes:
        start = time.perf_counter()
        run: dict[str, Any] = {"resident_bytes": resident, "resident_source": "torch.cuda.memory_allocated", "shapes": [],
                               "parity": []}
        out[mode] = run
        with kept_on_failure(run), _torch_runner(mode, module, hf_model, cfg) as runner:
            _shape_rows(runner, shapes, feeds, cfg, peak, resident, rows=run["shapes"])
            run["parity"] = reference(runner) if reference and mode not in ("torch", "hf") else []
        run["seconds"] = round(time.perf_counter() - start, 1)
    return out, reference


def _torch_runner(mode: str, module: Any, hf_model: Any, cfg: MeasureConfig) -> Any:
    """The runner of one PyTorch mode (its wall time, compilation included, is recorded as ``seconds``)."""
    import torch

    from .runners import TorchRunner

    if mode == "hf":
        return TorchRunner(_HfForward(hf_model, module.input_names), ("last_hidden_state",), DEVICE, name=mode)
    if mode == "torch-compile":
        torch._dynamo.reset()  # a fresh cache per model: the recompile limit is not spent on the other variant
        return TorchRunner(torch.compile(module, dynamic=cfg.compile_dynamic), module.output_names, DEVICE, name=mode)
    return TorchRunner(module, module.output_names, DEVICE, name=mode)


class _HfForward:
    """A Hugging Face encoder called as the runners call a module: its inputs positionally -> (hidden,)."""

    def __init__(self, model: Any, input_names: tuple[str, ...]):
        self.model = model
        self.input_names = input_names

    def __call__(self, *inputs: Any) -> tuple[Any]:
        return (self.model(**dict(zip(self.input_names, inputs))).last_hidden_state,)


def measure_ort(onnx_path: Path, shapes: list[Shape], feeds: dict[Shape, Any], cfg: MeasureConfig, probe: DeviceMemory,
                work: Path, reference: Any = None, stock: bool = False, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """ONNX Runtime's CUDA provider with IO binding; device memory from the driver; node placement profiled.
    ``stock``: ONNX Runtime's default provider and session settings (TF32 still off) instead of ours. Fills ``run``
    (returned) as it goes: a failure leaves in it what was measured before."""
    from .runners import CUDA_PROVIDER_OPTIONS, CUDA_SESSION_CONFIG, OrtRunner

    options = {"use_tf32": "0"} if stock else CUDA_PROVIDER_OPTIONS
    session_config: dict[str, str] = {} if stock else CUDA_SESSION_CONFIG
    run = {} if run is None else run
    run |= {"resident_source": "device used memory after session creation", "shapes": [], "placement": {}, "parity": [],
            "settings": {"provider_options": options, "session_config": session_config, "io_binding": True}}
    base = probe.settle()
    runner = OrtRunner(onnx_path, ("CUDAExecutionProvider",), options, session_config, profile_prefix=work / "ort-profile")

    def profile_first(bound: Any) -> None:
        bound.run()
        events = read_profile(runner.end_profiling())
        run["placement"].update(_placement(events) | {"hot_path": hot_path(events)} if events else {})

    with runner:
        run["resident_bytes"] = probe.used() - base
        _shape_rows(runner, shapes, feeds, cfg, _driver_peak(probe, base), run["resident_bytes"], profile_first, run["shapes"])
        run["parity"] = reference(runner) if reference else []
    return run


def read_profile(profile: Path | None) -> list[dict[str, Any]]:
    """The events of an ONNX Runtime profile (none without one); the file is removed once read."""
    if profile is None or not profile.is_file():
        return []
    events = json.loads(profile.read_text())
    profile.unlink()
    return events


def node_placement(profile: Path | None) -> dict[str, Any]:
    """From an ONNX Runtime profile: nodes per execution provider, nodes per op type (fused norms, the casts of
    fp32 islands), the op types left off CUDA, memcpy nodes."""
    events = read_profile(profile)
    return _placement(events) if events else {}


def _kernels(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each node a profile saw run -> its arguments (provider, op_name, output_type_shape, ...); a node runs once
    per profiled run, so several runs count it once."""
    return {e["name"]: e.get("args") or {} for e in events
            if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")}


def _placement(events: list[dict[str, Any]]) -> dict[str, Any]:
    placed = {name: (a.get("provider", "?"), a.get("op_name", "?")) for name, a in _kernels(events).items()}
    providers: dict[str, int] = {}
    ops: dict[str, int] = {}
    off_cuda: dict[str, int] = {}
    for provider, op in placed.values():
        providers[provider] = providers.get(provider, 0) + 1
        ops[op] = ops.get(op, 0) + 1
        if provider != "CUDAExecutionProvider":
            off_cuda[op] = off_cuda.get(op, 0) + 1
    memcpy = sum(op.startswith("Memcpy") for _, op in placed.values())
    return {"nodes_per_provider": providers, "ops": ops, "ops_not_on_cuda": off_cuda, "memcpy_nodes": memcpy}


# A node on the hot path computes on the batch's data every forward: its outputs hold more elements than a shape
# vector (what ONNX Runtime rightly leaves on the CPU: Shape, Gather of a dimension, Concat of a few sizes).
SHAPE_VECTOR_ELEMENTS = 8


def hot_path(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The nodes of a profiled run that left the CUDA provider or copy between host and device (Memcpy*), and whose
    outputs hold more than ``SHAPE_VECTOR_ELEMENTS`` elements: each costs a CPU kernel or a transfer every forward.
    One entry per op and provider: how many such nodes, the largest output, one node's name."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for name, a in _kernels(events).items():
        op, provider = a.get("op_name", "?"), a.get("provider", "?")
        if provider == "CUDAExecutionProvider" and not op.startswith("Memcpy"):
            continue
        elements = sum(math.prod(dims) for entry in a.get("output_type_shape") or [] for dims in entry.values())
        if elements > SHAPE_VECTOR_ELEMENTS:
            entry = found.setdefault((op, provider), {"op": op, "provider": provider, "nodes": 0,
                                                      "max_output_elements": 0, "example": name.removesuffix("_kernel_time")})
            entry["nodes"] += 1
            entry["max_output_elements"] = max(entry["max_output_elements"], elements)
    return sorted(found.values(), key=lambda e: -e["nodes"])


def build_for(engine: str, onnx_path: Path, shapes: list[Shape], work: Path) -> Any:
    """An engine (trt.EngineArtifact) whose one profile spans ``shapes`` (the timed ones and the parity batches')."""
    from .trt import EngineOptions, ShapeRange, build_engine

    b, s = [sh.batch for sh in shapes], [sh.seq for sh in shapes]
    options = EngineOptions(batch=ShapeRange(min(b), max(b), max(b)), sequence=ShapeRange(min(s), max(s), max(s)))
    return build_engine(onnx_path, engine, options, work / f"{engine}.plan", {})


def measure_trt(artifact: Any, engine: str, shapes: list[Shape], feeds: dict[Shape, Any], cfg: MeasureConfig,
                probe: DeviceMemory, reference: Any = None, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measure ``artifact`` (a trt.EngineArtifact) like ONNX Runtime, filling ``run`` (returned) as it goes."""
    from .trt import TrtRunner

    run = {} if run is None else run
    run |= {"resident_source": "device used memory after engine and context creation",
            "engine_weights": artifact.metadata["weights"], "shapes": [], "parity": []}
    base = probe.settle()
    with TrtRunner(artifact.path, engine) as runner:
        run["resident_bytes"] = probe.used() - base
        _shape_rows(runner, shapes, feeds, cfg, _driver_peak(probe, base), run["resident_bytes"], rows=run["shapes"])
        run["parity"] = reference(runner) if reference else []
    return run


def _driver_peak(probe: DeviceMemory, base: int) -> Callable[[Any], int]:
    """Run once more, then read the device's used memory: a runtime's arena keeps its high-water mark."""

    def peak(bound: Any) -> int:
        bound.run()
        return probe.used() - base

    return peak


def measure(cfg: MeasureConfig) -> dict[str, Any]:
    """Measure into ``cfg.out`` (results.json, results.md, memory.png); returns the results."""
    from .artifacts import check_writable, staged_folder
    from .model import build_meta, check_plan_fits, load_config, model_source
    from .plan import load_plan

    require_cuda()
    backends = resolve_backends(cfg.backends, backend_blockers())
    plan = load_plan(cfg.plan)
    source = model_source(cfg.model, cfg.subfolder, cfg.random_weights, cfg.allow_pickle)
    meta = build_meta(load_config(source))
    check_plan_fits(plan, meta)
    shapes = check_shapes(meta.config, cfg.batches, cfg.sequences)
    check_writable(cfg.out, cfg.force)  # after the inputs: a bad plan is named before an existing folder
    with staged_folder(cfg.out, cfg.force) as stage:
        results = run_measurements(meta, source, plan, backends, shapes, cfg, stage / "work")
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
    backends: tuple[str, ...]
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
    import torch

    from .plan import Plan

    torch.backends.cuda.matmul.allow_tf32 = False  # parity and timings in the precision asked for
    torch.backends.cudnn.allow_tf32 = False
    variants = {"dense": Plan.dense(plan.family, plan.num_blocks), "plan": plan}
    job = _new_job(meta, source, plan, backends, shapes, cfg, artifacts)
    results = job.results
    results["flops"] = _flops(meta, variants, job.shapes)
    for variant, variant_plan in variants.items():
        if variant not in cfg.variants:
            continue
        if variant == "dense" and dense is not None:
            results["runs"] += [copy.deepcopy(run) | {"reused": True} for run in dense]
            continue
        _measure_variant(job, variant, variant_plan, work / variant)
    for run in results["runs"]:
        run["resident_over_unique"] = run["resident_bytes"] / run["unique_weight_bytes"]
    results["summary"] = summarize(results)
    results["targets"] = check_targets(results)
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
    return _Job(source, backends, taken, cfg, DeviceMemory(), form,
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
        "inputs": {"source": form.source, "dtypes": dict(form.dtypes), "batch": list(form.batch),
                   "sequence": list(form.sequence)},
        "backends": list(backends),
        "flops": [],
        "runs": [], "errors": [], "skipped": [], "parity": [], "stages": [],
    }


def _measure_variant(job: _Job, variant: str, plan: Any, folder: Path) -> None:
    """PyTorch first (it also gives the plan's parity reference), then every backend that runs the ONNX."""
    from .apply import apply_plan, unique_parameter_bytes
    from .artifacts import check_device_memory
    from .model import load_encoder

    with job.stage(variant, "load"):
        enc = load_encoder(job.source, plan, job.cfg.precision)
        module = apply_plan(enc, plan, job.form.takes_mask)  # the inputs the artifact takes, the mask or not
    unique = unique_parameter_bytes(module)
    folder.mkdir(parents=True)
    given = job.artifacts if variant == "plan" else None
    main_jobs_dense = job.artifacts is not None and given is None  # measured in PyTorch only
    exported = [] if main_jobs_dense else [b for b in job.backends if b not in TORCH_BACKENDS]
    onnx_path = given.onnx if given else (_export(job, variant, module, unique, folder) if exported else None)
    reference = None
    modes = [b for b in job.backends if b in TORCH_BACKENDS and (variant == "dense" or b not in DENSE_ONLY)]
    parity = (job.batches, job.tolerances) if variant in job.cfg.parity else None
    if modes or parity:
        check_device_memory(int(unique * 1.1), f"the {variant} model's weights ({unique / 1e9:.2f} GB)")
        torch_results, reference = measure_torch(module, modes, job.shapes, job.feeds, job.cfg, job.probe, parity,
                                                 enc.model)
        for backend, result in torch_results.items():
            job.record(variant, backend, unique, result)
    del module, enc
    job.probe.settle()
    if exported:
        assert onnx_path is not None
        _measure_exported(job, variant, exported, onnx_path, reference, given, folder, unique)
    shutil.rmtree(folder, ignore_errors=True)


def _measure_exported(job: _Job, variant: str, backends: list[str], onnx_path: Path, reference: Any, given: Any,
                      folder: Path, unique: int) -> None:
    """ONNX Runtime CUDA and the engines on the exported ONNX (or the main job's). A backend that cannot run this
    model, or whose fused copy breaks the weight invariant, records the one reason and keeps what it measured before
    (its resident bytes, the shapes done); the next backend runs."""
    for backend in backends:
        run: dict[str, Any] = {}
        with kept_on_failure(run):
            if backend == "ort-cuda-fused":
                _measure_fused(job, variant, onnx_path, reference, folder, run)
            elif backend.startswith("ort-cuda"):
                shapes, feeds, check = job.inputs_for(variant, backend, job.form, reference)
                measure_ort(onnx_path, shapes, feeds, job.cfg, job.probe, folder, check, backend == "ort-cuda-stock", run)
            else:
                _measure_engine(job, variant, backend, onnx_path, reference, given, folder, run)
        job.record(variant, backend, unique, run)


def _measure_engine(job: _Job, variant: str, backend: str, onnx_path: Path, reference: Any, given: Any, folder: Path,
                    run: dict[str, Any]) -> None:
    """The main job's engine (``given``), or one built here spanning the timed shapes and the parity batches; fed as
    its engine.json says (input dtypes, profile)."""
    artifact = given.engines.get(backend) if given else None
    if artifact is None:
        with job.stage(variant, f"build {backend}"):
            artifact = build_for(backend, onnx_path, job.shapes + [batch_shape(b) for b in job.batches], folder)
    shapes, feeds, check = job.inputs_for(variant, backend, engine_input_form(artifact.path, artifact.metadata), reference)
    measure_trt(artifact, backend, shapes, feeds, job.cfg, job.probe, check, run)


def _measure_fused(job: _Job, variant: str, onnx_path: Path, reference: Any, folder: Path, run: dict[str, Any]) -> None:
    """ort-cuda-fused: the ``--optimize ort`` variant of ``onnx_path`` (``fused_copy``), measured with our settings
    like ort-cuda, fed as its own inputs say, with what was fused; the copy is removed afterwards."""
    with job.stage(variant, "fuse"):
        fused, fusion = fused_copy(onnx_path, job.ort_model_type)
    run["fusion"] = fusion
    try:
        shapes, feeds, check = job.inputs_for(variant, "ort-cuda-fused", onnx_input_form(fused), reference)
        measure_ort(fused, shapes, feeds, job.cfg, job.probe, folder, check, run=run)
    finally:
        fused.unlink(missing_ok=True)


def fused_copy(onnx_path: Path, model_type: str) -> tuple[Path, dict[str, Any]]:
    """A copy of the graph file next to ``onnx_path`` (``model.onnx`` -> ``model.ort.onnx``), rewritten by
    ``ort_fusion.fuse_for_ort``; its initializers keep their external-data entries, which resolve beside the file,
    so both graphs read the export's one data file and no weight is copied (``shared_weight_storage`` checks it).
    Returns the copy and what was fused (op counts, attention fused, how the weights are stored)."""
    from .errors import ArtifactError
    from .ort_fusion import fuse_for_ort

    fused = onnx_path.with_name(onnx_path.name.removesuffix(".onnx") + ".ort.onnx")
    shutil.copyfile(onnx_path, fused)
    try:
        _, result = fuse_for_ort(fused, model_type)
    except (UserError, InvariantError):
        fused.unlink()
        raise
    except Exception as exc:  # ONNX Runtime's optimizer changes between releases: name it, do not lose the run
        fused.unlink()
        raise ArtifactError(f"ONNX Runtime's transformer optimizer could not fuse {onnx_path.name}: "
                            f"{type(exc).__name__}: {exc}") from exc
    return fused, result.to_json() | {"storage": shared_weight_storage(onnx_path, fused)}


def shared_weight_storage(export: Path, fused: Path) -> dict[str, Any]:
    """How the fused copy stores its initializers, checked against the export it was made from: it reads the same
    external data files, every byte of them, and holds inline only what the export held inline plus the fusions'
    scalars and shape vectors (``ort_fusion.ADDED_ELEMENTS``). A weight stored anew is an InvariantError."""
    from .ort_fusion import ADDED_ELEMENTS

    ours, theirs = _storage(fused), _storage(export)
    copied = [name for name, (elements, _) in ours["inline"].items()
              if name not in theirs["inline"] and elements > ADDED_ELEMENTS]
    if copied:
        raise InvariantError(f"the fused copy {fused.name} stores {copied[0]} in its graph file ({len(copied)} such): "
                             "the weights must stay in the export's data file")
    if (ours["data_files"], ours["external_bytes"]) != (theirs["data_files"], theirs["external_bytes"]):
        raise InvariantError(f"the fused copy {fused.name} reads {ours['data_files']} ({ours['external_bytes']} bytes), "
                             f"not the export's {theirs['data_files']} ({theirs['external_bytes']} bytes)")
    inline = sum(size for _, size in ours["inline"].values())
    return {"data_files": ours["data_files"], "external_bytes": ours["external_bytes"], "inline_bytes": inline,
            "export_inline_bytes": sum(size for _, size in theirs["inline"].values()),
            "graph_file_bytes": fused.stat().st_size}


def _storage(path: Path) -> dict[str, Any]:
    """An ONNX file's initializers without reading external data: the data files, their bytes, the inline ones
    (name -> (elements, bytes))."""
    import onnx

    from .ort_fusion import tensor_bytes

    init = onnx.load(str(path), load_external_data=False).graph.initializer
    external = [t for t in init if t.data_location == onnx.TensorProto.EXTERNAL]
    return {"data_files": sorted({e.value for t in external for e in t.external_data if e.key == "location"}),
            "external_bytes": sum(map(tensor_bytes, external)),
            "inline": {t.name: (math.prod(t.dims), tensor_bytes(t)) for t in init
                       if t.data_location != onnx.TensorProto.EXTERNAL}}


def _export(job: _Job, variant: str, module: Any, unique: int, folder: Path) -> Path:
    """The variant's ONNX; with its weights in an external data file when ort-cuda-fused is asked for, so that the
    fused copy shares them (at any size: above 2 GB they are external anyway)."""
    from .artifacts import check_disk
    from .export import ExportOptions, export_onnx

    engines = {"trt", "trt-rtx"} & set(job.backends)
    check_disk(folder, int(unique * (2.1 if engines else 1.05)), "the measured artifacts")
    options = ExportOptions(input_dtype=job.cfg.input_dtype, fixed_sequence=job.cfg.fixed_sequence,
                            external_data=True if "ort-cuda-fused" in job.backends else None)
    with job.stage(variant, "export"):
        path = export_onnx(module, folder / "model.onnx", options, job.vocab).path
    if differences := job.form.differences(onnx_input_form(path)):
        raise InvariantError(f"the {variant} export's inputs differ from the form its feeds were made for: "
                             f"{'; '.join(differences)}")
    return path


def _reference(module: Any, batches: Any, tolerances: dict[str, Any]) -> Callable[..., list[dict[str, Any]]]:
    """PyTorch's outputs for the plan on the device; returns the check every other backend's runner goes through
    (on all ``batches``, or on the ones given)."""
    from .compare import runner_parity
    from .runners import TorchRunner

    with TorchRunner(module, module.output_names, DEVICE) as runner:
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


def _row(run: dict[str, Any], shape: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in run["shapes"] if (r["batch"], r["seq"]) == (shape["batch"], shape["seq"])), None)


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per backend and shape: plan latency over dense latency, next to the plan's executed-FLOP fraction."""
    runs = {(r["variant"], r["backend"]): r for r in results["runs"]}
    rows = []
    for backend in results["backends"]:
        dense, plan = runs.get(("dense", backend)), runs.get(("plan", backend))
        if dense is None or plan is None:
            continue
        for flops in results["flops"]:
            d, p = _row(dense, flops), _row(plan, flops)
            if d and p:
                rows.append({"backend": backend, "batch": flops["batch"], "seq": flops["seq"],
                             "dense_ms": d["median_ms"], "plan_ms": p["median_ms"],
                             "latency_ratio": p["median_ms"] / d["median_ms"], "flop_fraction": flops["fraction"],
                             "dense_peak_bytes": d["peak_bytes"], "plan_peak_bytes": p["peak_bytes"]})
    return rows


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of the measurement issues, evaluated on what was measured (nothing for what was not)."""
    runs = {(r["variant"], r["backend"]): r for r in results["runs"]}
    out: list[dict[str, Any]] = []

    def target(name: str, value: float, limit: float, met: bool) -> None:
        out.append({"target": name, "value": value, "limit": limit, "met": bool(met)})

    _memory_targets(runs, target)
    _latency_targets(runs, {(f["batch"], f["seq"]): f["fraction"] for f in results["flops"]}, target)
    _fused_latency_targets(runs, target)
    _placement_targets(results["runs"], target)
    return out


def _memory_targets(runs: dict[tuple[str, str], Any], target: Callable[..., None]) -> None:
    torch_plan, torch_dense = runs.get(("plan", "torch")), runs.get(("dense", "torch"))
    if torch_plan:
        ratio = torch_plan["resident_over_unique"]
        target("torch: plan resident / unique weight bytes within 1 %", ratio, 1.01, abs(ratio - 1) <= 0.01)
    if torch_plan and torch_dense:
        for d in torch_dense["shapes"]:
            p = _row(torch_plan, d)
            if p:
                limit = 1.05 * (torch_plan["unique_weight_bytes"] + d["activation_bytes"])
                target(f"torch {d['batch']}x{d['seq']}: plan peak <= 1.05 x (unique + dense activation peak)",
                       p["peak_bytes"], limit, p["peak_bytes"] <= limit)
    for backend in ("ort-cuda", "ort-cuda-fused"):  # our settings; ort-cuda-stock is the comparison, no target
        if ort_plan := runs.get(("plan", backend)):
            ratio = ort_plan["resident_over_unique"]
            target(f"{backend}: plan resident / unique weight bytes <= 1.05", ratio, 1.05, ratio <= 1.05)


def _latency_targets(runs: dict[tuple[str, str], Any], fractions: dict[tuple[int, int], float],
                     target: Callable[..., None]) -> None:
    """Eager: plan / dense latency within 5 % of the executed-FLOP fraction. Compiled: the compiled plan at most
    0.80 x the compiled dense model. ONNX Runtime CUDA: the plan no slower than PyTorch eager."""
    pairs = [("torch", "torch"), ("torch-compile", "torch-compile"), ("ort-cuda", "torch")]
    for backend, against in pairs:
        plan, base = runs.get(("plan", backend)), runs.get(("plan" if backend == "ort-cuda" else "dense", against))
        if plan is None or base is None:
            continue
        for row in plan["shapes"]:
            other, shape = _row(base, row), f"{row['batch']}x{row['seq']}"
            if other is None:
                continue
            ratio = row["median_ms"] / other["median_ms"]
            if backend == "torch":
                fraction = fractions[(row["batch"], row["seq"])]
                target(f"torch {shape}: plan / dense latency within 5 % of the executed-FLOP fraction "
                       f"({fraction:.3f})", ratio, 1.05 * fraction, abs(ratio / fraction - 1) <= 0.05)
            elif backend == "torch-compile":
                target(f"torch-compile {shape}: compiled plan / compiled dense latency <= 0.80", ratio, 0.80, ratio <= 0.80)
            else:
                target(f"ort-cuda {shape}: plan latency <= torch eager's (ms)", row["median_ms"], other["median_ms"],
                       row["median_ms"] <= other["median_ms"])


def _fused_latency_targets(runs: dict[tuple[str, str], Any], target: Callable[..., None]) -> None:
    """The fused plan on ONNX Runtime CUDA no slower than the dense model under torch.compile, shape by shape."""
    fused, compiled = runs.get(("plan", "ort-cuda-fused")), runs.get(("dense", "torch-compile"))
    if fused is None or compiled is None:
        return
    for row in fused["shapes"]:
        if other := _row(compiled, row):
            target(f"ort-cuda-fused {row['batch']}x{row['seq']}: fused plan latency <= dense torch.compile's (ms)",
                   row["median_ms"], other["median_ms"], row["median_ms"] <= other["median_ms"])


def _placement_targets(runs: list[dict[str, Any]], target: Callable[..., None]) -> None:
    """No node off the CUDA provider and no host-device copy on the hot path (``hot_path``), per ONNX Runtime run."""
    for run in runs:
        hot = run.get("placement", {}).get("hot_path")
        if hot is not None:
            nodes = sum(e["nodes"] for e in hot)
            target(f"{run['backend']} ({run['variant']}): nodes off CUDA or memcpy on the hot path", nodes, 0, not nodes)


def write_results(folder: Path, results: dict[str, Any]) -> None:
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (folder / "results.md").write_text(render_markdown(results))
    plot_memory(results, folder / "memory.png")


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f}"


def render_markdown(r: dict[str, Any], level: int = 1) -> str:
    """The results for a person; ``level`` 2 nests them under a report's heading."""
    tool, h = r["tool"], "#" * level
    lines = [
        f"{h} skrr-export measure: {r['model']['family']} ({r['precision']}) on {tool['device']}",
        "",
        f"- Model `{r['model']['path']}`{' (random weights)' if r['model']['random_weights'] else ''}; plan sha256 "
        f"`{r['plan']['sha256'][:16]}`, sparsity {r['plan']['sparsity'] * 100:.2f} %",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in tool.items() if k not in ("device", "device_memory_bytes")),
        "",
        f"{h}# Memory (GB, 1e9 bytes)",
        "",
        "| backend | variant | unique weights | resident | resident / unique | shape | forward peak | above resident |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        for row in run["shapes"]:
            lines.append(f"| {run['backend']} | {run['variant']} | {_gb(run['unique_weight_bytes'])} | "
                         f"{_gb(run['resident_bytes'])} | {run['resident_over_unique']:.4f} | {row['batch']}x{row['seq']} | "
                         f"{_gb(row['peak_bytes'])} | {_gb(row['activation_bytes'])} |")
    lines += _latency_lines(r, h) + _parity_lines(r, h)
    if r["targets"]:
        lines += ["", f"{h}# Targets", "", "| target | value | limit | met |", "|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']:.4g} | {t['limit']:.4g} | {'yes' if t['met'] else 'NO'} |" for t in r["targets"]]
    for run in r["runs"]:
        if run.get("placement"):
            lines += ["", f"ONNX Runtime node placement ({run['backend']}, {run['variant']}): `{json.dumps(run['placement'])}`"]
        if run.get("fusion"):
            f = run["fusion"]
            lines += ["", f"Fused for ONNX Runtime ({run['variant']}; {f['runtime']}): {f['fused_attention']} "
                      f"MultiHeadAttention, {f['unfused_softmax']} Softmax left; weights read from "
                      f"{', '.join(f['storage']['data_files']) or 'the graph file'}: `{json.dumps(f['op_counts'])}`"]
    for err in r["errors"]:
        kept = err.get("shapes_kept", 0)
        lines += ["", f"**{f'Stopped after {kept} shapes' if kept else 'Not measured'}:** {err['backend']} "
                      f"({err['variant']}): {err['error']}"]
    for skip in r.get("skipped", []):
        lines += ["", f"**Skipped:** {skip['shape']} on {skip['backend']} ({skip['variant']}): {skip['reason']}"]
    return "\n".join(lines) + "\n"


def _latency_lines(r: dict[str, Any], h: str) -> list[str]:
    lines = ["", f"{h}# Latency (ms; median / p90)", "", "| backend | shape | dense | plan | plan / dense | "
             "executed-FLOP fraction |", "|---|---|---|---|---|---|"]
    runs = {(x["variant"], x["backend"]): x for x in r["runs"]}
    for s in r["summary"]:
        d, p = (_row(runs[(v, s["backend"])], s) for v in VARIANTS)
        assert d is not None and p is not None
        lines.append(f"| {s['backend']} | {s['batch']}x{s['seq']} | {d['median_ms']:.2f} / {d['p90_ms']:.2f} | "
                     f"{p['median_ms']:.2f} / {p['p90_ms']:.2f} | {s['latency_ratio']:.3f} | {s['flop_fraction']:.3f} |")
    return lines


def _parity_lines(r: dict[str, Any], h: str) -> list[str]:
    if not r["parity"]:
        return []
    lines = ["", f"{h}# Parity: PyTorch on the device vs each backend", "",
             "| backend | variant | batch | output | max abs | min cos | passed |", "|---|---|---|---|---|---|---|"]
    for check in r["parity"]:
        for o in check["outputs"]:
            lines.append(f"| {check['backend']} | {check.get('variant', 'plan')} | {check['batch']} | {o['name']} | "
                         f"{o['max_abs']:.3g} | {o['min_cosine']:.6f} | {'yes' if o['passed'] else 'NO'} |")
    return lines


def plot_memory(r: dict[str, Any], path: Path) -> None:
    """Bars per backend, dense vs plan: resident weights, and the forward peak above them at the largest shape."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import MissingDependencyError

        raise MissingDependencyError("matplotlib", "measure", "the memory chart") from None
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * max(1, len(r["backends"])), 4.2), dpi=120)
    width = 0.38
    for i, variant in enumerate(VARIANTS):
        runs = {x["backend"]: x for x in r["runs"] if x["variant"] == variant}
        xs = [b + (i - 0.5) * width for b in range(len(r["backends"]))]
        resident = [runs[b]["resident_bytes"] / 1e9 if b in runs else 0 for b in r["backends"]]
        extra = [max(runs[b]["shapes"], key=lambda s: s["peak_bytes"])["activation_bytes"] / 1e9 if b in runs and runs[b]["shapes"] else 0
                 for b in r["backends"]]
        color = "tab:gray" if variant == "dense" else "tab:blue"
        ax.bar(xs, resident, width, color=color, label=f"{variant}: resident")
        ax.bar(xs, extra, width, bottom=resident, color=color, alpha=0.35, hatch="//", label=f"{variant}: forward peak above it")
        for x, a, b in zip(xs, resident, extra):
            if a:
                ax.text(x, a + b, f"{a + b:.2f}", ha="center", va="bottom", fontsize=8)
    largest = max(r["flops"], key=lambda f: f["batch"] * f["seq"]) if r["flops"] else None
    ax.set_xticks(range(len(r["backends"])), r["backends"])
    ax.set_ylabel("device memory (GB)")
    title = f"{r['model']['family']} {r['precision']} on {r['tool']['device']}"
    ax.set_title(title + (f", peak at {largest['batch']}x{largest['seq']}" if largest else ""), fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
