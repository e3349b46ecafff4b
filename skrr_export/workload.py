"""workload: the shapes a forward runs at (checked against the model, and against what an artifact takes: its
inputs' dtypes and fixed sizes, read from the ONNX or the engine's metadata) and the FLOPs it executes there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .counts import check_values


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.seq}"


def check_shapes(config: Any, batches: tuple[int, ...], sequences: tuple[int, ...]) -> list[Shape]:
    """Every (batch, sequence) pair, smallest first; sequences beyond the model's positions are refused."""
    from .adapters import sizes_of

    check_values(batches, sequences, sizes_of(config).positions)
    return sorted((Shape(b, s) for b in dict.fromkeys(batches) for s in dict.fromkeys(sequences)),
                  key=lambda sh: (sh.batch * sh.seq, sh.batch))


def default_sequence(config: Any, preferred: int) -> int:
    """``preferred`` tokens, or fewer where the model has fewer positions."""
    from .adapters import sizes_of

    limit = sizes_of(config).positions
    return min(preferred, limit or preferred)


def executed_flops(meta_encoder: Any, plan: Any, shape: Shape) -> int:
    """FLOPs of one forward of ``plan`` at ``shape``, counted by torch's FlopCounterMode on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .apply import SkrrEncoder

    module = SkrrEncoder(meta_encoder, plan)
    ids = torch.zeros(shape.batch, shape.seq, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(ids, torch.ones_like(ids))
    return int(counter.get_total_flops())


# TensorRT's names for the integer dtypes an engine's inputs can have (engine.json "inputs"), as numpy names.
ENGINE_DTYPES = {"INT32": "int32", "INT64": "int64"}


@dataclass(frozen=True)
class InputForm:
    """What an artifact accepts, read from it: each input's name and integer dtype, in the artifact's order, and the
    batch sizes and sequence lengths its graph (or engine profile) allows, as (smallest, largest; None: no limit)."""

    source: str  # where it was read: "model.onnx", "engine.plan (its profile)", or "the export" (its options)
    dtypes: tuple[tuple[str, str], ...]
    batch: tuple[int, int | None] = (1, None)
    sequence: tuple[int, int | None] = (1, None)

    @property
    def takes_mask(self) -> bool:
        """Whether it takes attention_mask (SD3 and FLUX exports of T5 take input_ids only)."""
        return any(name == "attention_mask" for name, _ in self.dtypes)

    @property
    def fixed_sequence(self) -> int | None:
        low, high = self.sequence
        return low if low == high else None

    def refusal(self, batch: int, seq: int) -> str | None:
        """Why this artifact cannot take a ``batch`` x ``seq`` feed (None: it can)."""
        for value, (low, high), what in ((batch, self.batch, "batch size"), (seq, self.sequence, "sequence length")):
            if value < low or (high is not None and value > high):
                allowed = f"only {low}" if low == high else f"{low} to {high if high is not None else 'any'}"
                return f"{self.source} takes {what} {allowed}, not {value}"
        return None

    def fit(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feed`` as the artifact takes it: its inputs only, in its order, each in its dtype (KeyError: one lacking)."""
        return {name: feed[name].astype(dtype, copy=False) for name, dtype in self.dtypes}

    def differences(self, other: InputForm) -> list[str]:
        """What ``other`` says differently: its inputs' names, their dtypes, batch and sequence."""
        mine, theirs = dict(self.dtypes), dict(other.dtypes)
        found = [f"inputs: {', '.join(mine)} vs {', '.join(theirs)}"] if set(mine) != set(theirs) else []
        found += [f"{name}: {mine[name]} vs {dtype}" for name, dtype in theirs.items() if name in mine and mine[name] != dtype]
        return found + [f"{what}: {a} vs {b}" for what, a, b in (("batch", self.batch, other.batch),
                                                               ("sequence", self.sequence, other.sequence)) if a != b]


def shapes_taken(form: InputForm, shapes: list[Shape]) -> tuple[list[Shape], dict[Shape, str]]:
    """The shapes ``form`` takes, in their order, and the reason for each it refuses."""
    refused = {shape: reason for shape in shapes if (reason := form.refusal(shape.batch, shape.seq))}
    return [shape for shape in shapes if shape not in refused], refused


def planned_form(names: tuple[str, ...], input_dtype: str, fixed_sequence: int | None) -> InputForm:
    """The form an export with these options takes (``export.ExportOptions``: one dtype, batch always dynamic)."""
    sequence = (fixed_sequence, fixed_sequence) if fixed_sequence else (1, None)
    return InputForm("the export", tuple((n, input_dtype) for n in names), sequence=sequence)


def onnx_input_form(path: Path) -> InputForm:
    """An ONNX file's graph inputs (read without its external data): dtypes, and axis 0 (batch) and axis 1
    (sequence) of input_ids, fixed where the graph gives a size, dynamic where it gives a name or nothing."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    dtypes = tuple((i.name, onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name) for i in inputs)
    dims = next(i for i in inputs if i.name == "input_ids").type.tensor_type.shape.dim
    batch, seq = ((d.dim_value, d.dim_value) if d.dim_value > 0 else (1, None) for d in dims)
    return InputForm(path.name, dtypes, batch, seq)


def engine_input_form(engine: Path, metadata: dict[str, Any]) -> InputForm:
    """A TensorRT engine's inputs from its metadata (``trt.build_engine``'s engine.json): dtypes, and the batch and
    sequence ranges of its optimization profile (min and max of input_ids)."""
    dtypes = tuple((i["name"], ENGINE_DTYPES.get(i["dtype"], i["dtype"].lower())) for i in metadata["inputs"])
    low, _, high = metadata["profiles"][0]["input_ids"]
    return InputForm(f"{engine.name} (its profile)", dtypes, (low[0], high[0]), (low[1], high[1]))
