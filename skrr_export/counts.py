"""Each family's torch-free declaration (``Counting``): its model types, where its sizes are, and what a plan keeps
and executes, counted from the model's config alone: no torch, no model built.

Each family declares, from its config, the parameters of its stem, head and every sub-block, and the matmul FLOPs of
each at a (batch, sequence) shape, counted as torch's FlopCounterMode counts them: 2*M*N*K for every mm, addmm, bmm
and baddbmm (a bias add, softmax, norm or activation counts nothing). ``skrr-export inspect`` reads these; tests
hold them equal, exactly, to the meta-built model's counts (``apply.plan_cost``, ``workload.executed_flops``), which
measure and the pipeline keep using. The adapters (``adapters/``, which need torch) read their family, model types,
sizes and text tower from their ``Adapter.counting``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .errors import ModelError, UserError

BYTES = {"fp32": ("float32", 4), "fp16": ("float16", 2), "bf16": ("bfloat16", 2)}  # --precision -> dtype, bytes


def mm(m: int, n: int, k: int) -> int:
    """FLOPs of an (m x k) @ (k x n) product, as torch counts them."""
    return 2 * m * n * k


@dataclass(frozen=True)
class Part:
    """The stem, the head or one sub-block: its own parameters and its matmul FLOPs at one shape."""

    params: int
    flops: int = 0
    fp32_params: int = 0  # of params: those an fp16 model keeps in fp32 (the adapter's fp32_in_fp16: T5's FFN wo)


@dataclass(frozen=True)
class Parts:
    stem: Part
    sub_blocks: tuple[Part, ...]  # slot 2b: block b's attention, 2b+1: its feed-forward
    head: Part


@dataclass(frozen=True)
class Sizes:
    """A family's sizes under one set of names (each config names them its own way)."""

    blocks: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    positions: int | None  # None: relative positions, no length limit


class Counting:
    """One family's declaration from its config, torch-free: its model types, where its sizes are (and the text
    tower's config in a composite one), and the parameters and FLOPs of its parts (subclasses: one per family).
    Stem and sub-blocks read the text tower's config; the head reads the whole one (CLIP: whether it is projected).
    The family's adapter (``adapters/``, torch) reads all of this from here."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    # The config attributes behind the fields of Sizes (positions None: the family has no length limit).
    size_names: ClassVar[dict[str, str]] = {"blocks": "num_hidden_layers", "hidden": "hidden_size",
                                            "heads": "num_attention_heads", "ffn": "intermediate_size",
                                            "vocab": "vocab_size"}
    positions_name: ClassVar[str | None] = "max_position_embeddings"

    def text_config(self, config: Any) -> Any:
        """The part of ``config`` that describes the text encoder (a composite config nests it)."""
        return config

    def sizes(self, config: Any) -> Sizes:
        text = self.text_config(config)
        positions = int(getattr(text, self.positions_name)) if self.positions_name else None
        return Sizes(**{field: int(getattr(text, name)) for field, name in self.size_names.items()}, positions=positions)

    def num_blocks(self, config: Any) -> int:
        return self.sizes(config).blocks

    def positions(self, config: Any) -> int | None:
        """The longest sequence the model takes (None: no limit)."""
        return self.sizes(config).positions

    def parts(self, config: Any, batch: int, seq: int) -> Parts:
        text = self.text_config(config)
        attention, ffn = self.attention(text, batch, seq), self.ffn(text, batch, seq)
        return Parts(self.stem(text, batch, seq), (attention, ffn) * self.num_blocks(config), self.head(config, batch, seq))

    def stem(self, text: Any, batch: int, seq: int) -> Part:
        raise NotImplementedError

    def attention(self, text: Any, batch: int, seq: int) -> Part:
        raise NotImplementedError

    def ffn(self, text: Any, batch: int, seq: int) -> Part:
        raise NotImplementedError

    def head(self, config: Any, batch: int, seq: int) -> Part:
        raise NotImplementedError


def scores_and_mix(batch: int, seq: int, inner: int) -> int:
    """Attention's two batched products over all heads: q @ k^T and weights @ v (heads x head width = ``inner``)."""
    return 2 * mm(batch * seq, seq, inner)


