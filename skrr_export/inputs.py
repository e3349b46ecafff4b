"""The batches parity and distance checks run on: real tokenized prompts where the model folder has a
tokenizer, seeded random ids otherwise; always with padding, and the empty prompt apart."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .runners import Feed

log = logging.getLogger("skrr_export")

PROMPTS = (
    "A red fox curled up asleep in fresh snow at the edge of a pine forest, soft morning light.",
    "An astronaut riding a horse across a desert of glass dunes, photorealistic.",
    "A cozy reading nook with a rain-streaked window, a stack of old books and a steaming cup of tea.",
    "Macro photo of a dew drop on a spider web.",
)


@dataclass(frozen=True)
class Batch:
    feed: Feed
    label: str  # "prompts" or "empty prompt"
    source: str  # "tokenizer" or "random ids (seed N)"

    @property
    def mask(self) -> np.ndarray | None:
        """Which positions parity and the distance score: the real tokens, or (None) every position where the
        pipeline runs the encoder unmasked and the denoiser reads the padding too."""
        return self.feed.get("attention_mask")


# Files a Hugging Face tokenizer is built from. Without any of them, transformers 5 still returns a tokenizer for
# some families (T5: an empty one whose every word is <unk>), which would make every prompt the same ids.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "sentencepiece.bpe.model", "vocab.txt",
                   "vocab.json")


def load_tokenizer(folder: Path) -> Any | None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        log.info("no tokenizer files in %s; using seeded random ids", folder)
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # no tokenizer files, or a tokenizer needing a missing package
        log.info("no usable tokenizer in %s (%s); using seeded random ids", folder, type(exc).__name__)
        return None


def prompt_batch(tokenizer: Any | None, config: Any, input_dtype: str, seq: int | None, seed: int = 0,
                 attention_mask: bool = True) -> tuple[Batch, Batch]:
    """(prompts, empty prompt) as feeds of every input the family declares; ``seq`` pads to a fixed length when the
    export is fixed-shape. ``attention_mask=False``: the feeds hold no mask (the pipeline runs the encoder unmasked)
    and every position counts."""
    if tokenizer is not None:
        prompts, empty = _tokenized(tokenizer, PROMPTS, "prompts", seq), _tokenized(tokenizer, ("",), "empty prompt", seq)
    else:
        prompts, empty = _random(config, seq, seed), _random_empty(config, seq)
    return tuple(_completed(b, config, input_dtype, attention_mask) for b in (prompts, empty))  # type: ignore[return-value]


def _completed(batch: Batch, config: Any, input_dtype: str, attention_mask: bool = True) -> Batch:
    """``batch`` with the family's optional inputs added (zeros where the tokenizer gave none), in ``input_dtype``;
    without the mask when the pipeline feeds none."""
    from .adapters import adapter_for

    feed = adapter_for(config).complete_feed(batch.feed)
    return Batch({k: v.astype(input_dtype) for k, v in feed.items() if attention_mask or k != "attention_mask"},
                 batch.label, batch.source)


def _tokenized(tokenizer: Any, prompts: tuple[str, ...], label: str, seq: int | None) -> Batch:
    pad: dict[str, Any] = {"padding": "max_length", "max_length": seq} if seq else {"padding": True}
    enc = tokenizer(list(prompts), truncation=True, return_tensors="np", **pad)
    return Batch(dict(enc), label, "tokenizer")


def _eos(config: Any) -> int | None:
    from .adapters import sizes_of, text_config_of

    eos = getattr(text_config_of(config), "eos_token_id", None)
    return eos if isinstance(eos, int) and 0 <= eos < sizes_of(config).vocab else None


def random_ids(config: Any, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Token ids from the vocabulary without the lowest ten (pad, eos and other special tokens in most
    vocabularies; the lower half of a tiny one)."""
    from .adapters import sizes_of

    vocab = sizes_of(config).vocab
    return rng.integers(min(10, vocab // 2), vocab, size=shape)


def _random(config: Any, seq: int | None, seed: int) -> Batch:
    seq = seq or 12
    lengths = [seq, max(1, seq - 3), max(1, seq // 2)]
    ids = random_ids(config, (len(lengths), seq), np.random.default_rng(seed))
    mask = np.zeros_like(ids)
    eos = _eos(config)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        if eos is not None:
            ids[row, n - 1] = eos
            ids[row, n:] = eos
    return Batch({"input_ids": ids, "attention_mask": mask}, "prompts", f"random ids (seed {seed})")


def _random_empty(config: Any, seq: int | None) -> Batch:
    eos = _eos(config) or 0
    n = seq or 1
    ids = np.full((1, n), eos)
    mask = np.zeros((1, n))
    mask[0, 0] = 1
    return Batch({"input_ids": ids, "attention_mask": mask}, "empty prompt", "end-of-sequence token only")
