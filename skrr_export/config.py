"""The commands' settings as frozen dataclasses, parsed from the command line (or a manifest) and read by every stage.
Torch-free: the CLI, the provenance record and verify build them without loading a model.

The field groups every command shares are stated once here and embedded (inherited, so their fields stay flat:
``cfg.model``, ``cfg.precision``) in each command's config: ``ModelOptions`` (where the encoder comes from) in the
main job's ``ExportConfig``, measure's ``MeasureConfig`` and calibrate's ``CalibrationConfig``; ``ExportForm`` (what
the exported graph is) in the first two; the engine's builder settings (``EngineOptions``) are here too. Each field's
default is stated once, here; the CLI's flags take theirs from it (cli.py), and a recipe's settings are merged into
them once (recipes.merge_settings)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

ENGINES = ("onnx", "trt", "trt-rtx")
PRECISIONS = ("fp32", "fp16", "bf16")
INPUT_DTYPES = ("int64", "int32")
VARIANTS = ("dense", "plan")  # what measure compares: the dense model and the plan
# What a recipe sets: its export block's settings, and the mask its pipeline's call feeds (recipes.PipelineCall)
RECIPE_SETTINGS = ("precision", "input_dtype", "fixed_sequence", "batch", "sequence")
RECIPE_PIPELINE_SETTINGS = ("attention_mask",)


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """Where the encoder comes from (model.source_of resolves it): a local folder, never a hub name."""

    model: Path | None = None  # None: the embedded MiniLM
    subfolder: str | None = None  # of a diffusers pipeline folder, e.g. text_encoder_3
    random_weights: bool = False  # built from its config, seeded (model.RANDOM_WEIGHTS_SEED)
    allow_pickle: bool = False  # also .bin/.pt checkpoints: only with the user's explicit consent
    tokenizer: Path | None = None  # None: the model folder's own, or the one its pipeline pairs with the subfolder
    random_ids: bool = False  # seeded random token ids instead of a tokenizer (implied by random_weights)


@dataclass(frozen=True, kw_only=True)
class ExportForm:
    """What the exported graph is: its weights' precision, its inputs, how it stores its weights. A recipe ships
    the first three (RECIPE_SETTINGS) and the fourth from its pipeline's call."""

    precision: str = "fp32"
    input_dtype: str = "int64"  # of input_ids and attention_mask
    fixed_sequence: int | None = None  # None: a dynamic sequence axis (the batch stays dynamic either way)
    attention_mask: bool = True  # False: input_ids only, every position scored (SD3/FLUX T5; recipes.PipelineCall)
    external_data: bool | None = None  # None: automatic (above 2 GiB, and for an engine build)
    quantization: Any = None  # quantize.Quantization: weight-only int8 / int4 of the kept sub-blocks (quantize.py)


@dataclass(frozen=True)
class ShapeRange:
    min: int
    opt: int
    max: int

    def check(self, what: str) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise UserError(
                f"{what} profile min={self.min} opt={self.opt} max={self.max} must satisfy 1 <= min <= opt <= max"
            )

    @classmethod
    def parse(cls, text: str, what: str) -> ShapeRange:
        """'1,4,8' (min,opt,max) or '8' (fixed)."""
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise UserError(f"{what} must be N or MIN,OPT,MAX integers, got '{text}'") from None
        if len(values) == 1:
            values *= 3
        if len(values) != 3:
            raise UserError(f"{what} must be N or MIN,OPT,MAX, got '{text}'")
        shape = cls(*values)
        shape.check(what)
        return shape

    def check_fixed(self, text: str, fixed: int, fixed_by: str) -> None:
        """A profile asked for as ``text`` on a graph fixed at sequence ``fixed`` (``fixed_by``: what fixed it) must be
        that sequence: one that contradicts it is refused, never replaced."""
        if {self.min, self.opt, self.max} != {fixed}:
            raise UserError(f"--sequence {text}: {fixed_by} is fixed at sequence {fixed}; drop --sequence or export "
                            "again with another --fixed-sequence")


