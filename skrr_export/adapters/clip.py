"""CLIP text encoders (``CLIPTextModel``, ``CLIPTextModelWithProjection``): pre-norm residual sub-blocks,
causal mask, and the outputs pipelines consume: last hidden state, penultimate hidden state (SD3, SDXL)
and the pooled (or projected) end-of-text embedding."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..counts import ClipCounting
from .base import Adapter, Context, EmbeddingStem, Residual


def text_model(model: nn.Module) -> nn.Module:
    """transformers 5: ``CLIPTextModel`` is flat, ``CLIPTextModelWithProjection`` wraps it in ``.text_model``."""
    return getattr(model, "text_model", model)


class ClipHead(nn.Module):
    """Final norm, end-of-text pooling as Hugging Face does it, optional text projection."""

    def __init__(self, final_norm: nn.Module, eos_token_id: int, projection: nn.Module | None):
        super().__init__()
        self.final_layer_norm = final_norm
        self.eos_token_id = eos_token_id
        self.text_projection = projection

    def forward(self, hidden: torch.Tensor, penultimate: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, ...]:
        last = self.final_layer_norm(hidden)
        ids = ctx.input_ids.to(torch.int)
        if self.eos_token_id == 2:  # legacy configs: the end-of-text token has the highest id
            eos_pos = ids.argmax(dim=-1)
        else:
            eos_pos = (ids == self.eos_token_id).int().argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos_pos]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return last, penultimate, pooled


class ClipAdapter(Adapter):
    foreign_prefixes = ("vision_model.", "visual_projection.", "logit_scale")
    name_prefixes = ("text_model.",)
    ort_model_type = "clip"  # quick GELU
    counting: ClassVar[ClipCounting] = ClipCounting()

    def build(self, config: Any) -> nn.Module:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        config = self.text_config(config)
        return CLIPTextModelWithProjection(config) if self.counting.projected(config) else CLIPTextModel(config)

    def output_names(self, config: Any) -> tuple[str, ...]:
        pooled = "text_embeds" if self.counting.projected(config) else "pooler_output"
        return ("last_hidden_state", "penultimate_hidden_state", pooled)

    def stem(self, model: nn.Module) -> nn.Module:
        return EmbeddingStem(text_model(model).embeddings, causal=True)

    def sub_blocks(self, model: nn.Module) -> list[nn.Module]:
        out: list[nn.Module] = []
        for layer in text_model(model).encoder.layers:
            out += [Residual(layer.layer_norm1, layer.self_attn, True), Residual(layer.layer_norm2, layer.mlp, False)]
        return out

    def head(self, model: nn.Module) -> nn.Module:
        tm = text_model(model)
        return ClipHead(tm.final_layer_norm, tm.config.eos_token_id, getattr(model, "text_projection", None))
