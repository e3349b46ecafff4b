"""workload: the shapes a forward runs at (checked against the model) and the FLOPs it executes there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import UserError


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


def check_values(batches: tuple[int, ...], sequences: tuple[int, ...], limit: int | None) -> None:
    """Positive sizes, and no sequence beyond the model's ``limit`` positions (None: no limit)."""
    for value, what in [(b, "batch size") for b in batches] + [(s, "sequence length") for s in sequences]:
        if value < 1:
            raise UserError(f"{what} must be a positive integer, got {value}")
    if limit is not None and max(sequences) > limit:
        raise UserError(f"sequence length {max(sequences)} exceeds this model's {limit} positions")


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
