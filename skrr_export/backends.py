"""backends: the runtimes measure can time (PyTorch eager / compiled / Hugging Face's forward, ONNX Runtime CUDA plain /
stock / fused, TensorRT, TensorRT-RTX) as a registry of runner factories, which of them can run here, and why not.

measure chooses nothing by a backend's name: each ``Backend`` says what it runs (the module in PyTorch, the exported
ONNX, or an engine built from it), whether it runs only on request or on the dense model only, and makes its runner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .environment import cuda_available
from .errors import UserError

# Where measure runs what it measures (benchmarks/rehearsal.py runs the flow on "cpu").
DEVICE = "cuda"
# What a backend runs: the PyTorch module of the variant, the variant's ONNX export, or an engine built from that.
MODULE, ONNX, ENGINE = "module", "onnx", "engine"


@dataclass(frozen=True)
class Backend:
    """One measurable runtime. ``runner(source, **settings)`` makes its runner: from the variant's module for
    ``runs == MODULE`` (``source`` = (module, Hugging Face model)), from an ONNX path for ``ONNX`` (``profile``: a
    profile prefix), from an engine artifact for ``ENGINE``. ``fused``: it runs the ``--optimize ort`` copy of the
    export, not the export itself. ``settings``: what it records of its configuration."""

    name: str
    runs: str
    runner: Callable[..., Any]
    on_request: bool = False  # only when asked for (--backends)
    dense_only: bool = False
    fused: bool = False
    checked: bool = True  # checked against PyTorch eager on the device (False: it is that reference, or another output)
    settings: dict[str, Any] = field(default_factory=dict)


def _torch_eager(source: tuple[Any, Any], **_: Any) -> Any:
    from .runners import TorchRunner

    module, _hf = source
    return TorchRunner(module, module.output_names, DEVICE, name="torch")


def _torch_compiled(source: tuple[Any, Any], compile_dynamic: bool | None = None, **_: Any) -> Any:
    import torch

    from .runners import TorchRunner

    module, _hf = source
    torch._dynamo.reset()  # a fresh cache per model: the recompile limit is not spent on the other variant
    return TorchRunner(torch.compile(module, dynamic=compile_dynamic), module.output_names, DEVICE, name="torch-compile")


class HfForward:
    """A Hugging Face encoder called as the runners call a module: its inputs positionally -> (hidden,)."""

    def __init__(self, model: Any, input_names: tuple[str, ...]):
        self.model = model
        self.input_names = input_names

    def __call__(self, *inputs: Any) -> tuple[Any]:
        return (self.model(**dict(zip(self.input_names, inputs))).last_hidden_state,)


def _hf(source: tuple[Any, Any], **_: Any) -> Any:
    from .runners import TorchRunner

    module, hf_model = source
    return TorchRunner(HfForward(hf_model, module.input_names), ("last_hidden_state",), DEVICE, name="hf")


def _ort(stock: bool) -> Callable[..., Any]:
    """ONNX Runtime's CUDA provider: with our settings, or (``stock``) its own defaults with TF32 off."""

    def make(path: Path, profile: Path | None = None, **_: Any) -> Any:
        from . import runners

        options, config = _ort_settings(stock)
        return runners.OrtRunner(path, ("CUDAExecutionProvider",), options, config, profile_prefix=profile)

    return make


def _ort_settings(stock: bool) -> tuple[dict[str, str], dict[str, str]]:
    from .runners import CUDA_PROVIDER_OPTIONS, CUDA_SESSION_CONFIG

    return ({"use_tf32": "0"}, {}) if stock else (dict(CUDA_PROVIDER_OPTIONS), dict(CUDA_SESSION_CONFIG))


def _engine(kind: str) -> Callable[..., Any]:
    def make(artifact: Any, **_: Any) -> Any:
        from .trt import TrtRunner

        return TrtRunner(artifact.path, kind)

    return make


# The order is the default order of a measurement. On request only: torch-compile (compiling takes minutes on big
# models), ort-cuda-stock (ONNX Runtime's own CUDA defaults, TF32 off only, to compare with our settings), hf (the
# Hugging Face model's own forward, dense only: the baseline the plan is compared with) and ort-cuda-fused (the
# export's ``--optimize ort`` variant, a fused copy of its graph reading the same weights, with our settings).
MEASURE_BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("torch", MODULE, _torch_eager, checked=False),
    Backend("ort-cuda", ONNX, _ort(stock=False), settings={"stock": False}),
    Backend("trt", ENGINE, _engine("trt")),
    Backend("trt-rtx", ENGINE, _engine("trt-rtx")),
    Backend("torch-compile", MODULE, _torch_compiled, on_request=True),
    Backend("ort-cuda-stock", ONNX, _ort(stock=True), on_request=True, settings={"stock": True}),
    Backend("hf", MODULE, _hf, on_request=True, dense_only=True, checked=False),
    Backend("ort-cuda-fused", ONNX, _ort(stock=False), on_request=True, fused=True, settings={"stock": False}),
)}
BACKENDS = tuple(MEASURE_BACKENDS)  # the names, in order (the CLI's --backends help)


