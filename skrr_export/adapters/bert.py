"""BERT encoders (MiniLM included): post-norm sub-blocks, the norm sits after the residual inside each."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..counts import BertCounting
from .base import IDS_AND_MASK, Adapter, Context, ModelInput, padding_mask


class BertStem(nn.Module):
    """Word, position and token-type embeddings, then the padding mask. Without ``token_type_ids`` every token is
    segment 0, as in Hugging Face's BertModel."""

    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, Context]:
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        return hidden, Context(input_ids=input_ids, mask=padding_mask(attention_mask, hidden.dtype))


class BertAttention(nn.Module):
    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attention = attention

    def forward(self, hidden: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.attention(hidden, attention_mask=ctx.mask)[0]


class BertFeedForward(nn.Module):
    def __init__(self, intermediate: nn.Module, output: nn.Module):
        super().__init__()
        self.intermediate = intermediate
        self.output = output

    def forward(self, hidden: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.output(self.intermediate(hidden), hidden)


class BertHead(nn.Module):
    def forward(self, hidden: torch.Tensor, penultimate: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, ...]:
        return (hidden,)


class BertAdapter(Adapter):
    foreign_prefixes = ("pooler.", "cls.")
    name_prefixes = ("bert.",)
    inputs = (*IDS_AND_MASK, ModelInput("token_type_ids", optional=True))  # segment ids, as optimum exports BERT
    counting = BertCounting()

    def build(self, config: Any) -> nn.Module:
        from transformers import BertModel

        return BertModel(config, add_pooling_layer=False)

    def output_names(self, config: Any) -> tuple[str, ...]:
        return ("last_hidden_state",)

    def stem(self, model: nn.Module) -> nn.Module:
        return BertStem(model.embeddings)

    def sub_blocks(self, model: nn.Module) -> list[nn.Module]:
        out: list[nn.Module] = []
        for layer in model.encoder.layer:
            out += [BertAttention(layer.attention), BertFeedForward(layer.intermediate, layer.output)]
        return out

    def head(self, model: nn.Module) -> nn.Module:
        return BertHead()
