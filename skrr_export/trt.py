"""TensorRT and TensorRT-RTX engines from one code path.

This is the only module that imports ``tensorrt`` / ``tensorrt_rtx``; every difference between the two
and between their releases lives here. The code is written against ``tensorrt``'s API (type-checked with
tensorrt-stubs); at run time the name ``trt`` forwards to whichever backend is bound for the build.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifacts import ENGINE_METADATA, read_json, sha256_file, write_atomic
from .config import EngineOptions, ShapeRange
from .environment import cuda_available
from .errors import ArtifactError, InvariantError, UserError
from .runners import Bound, Feed, Runner
from .units import size, size_exact

log = logging.getLogger("skrr_export")

# engine flag -> (module, pip package, what it is for)
BACKENDS = {
    "trt": ("tensorrt", "tensorrt", "TensorRT for servers, Triton and Jetson"),
    "trt-rtx": ("tensorrt_rtx", "tensorrt-rtx", "TensorRT-RTX for RTX GPUs (builds ahead of time without a GPU)"),
}
WEIGHT_SLACK = 1.02  # engine weights may exceed unique ONNX weights by 2 %
WEIGHT_ALIGNMENT = 256  # TensorRT pads every weight to 256 bytes (seen: +256 B for one re-used 64x64 matrix)
# With a static sequence S the builder folds the graph's position computations into an [S, S] int32 table (T5's
# relative-position buckets), stored with the weights. Measured with TensorRT-RTX 1.7 on a 24-block T5, PixArt
# plan: +82,816 bytes at S=150, +350,464 at S=300 (4 S^2 = 90,000 and 360,000).
STATIC_SEQUENCE_TABLE_BYTES = 4
_WEIGHTS_LINE = re.compile(r"Total Weights Memory: (\d+) bytes")
_ACTIVATION_LINE = re.compile(r"Total Activation Memory: (\d+) bytes")


class _Bound:
    """Forwards attribute access to the backend module bound by ``bound()``."""

    module: Any = None

    def __getattr__(self, name: str) -> Any:
        if self.module is None:
            raise RuntimeError("no TensorRT backend bound; use skrr_export.trt.bound(backend)")
        return getattr(self.module, name)


if TYPE_CHECKING:
    import tensorrt as trt
else:
    trt = _Bound()


@dataclass(frozen=True)
class Backend:
    engine: str  # "trt" or "trt-rtx"
    module: Any
    version: str

    @property
    def rtx(self) -> bool:
        return self.engine == "trt-rtx"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


def load_backend(engine: str) -> Backend:
    """Import the backend, or say which package provides it and what else works on this machine."""
    module_name, package, purpose = BACKENDS[engine]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        module = None
    if module is None or not hasattr(module, "Builder"):  # tensorrt-stubs alone make an empty 'tensorrt' importable
        others = [f"--engine {e}" for e in BACKENDS if e != engine and available(e)]
        raise UserError(
            f"--engine {engine} needs {purpose}: the Python package '{package}', which is not installed; "
            f"usable here: --engine onnx{''.join(', ' + o for o in others)}"
        )
    return Backend(engine, module, str(module.__version__))


def available(engine: str) -> bool:
    try:
        return hasattr(importlib.import_module(BACKENDS[engine][0]), "Builder")
    except ImportError:
        return False


@contextmanager
def bound(backend: Backend) -> Iterator[Backend]:
    """Bind ``trt`` to ``backend`` for the duration of a build or a run."""
    previous = _Bound.module
    _Bound.module = backend.module
    try:
        yield backend
    finally:
        _Bound.module = previous


@dataclass
class EngineArtifact:
    path: Path
    metadata_path: Path
    metadata: dict[str, Any] = field(default_factory=dict)


def _make_logger() -> Any:
    class CapturingLogger(trt.ILogger):
        """Keeps every message: on a machine without a GPU the builder's log is the only weight report."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[tuple[Any, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            self.lines.append((severity, msg))
            if severity <= trt.ILogger.Severity.ERROR:
                log.error("%s", msg)

        def errors(self) -> list[str]:
            return [m for s, m in self.lines if s <= trt.ILogger.Severity.ERROR]

        def find(self, pattern: re.Pattern[str]) -> int | None:
            hits = [int(m.group(1)) for _, line in self.lines if (m := pattern.search(line))]
            return hits[-1] if hits else None

    return CapturingLogger()


