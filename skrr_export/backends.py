"""backends: which runtimes can measure here (PyTorch, ONNX Runtime CUDA, TensorRT, TensorRT-RTX), and why not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .environment import cuda_available
from .errors import UserError

BACKENDS = ("torch", "ort-cuda", "trt", "trt-rtx", "torch-compile", "ort-cuda-stock", "hf", "ort-cuda-fused")
TORCH_BACKENDS = ("torch", "torch-compile", "hf")
# Only when asked for: torch-compile (compiling takes minutes on big models), ort-cuda-stock (ONNX Runtime's
# own CUDA defaults, TF32 off only, to compare with our settings), hf (the Hugging Face model's own forward,
# dense only: the baseline the plan is compared with) and ort-cuda-fused (the export's ``--optimize ort`` variant,
# a fused copy of its graph reading the same weights, with our settings).
ON_REQUEST = ("torch-compile", "ort-cuda-stock", "hf", "ort-cuda-fused")
DENSE_ONLY = ("hf",)


def require_cuda() -> None:
    """Exit code 2 without a CUDA device: nothing here is estimated."""
    if not cuda_available():
        raise UserError("measure needs a CUDA device and torch sees none (torch.cuda.is_available() is False); "
                        "nothing was measured")


def backend_blockers() -> dict[str, str | None]:
    """Why each backend cannot run here (None: it can)."""
    from .trt import available, execution_blocker

    out: dict[str, str | None] = {"torch": None, "torch-compile": None, "hf": None}
    try:
        preload_cuda_libraries()
        import onnxruntime as ort

        providers = ort.get_available_providers()
        out["ort-cuda"] = None if "CUDAExecutionProvider" in providers else (
            f"onnxruntime {ort.__version__} has no CUDA provider (has {', '.join(providers)}); install onnxruntime-gpu")
    except ImportError:
        out["ort-cuda"] = "onnxruntime is not installed"
    out["ort-cuda-stock"] = out["ort-cuda-fused"] = out["ort-cuda"]
    for engine in ("trt", "trt-rtx"):
        module = "tensorrt" if engine == "trt" else "tensorrt_rtx"
        out[engine] = execution_blocker(engine) if available(engine) else f"{module} is not installed"
    return out


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
    unknown = [b for b in requested if b not in BACKENDS]
    if unknown:
        raise UserError(f"--backends: unknown backend '{unknown[0]}'; choose from {', '.join(BACKENDS)}")
    if not requested:
        return tuple(b for b in BACKENDS if blockers.get(b) is None and b not in ON_REQUEST)
    for backend in requested:
        if blockers.get(backend):
            raise UserError(f"backend {backend} cannot run here: {blockers[backend]}")
    return tuple(dict.fromkeys(requested))