def ort_settings(backend: Backend) -> dict[str, Any]:
    """What an ONNX Runtime backend's run records of its settings."""
    options, config = _ort_settings(backend.settings.get("stock", False))
    return {"provider_options": options, "session_config": config, "io_binding": True}


def require_cuda() -> None:
    """Exit code 2 without a CUDA device: nothing here is estimated."""
    if not cuda_available():
        raise UserError("measure needs a CUDA device and torch sees none (torch.cuda.is_available() is False); "
                        "nothing was measured")


def backend_blockers() -> dict[str, str | None]:
    """Why each backend cannot run here (None: it can)."""
    from .trt import available, execution_blocker

    ort_blocker = _ort_cuda_blocker()
    out: dict[str, str | None] = {}
    for name, backend in MEASURE_BACKENDS.items():
        if backend.runs == ONNX:
            out[name] = ort_blocker
        elif backend.runs == ENGINE:
            out[name] = execution_blocker(name) if available(name) else f"{engine_module(name)} is not installed"
        else:
            out[name] = None
    return out


def _ort_cuda_blocker() -> str | None:
    try:
        preload_cuda_libraries()
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    providers = ort.get_available_providers()
    return None if "CUDAExecutionProvider" in providers else (
        f"onnxruntime {ort.__version__} has no CUDA provider (has {', '.join(providers)}); install onnxruntime-gpu")


def engine_module(engine: str) -> str:
    from .trt import BACKENDS as ENGINES

    return ENGINES[engine][0]


def preload_cuda_libraries() -> dict[str, Any]:
    """Make ONNX Runtime's CUDA provider find the CUDA libraries before any session: import torch first (its CUDA
    build loads libcudart, libcublas, libcublasLt, libcurand from its ``nvidia`` packages), then call
    ``onnxruntime.preload_dlls()`` where this onnxruntime has it (1.21 and later). onnxruntime-gpu 1.31.1 (CUDA 13)
    needs libcublasLt.so.13, libcublas.so.13, libcurand.so.10 and libcudart.so.13; its preload_dlls looks for them
    under ``nvidia/cu13/lib`` beside the onnxruntime package, then by name, which finds the copies torch loaded.
    Returns what was done and which CUDA libraries the process has mapped (ImportError without onnxruntime)."""
    import contextlib
    import io

    with contextlib.suppress(ImportError):
        import torch  # noqa: F401 - loads torch's CUDA libraries first
    import onnxruntime as ort

    done: dict[str, Any] = {"onnxruntime": ort.__version__, "path": str(Path(ort.__file__).parent),
                            "preload_dlls": hasattr(ort, "preload_dlls")}
    if hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(io.StringIO()) as said:  # it prints what it could not load
            ort.preload_dlls()
        done["preload_messages"] = said.getvalue().strip()
    done["cuda_libraries"] = _mapped_libraries(("libcudart", "libcublas", "libcurand", "libcudnn"))
    return done


def _mapped_libraries(prefixes: tuple[str, ...]) -> list[str]:
    """The shared libraries of this process whose file names start with one of ``prefixes`` (Linux only)."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return []
    paths = {line.split()[-1] for line in maps.read_text().splitlines() if "/" in line}
    return sorted(p for p in paths if Path(p).name.startswith(prefixes))


def resolve_backends(requested: tuple[str, ...], blockers: dict[str, str | None]) -> tuple[str, ...]:
    """Requested backends must all run here; none requested means every one that can."""
    unknown = [b for b in requested if b not in MEASURE_BACKENDS]
    if unknown:
        raise UserError(f"--backends: unknown backend '{unknown[0]}'; choose from {', '.join(MEASURE_BACKENDS)}")
    if not requested:
        return tuple(n for n, b in MEASURE_BACKENDS.items() if blockers.get(n) is None and not b.on_request)
    for backend in requested:
        if blockers.get(backend):
            raise UserError(f"backend {backend} cannot run here: {blockers[backend]}")
    return tuple(dict.fromkeys(requested))