class T5Counting(Counting):
    """RMSNorm (weight only), bias-free q/k/v/o of width heads x d_kv, (gated) FFN; the relative-position table
    (buckets x heads) sits in block 0's attention and is counted with the stem, which computes the bias once."""

    family = "t5"
    model_types = ("t5",)
    size_names = {"blocks": "num_layers", "hidden": "d_model", "heads": "num_heads", "ffn": "d_ff", "vocab": "vocab_size"}
    positions_name = None  # relative positions: no length limit
    shared_bias = True  # T5: one relative-position table (block 0's) for every slot; UMT5: one per layer

    def stem(self, text: Any, batch: int, seq: int) -> Part:
        table = text.relative_attention_num_buckets * text.num_heads if self.shared_bias else 0
        return Part(text.vocab_size * text.d_model + table)

    def attention(self, text: Any, batch: int, seq: int) -> Part:
        d, inner = text.d_model, text.num_heads * text.d_kv
        table = 0 if self.shared_bias else text.relative_attention_num_buckets * text.num_heads  # UMT5: one per layer
        return Part(d + 4 * d * inner + table, 4 * mm(batch * seq, inner, d) + scores_and_mix(batch, seq, inner))

    def ffn(self, text: Any, batch: int, seq: int) -> Part:
        d, ff = text.d_model, text.d_ff
        inputs = 2 if text.is_gated_act else 1  # gated: wi_0 and wi_1, else wi
        return Part(d + (inputs + 1) * d * ff, (inputs + 1) * mm(batch * seq, ff, d), fp32_params=ff * d)

    def head(self, config: Any, batch: int, seq: int) -> Part:
        return Part(self.text_config(config).d_model)  # final RMSNorm


class UMT5Counting(T5Counting):
    family = "umt5"
    model_types = ("umt5",)
    shared_bias = False


def linear(d_in: int, d_out: int, bias: bool = True) -> int:
    return d_in * d_out + (d_out if bias else 0)


class ClipCounting(Counting):
    """Pre-norm LayerNorms (weight and bias), biased q/k/v/out and fc1/fc2, learned positions; the head's final norm
    and, for a projected model, its bias-free text projection of the pooled token."""

    family = "clip"
    model_types = ("clip_text_model", "clip")

    def text_config(self, config: Any) -> Any:
        return getattr(config, "text_config", config)  # a whole CLIPModel's config nests the text tower's

    @staticmethod
    def projected(config: Any) -> bool:
        return any("Projection" in a or a == "CLIPModel" for a in (config.architectures or []))

    def stem(self, text: Any, batch: int, seq: int) -> Part:
        return Part((text.vocab_size + text.max_position_embeddings) * text.hidden_size)

    def attention(self, text: Any, batch: int, seq: int) -> Part:
        d = text.hidden_size
        return Part(2 * d + 4 * linear(d, d), 4 * mm(batch * seq, d, d) + scores_and_mix(batch, seq, d))

    def ffn(self, text: Any, batch: int, seq: int) -> Part:
        d, ff = text.hidden_size, text.intermediate_size
        return Part(2 * d + linear(d, ff) + linear(ff, d), 2 * mm(batch * seq, ff, d))

    def head(self, config: Any, batch: int, seq: int) -> Part:
        text = self.text_config(config)
        d = text.hidden_size
        if not self.projected(config):
            return Part(2 * d)
        return Part(2 * d + linear(d, text.projection_dim, bias=False), mm(batch, text.projection_dim, d))


class BertCounting(Counting):
    """Post-norm: each sub-block ends in a LayerNorm; word, position and token-type embeddings and their LayerNorm in
    the stem; no pooler (the head is empty)."""

    family = "bert"
    model_types = ("bert",)

    def stem(self, text: Any, batch: int, seq: int) -> Part:
        d = text.hidden_size
        return Part((text.vocab_size + text.max_position_embeddings + text.type_vocab_size) * d + 2 * d)

    def attention(self, text: Any, batch: int, seq: int) -> Part:
        d = text.hidden_size
        return Part(4 * linear(d, d) + 2 * d, 4 * mm(batch * seq, d, d) + scores_and_mix(batch, seq, d))

    def ffn(self, text: Any, batch: int, seq: int) -> Part:
        d, ff = text.hidden_size, text.intermediate_size
        return Part(linear(d, ff) + linear(ff, d) + 2 * d, 2 * mm(batch * seq, ff, d))

    def head(self, config: Any, batch: int, seq: int) -> Part:
        return Part(0)


COUNTINGS: dict[str, Counting] = {c.family: c for c in (T5Counting(), UMT5Counting(), ClipCounting(), BertCounting())}


