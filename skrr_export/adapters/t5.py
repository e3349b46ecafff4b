"""T5 and UMT5 encoders: ``encoder.block[b].layer[0]`` = norm + attention + residual, ``layer[1]`` = norm + FFN."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..counts import T5Counting, UMT5Counting
from .base import Adapter, Context, padding_mask


class T5Stem(nn.Module):
    """Token embedding, padding mask and (T5 only) the relative-position bias, computed once.

    Hugging Face computes the bias in block 0's attention and hands it down the stack; any other block
    makes a zero bias when given none. Computing it here from block 0's table keeps position information
    whichever attention slots the plan skips or re-uses.
    """

    def __init__(self, embed: nn.Embedding, bias_attention: nn.Module | None):
        super().__init__()
        self.embed = embed
        self.relative_attention_bias = bias_attention.relative_attention_bias if bias_attention else None
        self._bucket = bias_attention._relative_position_bucket if bias_attention else None
        if bias_attention is not None:
            self.num_buckets = bias_attention.relative_attention_num_buckets
            self.max_distance = bias_attention.relative_attention_max_distance

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, Context]:
        hidden = self.embed(input_ids)
        ctx = Context(input_ids=input_ids, mask=padding_mask(attention_mask, hidden.dtype))
        if self.relative_attention_bias is not None:
            ctx.position_bias = self._position_bias(input_ids.shape[1], input_ids.device)
        return hidden, ctx

    def _position_bias(self, seq: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(seq, dtype=torch.long, device=device)
        buckets = self._bucket(pos[None, :] - pos[:, None], True, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    def __init__(self, layer: nn.Module, shared_bias: bool):
        super().__init__()
        self.layer = layer
        self.shared_bias = shared_bias

    def forward(self, hidden: torch.Tensor, ctx: Context) -> torch.Tensor:
        if self.shared_bias:  # T5: one bias for every slot
            return self.layer(hidden, attention_mask=ctx.mask, position_bias=ctx.position_bias)[0]
        return self.layer(hidden, attention_mask=ctx.mask)[0]  # UMT5: each layer owns its table


class T5FeedForward(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.layer(hidden)


class T5Head(nn.Module):
    def __init__(self, final_norm: nn.Module):
        super().__init__()
        self.final_layer_norm = final_norm

    def forward(self, hidden: torch.Tensor, penultimate: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, ...]:
        return (self.final_layer_norm(hidden),)


class T5Adapter(Adapter):
    fp32_in_fp16 = ("wo",)
    ort_model_type = "t5"  # RMSNorm: SkipSimplifiedLayerNormalization
    foreign_prefixes = ("decoder.", "lm_head.")
    counting: ClassVar[T5Counting] = T5Counting()

    def build(self, config: Any) -> nn.Module:
        from transformers import T5EncoderModel

        return T5EncoderModel(config)

    def output_names(self, config: Any) -> tuple[str, ...]:
        return ("last_hidden_state",)

    def stem(self, model: nn.Module) -> nn.Module:
        bias_attention = model.encoder.block[0].layer[0].SelfAttention if self.counting.shared_bias else None
        return T5Stem(model.shared, bias_attention)

    def sub_blocks(self, model: nn.Module) -> list[nn.Module]:
        out: list[nn.Module] = []
        for block in model.encoder.block:
            out += [T5Attention(block.layer[0], self.counting.shared_bias), T5FeedForward(block.layer[-1])]
        return out

    def head(self, model: nn.Module) -> nn.Module:
        return T5Head(model.encoder.final_layer_norm)


class UMT5Adapter(T5Adapter):
    counting: ClassVar[T5Counting] = UMT5Counting()

    def build(self, config: Any) -> nn.Module:
        from transformers import UMT5EncoderModel

        return UMT5EncoderModel(config)
