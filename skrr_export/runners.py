"""One runner protocol for every backend: ``activate`` / ``bind`` / ``infer`` / ``deactivate``, usable as a
context manager.

``infer`` takes and returns named numpy arrays (bf16 outputs are widened to fp32, exactly, for comparison).
``bind`` places a feed on the runner's device once and returns a ``Bound`` whose ``run`` is one forward on
device-resident inputs and outputs, synchronized: what a latency or memory measurement should time.
The comparator and the benchmarks know only this protocol.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from .artifacts import check_onnx_files
from .errors import ArtifactError, MissingDependencyError
from .graph import passes
from .graph.read import model_referencing_weights

Feed = dict[str, np.ndarray]


class Bound(Protocol):
    def run(self) -> None:
        """One forward on the bound inputs; returns when the device has finished it."""

    def outputs(self) -> Feed:
        """The last run's outputs, copied to the host."""


class Runner:
    name = "runner"

    def __init__(self) -> None:
        self.active = False

    def activate(self) -> Runner:
        if not self.active:
            self.activate_impl()
            self.active = True
        return self

    def bind(self, feed: Feed) -> Bound:
        self._check_active("bind")
        return self.bind_impl(feed)

    def infer(self, feed: Feed) -> Feed:
        self._check_active("infer")
        return self.infer_impl(feed)

    def _check_active(self, what: str) -> None:
        if not self.active:
            raise RuntimeError(f"{self.name}: call activate() (or use it as a context manager) before {what}()")

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

    def bind_impl(self, feed: Feed) -> Bound:
        raise NotImplementedError

    def infer_impl(self, feed: Feed) -> Feed:
        bound = self.bind_impl(feed)
        bound.run()
        return bound.outputs()

    def deactivate_impl(self) -> None:
        pass


def to_numpy(tensor: Any) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


class TorchRunner(Runner):
    """Runs a module taking the inputs its ``input_names`` name, positionally, and returning a tuple of outputs."""

    name = "pytorch"

    def __init__(self, module: Any, output_names: tuple[str, ...], device: str = "cpu", name: str = "pytorch"):
        super().__init__()
        self.name = name
        self.module = module
        self.output_names = output_names
        self.device = device

    def bind_impl(self, feed: Feed) -> Bound:
        return _TorchBound(self, feed)


class _TorchBound:
    def __init__(self, runner: TorchRunner, feed: Feed):
        import torch

        self.runner = runner
        self.inputs = [torch.from_numpy(feed[k]).to(runner.device) for k in runner.module.input_names]
        self.result: tuple[Any, ...] = ()
        self.cuda = torch.device(runner.device).type == "cuda"

    def run(self) -> None:
        import torch

        self.result = ()  # the previous outputs are freed first, as a serving loop would
        with torch.no_grad():
            self.result = tuple(self.runner.module(*self.inputs))
        if self.cuda:
            torch.cuda.synchronize()

    def outputs(self) -> Feed:
        return {n: to_numpy(t) for n, t in zip(self.runner.output_names, self.result)}


# CUDA EP settings. TF32 off: parity needs exact fp32 matmuls. The arena grows by what is asked for instead of
# the next power of two, and initializers bypass the arena, so weights are not rounded up into arena chunks.
CUDA_PROVIDER_OPTIONS = {"use_tf32": "0", "arena_extend_strategy": "kSameAsRequested"}
# Weight-only int4 graphs (quantize.py): ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits, which by default
# quantizes the activations to int8 on the CPU (accuracy level 4; on MiniLM int4: max abs 0.06, token error 0.045 against
# the same dequantized weights, 2e-6 at level 1). Level 1 computes in fp32: what parity checks is the graph's wiring.
EXACT_MATMUL_NBITS = {"session.qdq_matmulnbits_accuracy_level": "1"}
CUDA_SESSION_CONFIG = {"session.use_device_allocator_for_initializers": "1"} | EXACT_MATMUL_NBITS


