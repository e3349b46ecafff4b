"""backends: which runtimes can measure here (PyTorch, ONNX Runtime CUDA, TensorRT, TensorRT-RTX), and why not."""

from __future__ import annotations

from .errors import UserError

BACKENDS = ("torch", "ort-cuda", "trt", "trt-rtx", "torch-compile", "ort-cuda-stock", "hf")
TORCH_BACKENDS = ("torch", "torch-compile", "hf")
# Only when asked for: torch-compile (compiling takes minutes on big models), ort-cuda-stock (ONNX Runtime's
# own CUDA defaults, TF32 off only, to compare with our settings) and hf (the Hugging Face model's own forward,
# dense only: the baseline the plan is compared with).
ON_REQUEST = ("torch-compile", "ort-cuda-stock", "hf")
DENSE_ONLY = ("hf",)


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


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
        import onnxruntime as ort

        providers = ort.get_available_providers()
        out["ort-cuda"] = None if "CUDAExecutionProvider" in providers else (
            f"onnxruntime {ort.__version__} has no CUDA provider (has {', '.join(providers)}); install onnxruntime-gpu")
    except ImportError:
        out["ort-cuda"] = "onnxruntime is not installed"
    out["ort-cuda-stock"] = out["ort-cuda"]
    for engine in ("trt", "trt-rtx"):
        module = "tensorrt" if engine == "trt" else "tensorrt_rtx"
        out[engine] = execution_blocker(engine) if available(engine) else f"{module} is not installed"
    return out


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
