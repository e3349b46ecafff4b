"""Encoder family adapters, registered by family name and by Hugging Face ``model_type``."""

from __future__ import annotations

from typing import Any

from ..errors import ModelError
from .base import Adapter, Context, ModelInput, Sizes, complete_feed
from .bert import BertAdapter
from .clip import ClipAdapter
from .t5 import T5Adapter, UMT5Adapter

ADAPTERS: dict[str, Adapter] = {a.family: a for a in (T5Adapter(), UMT5Adapter(), ClipAdapter(), BertAdapter())}


def adapter_for(config: Any) -> Adapter:
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    known = ", ".join(t for a in ADAPTERS.values() for t in a.model_types)
    raise ModelError(f"model_type '{model_type}' has no adapter; supported model types: {known}")


def sizes_of(config: Any) -> Sizes:
    """The model's sizes, read where its family's adapter says they are."""
    return adapter_for(config).sizes(config)


def text_config_of(config: Any) -> Any:
    return adapter_for(config).text_config(config)


__all__ = ["ADAPTERS", "Adapter", "Context", "ModelInput", "Sizes", "adapter_for", "complete_feed", "sizes_of", "text_config_of"]