def _parse(builder: Any, logger: Any, onnx_path: Path, weights: ExitStack) -> tuple[Any, Any, str]:
    """The network and how its weights reached the parser: mapped from the data file (caller-owned, not copied;
    ``weights`` keeps the mapping open until the build is done) or read by the parser from the path."""
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # TensorRT 10: opt in; 11 and RTX: always
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    mapped = _external_initializers(onnx_path, weights) if hasattr(parser, "load_initializer") else None
    if mapped:
        how = PARSE_MAPPED
        ok = parser.load_model_proto(onnx_path.read_bytes(), str(onnx_path)) and all(
            parser.load_initializer(name, address, size) for name, address, size in mapped) and parser.parse_model_proto()
    else:
        how = PARSE_FILE
        ok = parser.parse_from_file(str(onnx_path))  # from the path, so external data resolves
    if not ok:
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0] if errors else None
        where = f" at node {first.node()} ({first.node_name()}, {first.node_operator()})" if first else ""
        desc = first.desc() if first else "; ".join(logger.errors()) or "unknown error"
        raise ArtifactError(f"TensorRT cannot parse {onnx_path.name}{where}: {desc}")
    return network, parser, how


PARSE_MAPPED = "caller-owned weights: the ONNX data file mapped read-only, handed to the parser without a copy"
PARSE_FILE = "parse_from_file: the parser reads every weight into host memory"


