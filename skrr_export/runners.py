"""One runner protocol for every backend: ``activate`` / ``infer`` / ``deactivate``, usable as a context manager.

``infer`` takes and returns named numpy arrays (bf16 outputs are widened to fp32 for comparison).
The comparator and the benchmarks know only this protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError, MissingDependencyError

Feed = dict[str, np.ndarray]


class Runner:
    name = "runner"

    def __init__(self) -> None:
        self.active = False

    def activate(self) -> Runner:
        if not self.active:
            self.activate_impl()
            self.active = True
        return self

    def infer(self, feed: Feed) -> Feed:
        if not self.active:
            raise RuntimeError(f"{self.name}: call activate() (or use it as a context manager) before infer()")
        return self.infer_impl(feed)

    def deactivate(self) -> None:
        if self.active:
            self.deactivate_impl()
            self.active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def activate_impl(self) -> None:
        pass

    def infer_impl(self, feed: Feed) -> Feed:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        pass


def to_numpy(tensor: Any) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


class TorchRunner(Runner):
    """Runs a module taking ``(input_ids, attention_mask)`` and returning a tuple of outputs."""

    name = "pytorch"

    def __init__(self, module: Any, output_names: tuple[str, ...], device: str = "cpu"):
        super().__init__()
        self.module = module
        self.output_names = output_names
        self.device = device

    def infer_impl(self, feed: Feed) -> Feed:
        import torch

        with torch.no_grad():
            ids = torch.from_numpy(feed["input_ids"]).to(self.device)
            mask = torch.from_numpy(feed["attention_mask"]).to(self.device)
            outputs = self.module(ids, mask)
        return {n: to_numpy(t) for n, t in zip(self.output_names, outputs)}


class OrtRunner(Runner):
    """ONNX Runtime session; CUDA EP with TF32 off when asked for (parity needs exact fp32 matmuls)."""

    name = "onnxruntime"

    def __init__(self, path: Path, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        super().__init__()
        self.path = path
        self.providers = providers
        self.session: Any = None

    def activate_impl(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("onnxruntime", "onnx", "running the ONNX model") from None
        check_onnx_files(self.path)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        providers: list[Any] = [
            (p, {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p for p in self.providers
        ]
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ArtifactError(f"ONNX Runtime cannot load {self.path.name}: {str(exc).splitlines()[0]}") from None

    def infer_impl(self, feed: Feed) -> Feed:
        names = [o.name for o in self.session.get_outputs()]
        inputs = {i.name: feed[i.name] for i in self.session.get_inputs()}
        return {n: np.asarray(v, dtype=np.float32) if v.dtype.kind == "V" else v for n, v in zip(names, self.session.run(names, inputs))}

    def deactivate_impl(self) -> None:
        self.session = None


def check_onnx_files(path: Path) -> None:
    """The ONNX file and every external data file it names must exist (and stay inside its folder)."""
    import onnx

    if not path.is_file():
        raise ArtifactError(f"{path} does not exist")
    model = onnx.load(str(path), load_external_data=False)
    folder = path.parent.resolve()
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in init.external_data}.get("location", "")
        target = (folder / location).resolve()
        if folder not in target.parents:
            raise ArtifactError(f"{path.name}: external data location '{location}' points outside {folder}")
        if not target.is_file():
            raise ArtifactError(f"{path.name} needs its external data file '{location}', which is missing beside it")
