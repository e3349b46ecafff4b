"""The main job's settings: one frozen ExportConfig, parsed from the command line (or a manifest) and read by every
stage. Torch-free: the CLI, the provenance record and verify build it without loading a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENGINES = ("onnx", "trt", "trt-rtx")


@dataclass(frozen=True)
class ExportConfig:
    plan: Path
    out: Path
    model: Path | None = None  # None: the embedded MiniLM
    subfolder: str | None = None
    random_weights: bool = False
    allow_pickle: bool = False
    tokenizer: Path | None = None  # None: the model folder's own, or the one its pipeline pairs with the subfolder
    random_ids: bool = False  # seeded random token ids instead of a tokenizer (implied by random_weights)
    engine: str = "onnx"
    precision: str = "fp32"
    input_dtype: str = "int64"
    fixed_sequence: int | None = None
    external_data: bool | None = None
    tolerance_overrides: dict[str, float] = field(default_factory=dict)  # --atol --rtol --min-cosine --max-token-error
    dense_distance: bool = True
    measure: bool = True  # with a CUDA device: memory and latency, dense vs plan (skrr-export measure's numbers)
    force: bool = False
    engine_options: Any = None  # trt.EngineOptions for --engine trt / trt-rtx
    recipe: Any = None  # recipes.Recipe whose checkpoint expectations the model must meet
    weight_streaming_budget: int | None = None
    quantization: Any = None  # quantize.Quantization: weight-only int8 / int4 of the kept sub-blocks (quantize.py)
    optimize: str | None = None  # "ort": the ONNX Runtime-only fused variant (ort_fusion.py); never with an engine
    attention_mask: bool = True  # False: input_ids only, every position scored (SD3/FLUX T5; recipes.PipelineCall)
    skip_memory_check: bool = False  # --skip-memory-check: run even when the estimate exceeds the available memory
    command: tuple[str, ...] = ()  # the command line's arguments, recorded in the manifest and the report (provenance)