def counting_for(config: Any) -> Counting:
    model_type = getattr(config, "model_type", None)
    for counting in COUNTINGS.values():
        if model_type in counting.model_types:
            return counting
    known = ", ".join(t for c in COUNTINGS.values() for t in c.model_types)
    raise ModelError(f"model_type '{model_type}' has no adapter; supported model types: {known}")


def read_config(path: Path, subfolder: str | None = None) -> Any:
    """The config of the model folder ``path`` (or its config.json), read by transformers, which needs no torch for
    it. The same folder rule and message as ``model.load_config``."""
    from transformers import AutoConfig

    folder = (path.parent if path.is_file() else path) / (subfolder or "")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json; pass a local Hugging Face model folder (and --subfolder)")
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelError(f"cannot read {folder / 'config.json'}: {exc}") from None


@dataclass(frozen=True)
class PlanCost:
    """What a plan keeps and executes, from the model's structure alone (no weights needed)."""

    total_params: int
    kept_params: int
    total_bytes: dict[str, int]
    kept_bytes: dict[str, int]
    executed_slots: int
    num_slots: int
    compute_fraction: float  # executed sub-block parameters / all sub-block parameters (a FLOP proxy)

    @property
    def sparsity(self) -> float:
        """The paper's definition: parameters removed / all encoder parameters, embeddings included."""
        return (self.total_params - self.kept_params) / self.total_params

    @property
    def kept_weight_bytes(self) -> int:
        return sum(self.kept_bytes.values())


@dataclass(frozen=True)
class Cost(PlanCost):
    """``PlanCost`` from the config, with the plan's and the dense model's matmul FLOPs at one shape."""

    flops: int
    dense_flops: int


def plan_cost(config: Any, plan: Any, precision: str, batch: int, seq: int) -> Cost:
    """What ``plan`` keeps (parameters, bytes in ``precision``) and executes (sub-blocks, FLOPs at batch x seq)."""
    counting = counting_for(config)
    plan.check_fits(counting.family, counting.num_blocks(config))
    parts = counting.parts(config, batch, seq)
    always = [parts.stem, parts.head]
    kept = always + [parts.sub_blocks[i] for i in sorted(set(plan.kept))]
    executed = [parts.sub_blocks[src] for _, src in plan.schedule()]
    sizes = [p.params for p in parts.sub_blocks]
    return Cost(
        total_params=sum(p.params for p in always + list(parts.sub_blocks)),
        kept_params=sum(p.params for p in kept),
        total_bytes=part_bytes(always + list(parts.sub_blocks), precision),
        kept_bytes=part_bytes(kept, precision),
        executed_slots=len(executed),
        num_slots=plan.num_slots,
        compute_fraction=sum(p.params for p in executed) / sum(sizes),
        flops=sum(p.flops for p in always + executed),
        dense_flops=sum(p.flops for p in always + list(parts.sub_blocks)),
    )


def part_bytes(parts: list[Part], precision: str) -> dict[str, int]:
    """Bytes by dtype name; fp16 keeps the family's fp32 parameters in float32 (a dtype with no bytes is left out)."""
    dtype, size = BYTES[precision]
    wide = sum(p.fp32_params for p in parts) if precision == "fp16" else 0
    out = {dtype: (sum(p.params for p in parts) - wide) * size}
    if wide:
        out["float32"] = wide * 4
    return {k: v for k, v in out.items() if v}


def inspect_shape(config: Any, shape: tuple[int, int] | None) -> tuple[int, int]:
    """``shape`` (batch, sequence), or batch 1 and 256 tokens (fewer where the model has fewer positions); checked as
    ``workload.check_shapes`` checks it."""
    limit = counting_for(config).positions(config)
    batch, seq = shape or (1, min(256, limit or 256))
    check_values((batch,), (seq,), limit)
    return batch, seq


def check_values(batches: tuple[int, ...], sequences: tuple[int, ...], limit: int | None) -> None:
    """Positive sizes, and no sequence beyond the model's ``limit`` positions (None: no limit)."""
    for value, what in [(b, "batch size") for b in batches] + [(s, "sequence length") for s in sequences]:
        if value < 1:
            raise UserError(f"{what} must be a positive integer, got {value}")
    if limit is not None and max(sequences) > limit:
        raise UserError(f"sequence length {max(sequences)} exceeds this model's {limit} positions")