def _external_initializers(onnx_path: Path, weights: ExitStack) -> list[tuple[str, int, int]]:
    """(name, address, bytes) of every externally stored initializer, its data file mapped read-only and kept
    open by ``weights``; empty for a single-file ONNX (its weights live inside the protobuf)."""
    import mmap

    import numpy as np
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    bases: dict[str, int] = {}
    out = []
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        length = int(info.get("length", 0))
        if length == 0:
            continue
        if info["location"] not in bases:
            handle = weights.enter_context((onnx_path.parent / info["location"]).open("rb"))
            mapping = weights.enter_context(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
            bases[info["location"]] = int(np.frombuffer(mapping, dtype=np.uint8).ctypes.data)  # no copy; the
            # view is released at once (a live export would stop the mapping from closing), the address stays valid
        out.append((init.name, bases[info["location"]] + int(info.get("offset", 0)), length))
    return out


def _io(network: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    def describe(t: Any) -> dict[str, Any]:
        return {"name": t.name, "dtype": str(t.dtype).removeprefix("DataType."), "shape": list(t.shape)}

    inputs = [describe(network.get_input(i)) for i in range(network.num_inputs)]
    outputs = [describe(network.get_output(i)) for i in range(network.num_outputs)]
    return inputs, outputs


def profile_shapes(inputs: list[dict[str, Any]], options: EngineOptions) -> dict[str, list[list[int]]]:
    """min/opt/max per input: axis 0 is batch, a dynamic axis 1 is sequence, fixed axes stay as exported."""
    options.batch.check("batch")
    options.sequence.check("sequence")
    shapes = {}
    for inp in inputs:
        ranges = [options.batch if axis == 0 else options.sequence if dim == -1 else ShapeRange(dim, dim, dim)
                  for axis, dim in enumerate(inp["shape"])]
        shapes[inp["name"]] = [[getattr(r, k) for r in ranges] for k in ("min", "opt", "max")]
    return shapes


def _configure(backend: Backend, builder: Any, options: EngineOptions, shapes: dict[str, list[list[int]]]) -> Any:
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, trt.Dims(lo), trt.Dims(opt), trt.Dims(hi))
    config.add_optimization_profile(profile)
    if options.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level
    for wanted, flag in ((options.weight_streaming, "WEIGHT_STREAMING"), (options.refit, "REFIT_IDENTICAL"),
                         (options.strip_weights, "STRIP_PLAN"), (options.version_compatible, "VERSION_COMPATIBLE")):
        if wanted:
            config.set_flag(getattr(trt.BuilderFlag, flag))
    _set_target(config, *_target(backend, options))
    return config


def check_options(backend: Backend, options: EngineOptions) -> None:
    """The engine flags this backend or this machine cannot honour, refused before any work (the build would refuse
    them after the export): the other runtime's target flags, an unknown compute capability or compatibility level,
    and a weight-stripped TensorRT-RTX plan without a CUDA device (TensorRT-RTX 1.7.1 compiles it with CUDA: "CUDA
    driver version is insufficient", benchmarks/README.md)."""
    with bound(backend):
        _target(backend, options)
    if backend.rtx and options.strip_weights and not cuda_available():
        raise UserError("--strip-weights with --engine trt-rtx needs a CUDA GPU where the engine is built (TensorRT-RTX "
                        "compiles a weight-stripped plan with CUDA); build on the GPU machine, or drop --strip-weights")


def _target(backend: Backend, options: EngineOptions) -> tuple[list[Any], Any]:
    """Which GPUs the engine may run on, checked: (compute capabilities (TensorRT-RTX), hardware compatibility level
    (TensorRT) or None)."""
    if backend.rtx:
        if options.hardware_compatibility:
            raise UserError("TensorRT-RTX has no hardware compatibility levels; use --compute-capability sm80 ...")
        return [_capability(c) for c in options.compute_capabilities], None
    if options.compute_capabilities:
        raise UserError("--compute-capability is a TensorRT-RTX option; TensorRT uses --hardware-compatibility")
    if not options.hardware_compatibility:
        return [], None
    name = options.hardware_compatibility.upper()
    if not hasattr(trt.HardwareCompatibilityLevel, name):
        raise UserError(f"--hardware-compatibility must be ampere_plus or same_compute_capability, got '{options.hardware_compatibility}'")
    return [], getattr(trt.HardwareCompatibilityLevel, name)


def _set_target(config: Any, capabilities: list[Any], level: Any) -> None:
    if capabilities:
        config.num_compute_capabilities = len(capabilities)
        for i, cap in enumerate(capabilities):
            config.set_compute_capability(cap, i)
    if level is not None:
        config.hardware_compatibility_level = level


def _capability(text: str) -> Any:
    name = text.upper()
    known = getattr(trt, "ComputeCapability", None)
    if known is None or not hasattr(known, name):
        choices = [c.lower() for c in dir(known) if c.startswith("SM")] if known else []
        raise UserError(f"unknown compute capability '{text}'; this TensorRT-RTX knows {', '.join(choices)}")
    return getattr(known, name)


@contextmanager
def _timing_cache(backend: Backend, config: Any, path: Path | None) -> Iterator[None]:
    if path is None or backend.rtx:  # RTX: timing cache operations are no-ops (it compiles just in time)
        if path is not None:
            log.info("TensorRT-RTX ignores timing caches; %s not used", path)
        yield
        return
    cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
    config.set_timing_cache(cache, False)
    yield
    write_atomic(path, memoryview(cache.serialize()))


def build_engine(onnx_path: Path, engine: str, options: EngineOptions, out: Path, provenance: dict[str, Any]) -> EngineArtifact:
    """Parse ``onnx_path``, build, write ``out`` (engine.plan) and ``out.json``; check weight bytes against the ONNX."""
    backend = load_backend(engine)
    _check_build_resources(onnx_path, options, out)
    start = time.perf_counter()
    inputs, outputs, shapes, accounting = _build(backend, onnx_path, options, out)
    seconds = time.perf_counter() - start
    meta = _engine_metadata(backend, onnx_path, options, out, (inputs, outputs, shapes), accounting)
    meta |= {"build_seconds": round(seconds, 2), **provenance}
    metadata_path = out.with_suffix(".json")
    metadata_path.write_text(json.dumps(meta, indent=2) + "\n")
    log.info("built %s with %s %s in %.1f s: engine weights %s (%s) for %s of unique ONNX weights", out.name,
             backend.module.__name__, backend.version, seconds, size(accounting.get("total_bytes")),
             accounting.get("source"), size(meta["onnx_weight_bytes"]))
    _check_weights(accounting, meta["onnx_weight_bytes_aligned"], meta["static_sequence_table_bytes"], out)
    return EngineArtifact(out, metadata_path, meta)


# Host memory of the engine build above the floor (benchmarks/engine_memory.py build, TensorRT-RTX 1.7.1 on the CPU,
# mapped parse + streamed plan): the mapped data file's pages (1 x the weights) plus what the builder holds of its
# own. Fitted to two measured points: MiniLM fp32 (0.075 GiB of weights) 0.60 GiB, a 24-block T5 at d_model 1536,
# bf16 (0.813 GiB) 2.21 GiB above the import baseline: 2.2 x weights + 0.45 GiB. T5-XXL not measured (too slow here).
BUILD_WEIGHT_FACTOR = 2.2
BUILD_OVERHEAD = 450 << 20


def build_memory(onnx_weight_bytes: int, options: EngineOptions | None = None) -> int:
    """Host bytes the engine stage holds at its peak for an export of ``onnx_weight_bytes`` (the preflight's engine
    term; the caller adds its 10 % and 0.6 GiB)."""
    return int(onnx_weight_bytes * BUILD_WEIGHT_FACTOR) + BUILD_OVERHEAD


def _check_build_resources(onnx_path: Path, options: EngineOptions, out: Path) -> None:
    """The ONNX and its data file are there; the disk holds the engine; the device its weights (unless capped)."""
    from .artifacts import check_device_memory, check_disk, check_onnx_files, disk_need, need

    check_onnx_files(onnx_path)
    weights = onnx_path.stat().st_size + sum(p.stat().st_size for p in onnx_path.parent.glob(onnx_path.name + ".data"))
    check_disk(out.parent, disk_need(weights, False), "the engine file")
    if options.workspace_mib is None:
        check_device_memory(need(weights, runtime=0), "building the engine (weights; cap the workspace with --workspace-mib)")


def _build(backend: Backend, onnx_path: Path, options: EngineOptions, out: Path) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Parse, configure and build; write the engine to ``out``; return its inputs, outputs, profile and weights."""
    with bound(backend), ExitStack() as weights:
        logger = _make_logger()
        builder = trt.Builder(logger)
        network, _parser, parsed = _parse(builder, logger, onnx_path, weights)
        inputs, outputs = _io(network)
        shapes = profile_shapes(inputs, options)
        config = _configure(backend, builder, options, shapes)
        with _timing_cache(backend, config, options.timing_cache):
            written = _serialize(builder, network, config, out, _streams(backend))
        if not written:
            raise ArtifactError(f"{backend.engine} build failed: {'; '.join(logger.errors()[-3:]) or 'no reason logged'}")
        del network, _parser, config, builder
    return inputs, outputs, shapes, _weight_bytes(backend, out, logger) | {"parse": parsed, "serialize": written}


SERIALIZE_STREAM = "build_serialized_network_to_stream: written to the file in the builder's chunks"
SERIALIZE_HOST = "build_serialized_network: the whole engine in one host buffer, then written"


def _streams(backend: Backend) -> bool:
    """Whether the builder writes engines through an IStreamWriter that receives bytes: TensorRT-RTX 1.x and
    TensorRT 10.15+ (10.13's binding declares ``write(capsule, size)``, which a file cannot take)."""
    if not (hasattr(trt.Builder, "build_serialized_network_to_stream") and hasattr(trt, "IStreamWriter")):
        return False
    return backend.rtx or tuple(int(v) for v in backend.version.split(".")[:2]) >= (10, 15)


def _serialize(builder: Any, network: Any, config: Any, out: Path, streams: bool) -> str | None:
    """Build straight into ``out`` through a stream writer where the runtime has one (TensorRT-RTX 1.x, TensorRT
    10.15+); else through one host buffer. The file appears whole or not at all. Returns how, or None on failure."""
    from .artifacts import unique_sibling

    if not streams:
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            return None
        write_atomic(out, memoryview(serialized))
        return SERIALIZE_HOST
    tmp = unique_sibling(out, "partial")
    try:
        with tmp.open("xb") as f:
            ok = builder.build_serialized_network_to_stream(network, config, _file_writer(f))
        if ok:
            tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return SERIALIZE_STREAM if ok else None


def _file_writer(f: Any) -> Any:
    """An IStreamWriter (of the bound backend) that appends every chunk the builder hands it to the open file ``f``."""

    class FileWriter(trt.IStreamWriter):
        def __init__(self) -> None:
            trt.IStreamWriter.__init__(self)

        def write(self, data: Any, size: int | None = None) -> int:  # RTX and 10.15+: (data); the 10.13 stubs: (data, size)
            return int(f.write(data))

    return FileWriter()


def _engine_metadata(backend: Backend, onnx_path: Path, options: EngineOptions, out: Path, io: tuple[Any, Any, Any],
                     accounting: dict[str, Any]) -> dict[str, Any]:
    """engine.json: what built it, for which ONNX and shapes, and the weight bytes it holds against the ONNX's."""
    from .artifacts import onnx_initializer_sizes

    inputs, outputs, shapes = io
    sizes = onnx_initializer_sizes(onnx_path)
    seq = shapes["input_ids"][0][1] if shapes["input_ids"][0][1] == shapes["input_ids"][2][1] else 0
    return {
        "backend": backend.engine,
        "module": backend.module.__name__,
        "version": backend.version,
        "profiles": [shapes],
        "inputs": inputs,
        "outputs": outputs,
        "options": options.to_json(),
        "gpu_targets": gpu_targets(backend, options),
        "engine_sha256": sha256_file(out),
        "onnx_sha256": sha256_file(onnx_path),
        "serialized_bytes": out.stat().st_size,
        "onnx_weight_bytes": sum(sizes),
        "onnx_weight_bytes_aligned": sum(-(-n // WEIGHT_ALIGNMENT) * WEIGHT_ALIGNMENT for n in sizes),
        "static_sequence_table_bytes": STATIC_SEQUENCE_TABLE_BYTES * seq * seq,
        "weights": accounting,
    }


# TensorRT-RTX without set_compute_capability (num_compute_capabilities 0; no GPU needed): "an engine built by
# TensorRT-RTX can be run on GPU devices with compute capability 8.0, 8.6, 8.9, 12.0, and later" (CPU-only AOT docs).
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0+")
RTX_DOCS = "https://docs.nvidia.com/deeplearning/tensorrt-rtx/latest/inference-library/cpu-engines.html"


def gpu_targets(backend: Backend, options: EngineOptions) -> dict[str, Any]:
    """The GPU generations the engine was built for, and where that comes from."""
    if backend.rtx and options.compute_capabilities:
        caps = [_sm_to_cc(c) for c in options.compute_capabilities]
        return {"compute_capabilities": caps, "source": "--compute-capability"}
    if backend.rtx:
        return {"compute_capabilities": list(RTX_DEFAULT_TARGETS), "source": "the builder's default (no "
                f"--compute-capability): portable engine, documented at {RTX_DOCS}"}
    if options.hardware_compatibility == "ampere_plus":
        return {"compute_capabilities": ["8.0+"], "source": "--hardware-compatibility ampere_plus"}
    return {"compute_capabilities": [_build_gpu() or "the build GPU's"], "source": "TensorRT: the GPU it was built on"
            + (" (same_compute_capability)" if options.hardware_compatibility else "")}


def _sm_to_cc(sm: str) -> str:
    digits = sm.lower().removeprefix("sm")
    return "current GPU" if digits == "current" else f"{digits[:-1]}.{digits[-1]}"


def _build_gpu() -> str | None:
    if not cuda_available():
        return None
    import torch

    return "{}.{}".format(*torch.cuda.get_device_capability())


def _weight_bytes(backend: Backend, engine_path: Path, logger: Any) -> dict[str, Any]:
    """Engine statistics where a runtime can load the engine (needs a GPU); the builder's own report otherwise."""
    stats = _engine_stats(backend, engine_path)
    if stats is not None:
        return stats
    return {
        "total_bytes": logger.find(_WEIGHTS_LINE),
        "source": "builder log 'Total Weights Memory' (no CUDA device to load the engine)",
        "activation_bytes_builder": logger.find(_ACTIVATION_LINE),
    }


def _engine_stats(backend: Backend, engine_path: Path) -> dict[str, Any] | None:
    if not cuda_available():
        return None
    runtime = trt.Runtime(_make_logger())
    eng = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if eng is None:
        return None
    out: dict[str, Any] = {"activation_bytes": int(eng.device_memory_size_v2)}
    if hasattr(eng, "get_engine_stat") and hasattr(trt, "EngineStat"):  # TensorRT 11 / RTX; not in 10.13
        out["total_bytes"] = int(eng.get_engine_stat(trt.EngineStat.TOTAL_WEIGHTS_SIZE))
        out["source"] = "engine statistics (TOTAL_WEIGHTS_SIZE)"
    else:
        out["total_bytes"] = None
        out["source"] = "not reported by this TensorRT version"
    out["streamable_bytes"] = int(eng.streamable_weights_size)
    return out


def _check_weights(weights: dict[str, Any], unique: int, folded: int, engine_path: Path) -> None:
    """``unique``: the ONNX's unique initializer bytes, each rounded up to TensorRT's weight alignment; ``folded``:
    the [S, S] position table the builder derives from a static sequence (STATIC_SEQUENCE_TABLE_BYTES)."""
    total = weights.get("total_bytes")
    if total is None:
        log.warning("engine weight bytes unknown (%s); the 2 %% check was not made", weights.get("source"))
        return
    limit = unique * WEIGHT_SLACK + folded
    if total > limit:
        engine_path.unlink(missing_ok=True)
        engine_path.with_suffix(".json").unlink(missing_ok=True)
        table = f" + a static-sequence table of {size_exact(folded)}" if folded else ""
        raise InvariantError(
            f"engine stores {size_exact(total)} of weights for {size_exact(unique)} of unique ONNX weights (256-byte "
            f"aligned){table} "
            f"(+{(total / (unique + folded) - 1) * 100:.1f} %, limit +{(WEIGHT_SLACK - 1) * 100:.0f} %): "
            "a weight is stored twice"
        )


def check_engine_metadata(engine_path: Path, backend: Backend) -> dict[str, Any]:
    """An engine runs only on the backend and version that built it; say so before TensorRT does."""
    meta_path = engine_path.with_suffix(".json")
    if not engine_path.is_file():
        raise ArtifactError(f"engine {engine_path} does not exist")
    if not meta_path.is_file():
        raise ArtifactError(f"{engine_path.name} has no metadata file {meta_path.name} beside it")
    meta = read_json(meta_path.parent, meta_path.name, ENGINE_METADATA, "rebuild it from model.onnx")
    if meta.get("backend") != backend.engine or meta.get("version") != backend.version:
        raise ArtifactError(
            f"{engine_path.name} was built by {meta.get('module')} {meta.get('version')}, but this is "
            f"{backend.module.__name__} {backend.version}; rebuild it from model.onnx"
        )
    if meta.get("engine_sha256") != sha256_file(engine_path):
        raise ArtifactError(f"{engine_path.name} does not match the sha256 in {meta_path.name}; rebuild it")
    return meta


def execution_blocker(engine: str) -> str | None:
    """Why engines of this backend cannot run here, or None when they can."""
    if not cuda_available():
        return "built, not executed: no CUDA device on this machine"
    if engine == "trt-rtx":
        import torch

        major, minor = torch.cuda.get_device_capability()
        if (major, minor) not in ((8, 0), (8, 6), (8, 9)) and major != 12:
            return f"built, not executed: TensorRT-RTX engines run on compute capability 8.0/8.6/8.9/12.x, this GPU is {major}.{minor}"
    return None


def load_engine(engine_path: Path, engine: str, onnx_path: Path | None = None) -> tuple[Any, Any, Any]:
    """(runtime, engine, logger) for ``engine_path`` in the runtime of the backend that built it (checked against
    engine.json); a weight-stripped engine is refitted from the export's own ONNX weights (``onnx_path``, default
    model.onnx beside it), mapped from its data file. Keep the runtime alive as long as the engine."""
    backend = load_backend(engine)
    blocker = execution_blocker(engine)
    if blocker:
        raise ArtifactError(blocker.replace("built, not executed", f"cannot load {engine_path.name}"))
    meta = check_engine_metadata(engine_path, backend)
    with bound(backend):
        logger = _make_logger()
        runtime = trt.Runtime(logger)
        loaded = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if loaded is None:
            raise ArtifactError(f"cannot load {engine_path.name}: {'; '.join(logger.errors()) or 'no reason logged'}")
        if meta.get("options", {}).get("strip_weights"):
            _refit(loaded, onnx_path or engine_path.with_name("model.onnx"), logger)
        return runtime, loaded, logger


def _refit(engine: Any, onnx_path: Path, logger: Any) -> None:
    """Put the weights a weight-stripped engine left out back from the ONNX: its data file mapped (no copy) where it
    has one, else read from the file by the parser."""
    refitter = trt.Refitter(engine, logger)
    parser = trt.OnnxParserRefitter(refitter, logger)
    with ExitStack() as weights:
        mapped = _external_initializers(onnx_path, weights)
        if mapped:
            ok = parser.load_model_proto(onnx_path.read_bytes(), str(onnx_path)) and all(
                parser.load_initializer(name, address, size) for name, address, size in mapped) and parser.refit_model_proto()
        else:
            ok = parser.refit_from_file(str(onnx_path))
        if not ok or not refitter.refit_cuda_engine():
            errors = [parser.get_error(i).desc() for i in range(parser.num_errors)] + logger.errors()
            raise ArtifactError(f"cannot refit the weight-stripped engine from {onnx_path.name}: "
                                f"{'; '.join(errors[-3:]) or 'no reason logged'}")


class TrtRunner(Runner):
    """Runs an engine on CUDA: allocate by profile, set shapes, run on a stream, return named outputs."""

    name = "tensorrt"

    def __init__(self, engine_path: Path, engine: str, weight_streaming_budget: int | None = None):
        super().__init__()
        self.engine_path = engine_path
        self.backend = load_backend(engine)
        self.budget = weight_streaming_budget
        self.name = engine
        self._runtime: trt.Runtime | None = None
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None

    def activate_impl(self) -> None:
        import torch

        blocker = execution_blocker(self.backend.engine)
        if blocker:
            raise ArtifactError(blocker)
        self._runtime, engine, self._logger = load_engine(self.engine_path, self.backend.engine)
        with bound(self.backend):
            if self.budget is not None:
                engine.weight_streaming_budget_v2 = self.budget
            self._engine, self._context = engine, engine.create_execution_context()
        self._stream = torch.cuda.Stream()

    def bind_impl(self, feed: Feed) -> Bound:
        assert self._engine is not None and self._context is not None  # activate() made them
        return _TrtBound(self, feed)

    def deactivate_impl(self) -> None:
        self._context = self._engine = self._runtime = None


class _TrtBound:
    """Device buffers allocated once for one feed; ``run`` enqueues the engine and waits for it."""

    def __init__(self, runner: TrtRunner, feed: Feed):
        import torch

        engine, context = runner._engine, runner._context
        assert engine is not None and context is not None
        self.runner, self.context = runner, context
        self.buffers: dict[str, torch.Tensor] = {}
        self.output_names: list[str] = []
        with bound(runner.backend), torch.cuda.stream(runner._stream):  # copies and the engine on one stream
            for i in range(engine.num_io_tensors):
                name = engine.get_tensor_name(i)
                if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                    self.buffers[name] = torch.from_numpy(feed[name]).cuda().contiguous()
                    context.set_input_shape(name, trt.Dims(list(self.buffers[name].shape)))
                else:
                    self.output_names.append(name)
            for name in self.output_names:
                dims = context.get_tensor_shape(name)
                dtype = _TORCH_DTYPES[str(engine.get_tensor_dtype(name)).removeprefix("DataType.")]
                self.buffers[name] = torch.empty([dims[i] for i in range(len(dims))], dtype=getattr(torch, dtype), device="cuda")
        runner._stream.synchronize()

    def run(self) -> None:
        runner = self.runner
        with bound(runner.backend):
            for name, buffer in self.buffers.items():  # another binding may have run on this context since
                if name not in self.output_names:
                    self.context.set_input_shape(name, trt.Dims(list(buffer.shape)))
                self.context.set_tensor_address(name, buffer.data_ptr())
            if not self.context.execute_async_v3(runner._stream.cuda_stream):
                raise ArtifactError(f"{runner.name}: execution failed: {'; '.join(runner._logger.errors())}")
        runner._stream.synchronize()

    def outputs(self) -> Feed:
        from .runners import to_numpy

        return {name: to_numpy(self.buffers[name]) for name in self.output_names}


_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64"}
