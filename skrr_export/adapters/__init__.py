"""Encoder family adapters, registered by family name and by Hugging Face ``model_type``."""

from __future__ import annotations

from typing import Any

from ..counts import counting_for
from .base import Adapter, Context, ModelInput, Sizes, complete_feed
from .bert import BertAdapter
from .clip import ClipAdapter
from .t5 import T5Adapter, UMT5Adapter

ADAPTERS: dict[str, Adapter] = {a.family: a for a in (T5Adapter(), UMT5Adapter(), ClipAdapter(), BertAdapter())}


def adapter_for(config: Any) -> Adapter:
    """The adapter of ``config``'s family (found by its ``model_type``; an unknown one is a ModelError)."""
    return ADAPTERS[counting_for(config).family]


def sizes_of(config: Any) -> Sizes:
    """The model's sizes, read where its family's adapter says they are."""
    return adapter_for(config).sizes(config)


def text_config_of(config: Any) -> Any:
    return adapter_for(config).text_config(config)


__all__ = ["ADAPTERS", "Adapter", "Context", "ModelInput", "Sizes", "adapter_for", "complete_feed", "sizes_of", "text_config_of"]
