"""What every encoder family adapter declares: where the sub-blocks live, how one slot runs, what comes out.

An adapter turns a Hugging Face model into three kinds of modules:
- a stem  ``(input_ids, attention_mask) -> (hidden, Context)``: embeddings and anything computed once,
- 2N sub-blocks ``(hidden, Context) -> hidden``: slot 2b is block b's attention, 2b+1 its feed-forward,
- a head ``(hidden, penultimate, Context) -> tuple of outputs``: final norm, pooling, projection.
Stem and head parameters are always kept; a sub-block owns its parameters minus the stem's and head's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..counts import Counting, Sizes


@dataclass
class Context:
    """Tensors computed once by the stem and read by every slot and the head."""

    input_ids: torch.Tensor
    mask: torch.Tensor | None  # additive attention mask; None: every position attends to every other
    position_bias: torch.Tensor | None = None


def padding_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(batch, seq) 1/0 mask -> additive (batch, 1, 1, seq) mask: 0 where attended, dtype's min elsewhere. None (the
    pipeline runs the encoder unmasked): None, and the graph has no mask path at all."""
    if attention_mask is None:
        return None
    keep = attention_mask.bool()[:, None, None, :]
    return torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)


def causal_padding_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype, input_ids: torch.Tensor) -> torch.Tensor:
    """Additive (batch, 1, seq, seq) mask combining causality and padding (causality alone without a padding mask:
    (1, 1, seq, seq)), without -inf."""
    shaped = input_ids if attention_mask is None else attention_mask
    pos = torch.arange(shaped.shape[1], device=shaped.device)
    causal = pos[None, :] <= pos[:, None]
    keep = causal[None, None, :, :]
    if attention_mask is not None:
        keep = keep & attention_mask.bool()[:, None, None, :]
    return torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)


@dataclass(frozen=True)
class ModelInput:
    """One input of the encoder and of its exported graph: integers, shaped by ``axes``."""

    name: str
    optional: bool = False  # the module and the feeds built here use zeros when it is not given
    axes: tuple[str, ...] = ("batch", "sequence")


IDS_AND_MASK = (ModelInput("input_ids"), ModelInput("attention_mask"))
MASK = "attention_mask"


def without_mask(inputs: tuple[ModelInput, ...]) -> tuple[ModelInput, ...]:
    """The inputs of an export for a pipeline that runs the encoder unmasked (SD3, FLUX): no attention_mask."""
    return tuple(i for i in inputs if i.name != MASK)


def complete_feed(inputs: tuple[ModelInput, ...], feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feed`` with every one of ``inputs``, in their order: an optional one it lacks is zeros like input_ids;
    anything else it holds (a tokenizer's extra outputs) is left out."""
    missing = [i.name for i in inputs if not i.optional and i.name not in feed]
    if missing:
        raise KeyError(f"the feed has no {missing[0]}")
    return {i.name: feed[i.name] if i.name in feed else np.zeros_like(feed["input_ids"]) for i in inputs}


class Adapter:
    """Per-family knowledge, declared once. Subclasses fill in the class variables and the builders; what can be
    read from the config without torch (family, model types, sizes, the text tower, counts) is its ``counting``'s."""

    # The family's torch-free declaration: model types, sizes, the parameters and FLOPs of every part from the config
    # alone (for `inspect`); tests hold its counts equal to this adapter's meta-built modules.
    counting: ClassVar[Counting]
    # Module-name suffixes kept in fp32 when exporting fp16 (T5's FFN output projection overflows fp16).
    fp32_in_fp16: ClassVar[tuple[str, ...]] = ()
    # Checkpoint key prefixes that belong to other parts of a larger model (decoder, vision tower, pooler).
    foreign_prefixes: ClassVar[tuple[str, ...]] = ()
    # Prefixes a checkpoint may add to (or drop from) this model's parameter names.
    name_prefixes: ClassVar[tuple[str, ...]] = ()
    # The model type ONNX Runtime's transformer optimizer fuses this family's norms and GELU as (--optimize ort).
    ort_model_type: ClassVar[str] = "bert"
    # The inputs, in the order the module and the graph take them: required ones first, then optional ones.
    inputs: ClassVar[tuple[ModelInput, ...]] = IDS_AND_MASK

    def complete_feed(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return complete_feed(self.inputs, feed)

    @property
    def family(self) -> str:
        return self.counting.family

    @property
    def model_types(self) -> tuple[str, ...]:
        return self.counting.model_types

    def text_config(self, config: Any) -> Any:
        """The part of ``config`` that describes the text encoder (a composite config nests it)."""
        return self.counting.text_config(config)

    def sizes(self, config: Any) -> Sizes:
        return self.counting.sizes(config)

    def build(self, config: Any) -> nn.Module:
        raise NotImplementedError

    def num_blocks(self, config: Any) -> int:
        return self.sizes(config).blocks

    def output_names(self, config: Any) -> tuple[str, ...]:
        raise NotImplementedError

    def token_outputs(self, config: Any) -> tuple[str, ...]:
        """Outputs with a sequence axis, compared over real (unpadded) tokens only."""
        return tuple(n for n in self.output_names(config) if n.endswith("hidden_state"))

    def stem(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def sub_blocks(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def head(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError


class EmbeddingStem(nn.Module):
    """Token (and position) embeddings, then the additive attention mask: causal for CLIP, padding only else."""

    def __init__(self, embeddings: nn.Module, causal: bool):
        super().__init__()
        self.embeddings = embeddings
        self.causal = causal

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, Context]:
        hidden = self.embeddings(input_ids=input_ids)
        if self.causal:
            mask = causal_padding_mask(attention_mask, hidden.dtype, input_ids)
        else:
            mask = padding_mask(attention_mask, hidden.dtype)
        return hidden, Context(input_ids=input_ids, mask=mask)


class Residual(nn.Module):
    """Pre-norm residual sub-block: ``h + body(norm(h))``; the body gets the context when it wants it."""

    def __init__(self, norm: nn.Module, body: nn.Module, attention: bool):
        super().__init__()
        self.norm = norm
        self.body = body
        self.attention = attention

    def forward(self, hidden: torch.Tensor, ctx: Context) -> torch.Tensor:
        x = self.norm(hidden)
        if self.attention:
            x = self.body(hidden_states=x, attention_mask=ctx.mask)[0]
        else:
            x = self.body(x)
        return hidden + x
