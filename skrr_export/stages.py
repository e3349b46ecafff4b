"""The one chain of stages every job runs on a model: load_source -> apply (apply_plan, then quantize) -> export ->
build, each a plain function returning its artifact, and what the main job's stages hold (``host_footprint``).

The main job (pipeline), measure and calibrate call these; each passes its own ``stage`` timer (a context manager
per stage name: pipeline's progress bar and report seconds, measure's stage rows). The footprint rule itself
(``artifacts.need``, ``artifacts.disk_need``) sits with the checks that apply it, so every layer uses the one rule.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import artifacts
from .artifacts import need
from .config import EngineOptions, ExportForm
from .errors import ArtifactError
from .plan import Plan
from .units import size

log = logging.getLogger("skrr_export")

Timer = Callable[[str], AbstractContextManager[Any]]


def untimed(name: str) -> AbstractContextManager[Any]:
    return nullcontext()


# ----------------------------------------------------------------------------------------------- the chain


@dataclass
class Applied:
    """The plan applied to the loaded encoder (and quantized): what PyTorch runs as the reference and the export
    writes."""

    enc: Any  # model.Encoder: the kept weights (the rest stays on the meta device)
    module: Any  # apply.SkrrEncoder; quantized, it computes with the dequantized weights (the parity reference)
    quantized: Any = None  # quantize.QuantizedWeights: the integers and scales the export stores
    quantization: dict[str, Any] | None = None  # what was quantized and what was not, with bytes (the report's)

    @property
    def vocab(self) -> int:
        return int(self.enc.adapter.sizes(self.enc.config).vocab)


def load_source(source: Any, plan: Plan, precision: str, stage: Timer = untimed) -> Any:
    """The encoder with only the kept weights read, in ``precision`` (model.load_encoder)."""
    from .model import load_encoder

    with stage("load"):
        return load_encoder(source, plan, precision)


def apply(enc: Any, plan: Plan, form: ExportForm, stage: Timer = untimed) -> Applied:
    """``plan`` applied to ``enc`` with the inputs ``form`` takes (the mask or not), then quantized as ``form`` says."""
    from .apply import apply_plan

    with stage("apply"):
        module = apply_plan(enc, plan, form.attention_mask)
    if form.quantization is None:
        return Applied(enc, module)
    from .quantize import module_accounting, quantize_module

    with stage("quantize"):
        quantized = quantize_module(module, form.quantization)
    return Applied(enc, module, quantized, module_accounting(module, quantized))


def load_applied(source: Any, plan: Plan, form: ExportForm, stage: Timer = untimed) -> Applied:
    """load_source -> apply: what every job that runs or exports the plan starts from."""
    return apply(load_source(source, plan, form.precision, stage), plan, form, stage)


def export_options(form: ExportForm, mapped: bool = False) -> Any:
    """How the export writes ``form`` (export.ExportOptions). ``mapped``: a later stage maps the weights from their
    own file (an engine build, a fused copy), so they are stored externally unless ``form`` says otherwise."""
    from .export import ExportOptions

    return ExportOptions(form.input_dtype, form.fixed_sequence, True if form.external_data is None and mapped
                         else form.external_data)


def export(applied: Applied, path: Path, options: Any) -> Any:
    """The ONNX of ``applied`` at ``path`` (export.OnnxArtifact), written as ``options`` (``export_options``) say."""
    from .export import export_onnx

    return export_onnx(applied.module, path, options, applied.vocab, applied.quantized)


def build(onnx_path: Path, engine: str, options: EngineOptions, path: Path, provenance: dict[str, Any]) -> Any:
    """The engine (trt.EngineArtifact) of ``onnx_path`` at ``path``; what earlier stages left is released first."""
    from .trt import build_engine

    release_memory()  # the PyTorch module and the parity sessions are gone: the build starts at the floor
    return build_engine(onnx_path, engine, options, path, provenance)


def release_memory() -> None:
    """Collect what the dropped stages left and hand glibc's free heap back to the system (malloc_trim), so the
    next stage's peak adds to the floor rather than to the earlier stages' high-water heap."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# ----------------------------------------------------------------------------------------------- the footprint rule


def host_footprint(meta: Any, plan: Plan, cost: Any, form: ExportForm, dense_distance: bool, engine: str,
                   engine_options: EngineOptions | None) -> dict[str, int]:
    """The weight bytes each stage of the main job holds in host memory at its peak: the kept weights (load,
    export; then ONNX Runtime's copy once the module is dropped), the dense distance's stem, head and largest
    sub-block (streamed one at a time), and the engine build. ``meta``: the model on the meta device, its dtype
    set to the export's; ``cost``: ``apply.plan_cost(meta, plan)``."""
    from .apply import sub_block_parameters

    itemsize = meta.dtype.itemsize
    kept = cost.kept_weight_bytes
    largest_sub_block = max(sum(p.numel() for _, p in block) for block in sub_block_parameters(meta)) * itemsize
    always = sum(p.numel() for part in (meta.stem, meta.head) for p in part.parameters()) * itemsize
    held = {"load and export": kept, "dense distance": always + largest_sub_block if dense_distance else 0}
    if engine != "onnx":
        from .quantize import plan_accounting
        from .trt import build_memory

        exported = plan_accounting(meta, plan, form.quantization)["total_bytes"] if form.quantization else kept
        held["engine build"] = build_memory(exported, engine_options)
    return held


def check_footprint(held: dict[str, int], skip: bool) -> None:
    """Print the estimate (the largest stage's ``need``) before any work; refuse, with both numbers, when the
    machine cannot hold it (``skip``: --skip-memory-check)."""
    stage = max(held, key=lambda k: held[k])
    needed = need(held[stage])
    free = artifacts.available_memory()
    have = f"{size(free, 'GiB', 1)} available" if free is not None else "available memory unknown"
    log.info("memory estimate: %s at the peak (%s; %s), %s", size(needed, "GiB", 1), stage,
             ", ".join(f"{k} {size(v, 'GiB')}" for k, v in held.items() if v), have)
    if free is not None and needed > free and not skip:
        raise ArtifactError(f"this run needs about {size(needed, 'GiB', 1)} of host memory but {size(free, 'GiB', 1)} "
                            f"is available (its peak: {stage}); free memory, use a bigger machine, or pass "
                            "--skip-memory-check to run anyway")
