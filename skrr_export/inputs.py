"""The batches parity and distance checks run on: real prompts through the encoder's own tokenizer (in a diffusers
pipeline folder, the one paired with the encoder's subfolder), or seeded random ids when asked for (``--random-ids``,
implied by ``--random-weights``); always with padding, and the empty prompt apart."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ModelError

if TYPE_CHECKING:
    from .model import ModelSource
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
ENCODER_FOLDER = re.compile(r"text_encoder(_\d+)?")  # a diffusers pipeline's encoders: text_encoder, text_encoder_2, ...


def tokenizer_folders(source: ModelSource) -> list[Path]:
    """Where the encoder's tokenizer may be, first match wins: ``--tokenizer`` alone when given; else the tokenizer
    the pipeline pairs with the encoder's folder, then the encoder's own folder."""
    if source.tokenizer is not None:
        return [source.tokenizer]
    paired = paired_tokenizer(source.folder)
    return [paired, source.folder] if paired is not None else [source.folder]


def paired_tokenizer(encoder: Path) -> Path | None:
    """text_encoder -> tokenizer, text_encoder_N -> tokenizer_N beside it, as diffusers pairs them; where the
    pipeline's model_index.json exists, only when it lists that tokenizer (``[null, null]`` means none)."""
    match = ENCODER_FOLDER.fullmatch(encoder.name)
    if match is None:
        return None
    name = "tokenizer" + (match.group(1) or "")
    index = encoder.parent / "model_index.json"
    if index.is_file():
        try:
            entry = json.loads(index.read_text()).get(name)
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelError(f"cannot read {index}: {exc}; fix it, or pass --tokenizer DIR") from None
        if not (isinstance(entry, list) and entry and entry[0] is not None):
            return None
    return encoder.parent / name


def find_tokenizer(source: ModelSource) -> Path | None:
    """The folder of the tokenizer the encoder's prompts go through; None when the source asks for random ids.
    ModelError, naming every folder looked in, when there is none."""
    if not source.uses_tokenizer:
        return None
    looked = tokenizer_folders(source)
    found = next((f for f in looked if any((f / name).is_file() for name in TOKENIZER_FILES)), None)
    if found is None:
        where = ", ".join(str(f) for f in looked)
        raise ModelError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...) in {where}; pass --tokenizer DIR, "
                         "or --random-ids for seeded random token ids")
    return found


def load_tokenizer(source: ModelSource) -> Any | None:
    """The tokenizer ``find_tokenizer`` names (None: random ids); ModelError when it cannot be loaded."""
    folder = find_tokenizer(source)
    if folder is None:
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # a broken file, or a tokenizer needing a missing package (sentencepiece)
        raise ModelError(f"cannot load the tokenizer in {folder}: {type(exc).__name__}: {exc}; pass --tokenizer DIR, "
                         "or --random-ids for seeded random token ids") from None
    log.info("tokenizer: %s", folder)
    return tokenizer


def tokenizer_used(source: ModelSource) -> str | None:
    """What a report records: the tokenizer's folder, or None for random ids."""
    folder = find_tokenizer(source)
    return None if folder is None else str(folder)


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