class OrtRunner(Runner):
    """ONNX Runtime session on the CPU or the CUDA execution provider (settings above, overridable)."""

    name = "onnxruntime"

    def __init__(self, path: Path, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                 cuda_options: dict[str, str] | None = None, session_config: dict[str, str] | None = None,
                 profile_prefix: Path | None = None):
        super().__init__()
        self.path = path
        self.providers = providers
        self.cuda = "CUDAExecutionProvider" in providers
        self.cuda_options = CUDA_PROVIDER_OPTIONS if cuda_options is None else cuda_options
        self.session_config = (CUDA_SESSION_CONFIG if self.cuda else EXACT_MATMUL_NBITS) if session_config is None else session_config
        self.profile_prefix = profile_prefix  # profile the first run (node placement), then stop profiling
        self.session: Any = None
        if self.cuda:
            self.name = "onnxruntime-cuda"

    def activate_impl(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("onnxruntime", "onnx", "running the ONNX model") from None
        self.check_files()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.configure(opts)
        for key, value in self.session_config.items():
            opts.add_session_config_entry(key, value)
        if self.profile_prefix is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(self.profile_prefix)
        providers: list[Any] = [
            (p, dict(self.cuda_options)) if p == "CUDAExecutionProvider" else p for p in self.providers
        ]
        path = self.session_path()
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ArtifactError(f"ONNX Runtime cannot load {self.path.name}: {str(exc).splitlines()[0]}") from None

        if self.cuda and "CUDAExecutionProvider" not in self.session.get_providers():
            raise ArtifactError(f"ONNX Runtime did not enable its CUDA provider for {self.path.name} "
                                f"(it has {', '.join(ort.get_available_providers())}); install onnxruntime-gpu")

    def check_files(self) -> None:
        """The model file and its data files are there and readable (a one-line error otherwise)."""
        check_onnx_files(self.path)

    def configure(self, opts: Any) -> None:
        """Subclasses adjust the session options here."""

    def session_path(self) -> Path:
        """The file the session loads (subclasses may run a rewritten copy)."""
        return self.path

    def bind_impl(self, feed: Feed) -> Bound:
        return _OrtBound(self.session, feed, "cuda" if self.cuda else "cpu")

    def end_profiling(self) -> Path | None:
        """Stop profiling; the JSON trace of the runs so far (None when profiling was off)."""
        if self.profile_prefix is None or self.session is None:
            return None
        return Path(self.session.end_profiling())

    def deactivate_impl(self) -> None:
        self.session = None


class OrtFp32ArithmeticRunner(OrtRunner):
    """A half-precision (bf16 or fp16) graph run by ONNX Runtime's CPU provider in fp32 arithmetic. The CPU provider
    has no bf16 kernels, and its fp16 kernels round differently from PyTorch's (on a 24-block T5 of T5-base width
    with random weights, fp16 outputs of a correct export differed as much as a miswired one's: benchmarks/README.md),
    so a copy of the graph computes in fp32 on the half-precision weights. Each weight stays stored once in its
    precision and is widened by a Cast just before each node that reads it; Casts to the half precision and half
    values become fp32. Graph optimizations are off, so ONNX Runtime does not fold those Casts into fp32 copies of
    the weights: memory stays near the stored weights. Its reference is PyTorch computing in fp32 on the same
    weights (``apply.computed_in_fp32``). What it checks: the graph's wiring and operators, not half-precision
    rounding (which the CUDA provider and the engines check where a GPU is)."""

    name = "onnxruntime-cpu-fp32-arithmetic"
    rewrite = "fp32-arithmetic"  # what the copy computes (graph.passes)

    def __init__(self, path: Path, precision: str = "bf16"):
        super().__init__(path)
        self.precision = precision
        self.copy = path.with_name(f".{path.stem}.fp32-arithmetic.onnx")  # beside it: external data resolves

    @staticmethod
    def method(precision: str) -> str:
        return (f"the {precision} graph computed in fp32 arithmetic on its {precision} weights (ONNX Runtime CPU, "
                "a rewritten copy), against PyTorch computing in fp32 on the same weights")

    def check_files(self) -> None:
        """Checked by ``session_path``'s reader, which reads the small fields only (not the weights)."""

    def configure(self, opts: Any) -> None:
        import onnxruntime as ort

        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.enable_cpu_mem_arena = False  # each widened weight goes back when its node is done, not to an arena

    def session_path(self) -> Path:
        """The rewritten copy, beside the original: its weights are references to the original's bytes (inside
        model.onnx or in its data file), so neither this process nor the file holds a second copy of them."""
        model = model_referencing_weights(self.path)
        passes.run(model, self.rewrite)
        ir.save(model, os.fspath(self.copy))
        return self.copy

    def deactivate_impl(self) -> None:
        super().deactivate_impl()
        self.copy.unlink(missing_ok=True)


class OrtHalfEmulationRunner(OrtFp32ArithmeticRunner):
    """A half-precision graph run on ONNX Runtime's CPU provider as it computes on a runtime with half kernels: each
    node in fp32, its result rounded to bf16/fp16 exactly where the graph stores a half tensor (fp32 tensors, such as
    T5's fp16 ``wo`` path, stay fp32). Its reference is PyTorch running the module in that precision. What it checks:
    that the graph's own storage precision computes what PyTorch's does (a round trip through fp16 inside an RMSNorm,
    a node that overflows), which the fp32-arithmetic check cannot see."""

    name = "onnxruntime-cpu-half-emulation"
    rewrite = "half-emulation"

    def __init__(self, path: Path, precision: str = "bf16"):
        super().__init__(path, precision)
        self.copy = path.with_name(f".{path.stem}.half-emulation.onnx")

    @staticmethod
    def method(precision: str) -> str:
        return (f"the {precision} graph as stored: each node computed in fp32 and rounded to {precision} where the graph "
                f"stores {precision} (ONNX Runtime CPU, a rewritten copy), against PyTorch computing in {precision}")


class _OrtBound:
    """IO binding: inputs copied to the device once, outputs left where the provider produced them."""

    def __init__(self, session: Any, feed: Feed, device: str):
        import onnxruntime as ort

        self.session = session
        self.binding = session.io_binding()
        self.values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feed[i.name]), device, 0)
                       for i in session.get_inputs()]
        for i, value in zip(session.get_inputs(), self.values):
            self.binding.bind_ortvalue_input(i.name, value)
        self.types = {o.name: o.type for o in session.get_outputs()}
        for name in self.types:
            self.binding.bind_output(name, device, 0)

    def run(self) -> None:
        try:
            self.session.run_with_iobinding(self.binding)  # synchronizes the provider's stream before it returns
        except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types
            raise ArtifactError(f"ONNX Runtime failed to run the model: {str(exc).splitlines()[0]}") from None

    def outputs(self) -> Feed:
        out = {}
        values = self.binding.get_outputs_as_ortvaluevector()
        for (name, onnx_type), value in zip(self.types.items(), values):
            if onnx_type == "tensor(bfloat16)":  # numpy has no bf16: hand the tensor to torch, which widens exactly
                import torch

                out[name] = to_numpy(torch.from_dlpack(value.to_dlpack()))
            else:
                out[name] = value.numpy()
        return out