@dataclass(frozen=True)
class EngineOptions:
    """Builder settings, named as trtexec users know them."""

    batch: ShapeRange = ShapeRange(1, 1, 8)
    sequence: ShapeRange = ShapeRange(1, 128, 512)  # ignored for a fixed-sequence export
    workspace_mib: int | None = None  # --memPoolSize=workspace:N
    optimization_level: int | None = None  # --builderOptimizationLevel
    timing_cache: Path | None = None  # --timingCacheFile
    weight_streaming: bool = False  # --weightStreaming
    refit: bool = False  # --refit (REFIT_IDENTICAL: plain REFIT gives wrong results in TensorRT 11.3)
    strip_weights: bool = False  # --stripWeights
    hardware_compatibility: str | None = None  # trt: ampere_plus | same_compute_capability
    compute_capabilities: tuple[str, ...] = ()  # trt-rtx: sm75 sm80 sm86 sm89 sm120 ...
    version_compatible: bool = False  # --versionCompatible

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["timing_cache"] = str(self.timing_cache) if self.timing_cache else None
        return out


@dataclass(frozen=True, kw_only=True)
class ExportConfig(ExportForm, ModelOptions):
    """The main job's settings (pipeline.run_export)."""

    plan: Path
    out: Path
    engine: str = "onnx"
    tolerance_overrides: dict[str, float] = field(default_factory=dict)  # --atol --rtol --min-cosine --max-token-error
    dense_distance: bool = True
    measure: bool = True  # with a CUDA device: memory and latency, dense vs plan (skrr-export measure's numbers)
    force: bool = False
    engine_options: Any = None  # trt.EngineOptions for --engine trt / trt-rtx
    recipe: Any = None  # recipes.Recipe whose checkpoint expectations the model must meet
    weight_streaming_budget: int | None = None
    optimize: str | None = None  # "ort": the ONNX Runtime-only fused variant (ort_fusion.py); never with an engine
    skip_memory_check: bool = False  # --skip-memory-check: run even when the estimate exceeds the available memory
    command: tuple[str, ...] = ()  # the command line's arguments, recorded in the manifest and the report (provenance)


@dataclass(frozen=True, kw_only=True)
class MeasureConfig(ExportForm, ModelOptions):
    """measure's settings; its ``ExportForm`` is the form of its own exports (a recipe's, as the main job would ship
    them); the main job's artifacts bring their own (read from the files)."""

    plan: Path
    out: Path
    precision: str = "bf16"  # measure's default (the form the recipes ship); the main job's is ExportForm's
    backends: tuple[str, ...] = ()  # empty: every backend that can run here
    batches: tuple[int, ...] = (1, 4)
    sequences: tuple[int, ...] = (256, 512)
    warmup: int = 3
    iterations: int = 20
    force: bool = False
    compile_dynamic: bool | None = None  # torch.compile's ``dynamic``; None: its default (recompile on new shapes)
    variants: tuple[str, ...] = VARIANTS  # which of dense and plan to measure
    parity: tuple[str, ...] = ("plan",)  # the variants whose every backend is checked against PyTorch on the device


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig(ModelOptions):
    """calibrate's settings (calibrate.calibrate)."""

    out: Path
    sparsities: tuple[float, ...]
    beam: int = 3
    prompts: Path | None = None
    num_prompts: int | None = None
    max_length: int = 256
    batch_size: int = 16  # at most; fewer when --max-memory needs it
    projection: Path | None = None
    device: str = "cpu"
    precision: str = "fp32"
    max_memory: int | None = None  # bytes of device memory the calibration may use (default: free minus a margin)
    naive: bool = False  # the reference method: every candidate runs the whole encoder
    pipeline: Any = None  # recipes.PipelineCall: how the pipeline calls the encoder (None: masked, real tokens scored)
    negative_prompt: str | None = None  # D's second term (None: the pipeline's declared one, else "")
    force: bool = False  # replace existing plan files
