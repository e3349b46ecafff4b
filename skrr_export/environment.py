"""The environment: skrr-export's version, Python's and the main libraries' (recorded by every report), and
whether torch sees a CUDA device. Torch-free at import."""

from __future__ import annotations

LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "onnx-ir")
TRT_PACKAGES = ("tensorrt", "tensorrt-rtx")


def versions(all_backends: bool = False) -> dict[str, str]:
    """skrr-export's version, Python's and the main libraries' (from package metadata: nothing is imported).
    ``all_backends`` also lists the TensorRT packages, as 'not installed' where they are absent."""
    import importlib.metadata as md
    import platform

    from . import __version__

    out = {"skrr-export": __version__, "python": platform.python_version()}
    for package in LIBRARIES + TRT_PACKAGES:
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            if all_backends and package in TRT_PACKAGES:
                out[package] = "not installed"
    return out


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
