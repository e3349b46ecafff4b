"""Loading an encoder for a plan: config -> meta-device model -> only the kept tensors materialized.

Skipped sub-blocks stay on the meta device: they are never read from the checkpoint, converted or allocated.
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, adapter_for, text_config_of
from .config import ModelOptions
from .errors import ArgumentError, InvariantError, ModelError
from .plan import Plan
from .progress import each
from .recipes import default_model_path

log = logging.getLogger("skrr_export")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    """Where the encoder comes from: a local folder (or its ``config.json``), never a hub name."""

    path: Path
    subfolder: str | None = None
    random_weights: bool = False
    allow_pickle: bool = False  # pickle checkpoints can run code when loaded; only with the user's explicit consent
    tokenizer: Path | None = None  # --tokenizer: overrides the folder's own (or its pipeline's) tokenizer
    random_ids: bool = False  # --random-ids: seeded random token ids instead of a tokenizer

    @property
    def folder(self) -> Path:
        base = self.path.parent if self.path.is_file() else self.path
        return base / self.subfolder if self.subfolder else base

    @property
    def uses_tokenizer(self) -> bool:
        """Random weights imply random ids: prompts mean nothing to a model that was never trained."""
        return not (self.random_ids or self.random_weights)


def model_source(model: Path | None, subfolder: str | None = None, random_weights: bool = False,
                 allow_pickle: bool = False, tokenizer: Path | None = None, random_ids: bool = False) -> ModelSource:
    """``model``, or the embedded default when none is given. A tokenizer with random ids contradicts itself."""
    if tokenizer is not None and (random_ids or random_weights):
        flag = "--random-ids" if random_ids else "--random-weights"
        raise ArgumentError(f"--tokenizer {tokenizer} with {flag}: {flag} feeds random token ids; drop one of them")
    return ModelSource(model or default_model_path(), subfolder, random_weights, allow_pickle, tokenizer, random_ids)


def source_of(options: ModelOptions) -> ModelSource:
    """The source a command's model settings name (``config.ModelOptions``: ExportConfig, MeasureConfig, ...)."""
    return model_source(options.model, options.subfolder, options.random_weights, options.allow_pickle,
                        options.tokenizer, options.random_ids)


@dataclass
class Encoder:
    """A Hugging Face encoder whose kept parts are materialized; the rest stays on the meta device."""

    config: Any
    adapter: Adapter
    model: nn.Module
    stem: nn.Module
    sub_blocks: list[nn.Module]
    head: nn.Module
    dtype: torch.dtype
    source: ModelSource
    tensors_read: tuple[str, ...] = ()  # checkpoint keys actually read (empty for random weights)


def load_config(source: ModelSource) -> Any:
    from transformers import AutoConfig

    folder = source.folder
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json; pass a local Hugging Face model folder (and --subfolder)")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelError(f"cannot read {folder / 'config.json'}: {exc}") from None
    config._attn_implementation = "eager"  # explicit softmax attention: exportable, identical on every backend
    text = text_config_of(config)
    if text is not config:  # a whole CLIPModel's config: the text tower's own config is what gets built
        text._attn_implementation = "eager"
        text.architectures = config.architectures
    return config


def build_meta(config: Any) -> Encoder:
    """The model's structure without any storage: enough for inspection and planning."""
    adapter = adapter_for(config)
    with torch.device("meta"):
        model = adapter.build(config)
    model.eval()
    return Encoder(
        config=config,
        adapter=adapter,
        model=model,
        stem=adapter.stem(model),
        sub_blocks=adapter.sub_blocks(model),
        head=adapter.head(model),
        dtype=torch.float32,
        source=ModelSource(Path(".")),
    )


def check_plan_fits(plan: Plan, enc: Encoder) -> None:
    plan.check_fits(enc.adapter.family, enc.adapter.num_blocks(enc.config))


def load_encoder(source: ModelSource, plan: Plan, precision: str = "fp32") -> Encoder:
    """Build the model on the meta device and materialize only what ``plan`` executes."""
    start = time.perf_counter()
    enc = build_meta(load_config(source))
    check_plan_fits(plan, enc)
    enc.dtype, enc.source = DTYPES[precision], source
    roots = [enc.stem, enc.head] + [enc.sub_blocks[i] for i in sorted({src for _, src in plan.schedule()})]
    needed = _needed_parameters(enc.model, roots)
    _materialize_buffers(enc.model, roots)
    if source.random_weights:
        _random_parameters(enc, needed)
    else:
        with _open_checkpoint(enc, source) as ckpt:
            _read_parameters(enc, needed, ckpt)
            enc.tensors_read = tuple(ckpt.reads)
    check_precision_policy(enc, [item.name for item in needed])
    log.info("loaded %d tensors (%s) in %.1f s", len(needed), precision, time.perf_counter() - start)
    return enc


def check_precision_policy(enc: Encoder, names: list[str]) -> None:
    """Every parameter in ``names`` has the dtype transformers gives it when loading the model in ``enc.dtype`` (its
    class's keep-in-fp32 lists: T5's ``wo`` stays fp32 in fp16 and is bf16 in bf16); the export stores that dtype."""
    for name in names:
        actual, wanted = enc.model.get_parameter(name).dtype, hugging_face_dtype(enc.model, name, enc.dtype)
        if actual != wanted:
            raise InvariantError(f"parameter {name} is {actual} but transformers loads it as {wanted} in {enc.dtype}")


def hugging_face_dtype(model: nn.Module, name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype transformers 5 loads parameter ``name`` of ``model`` in, asked for ``dtype``: its dtype plan
    (``_keep_in_fp32_modules`` in fp16, ``_keep_in_fp32_modules_strict`` in fp16 and bf16), matched as its loader
    matches it (a pattern searched in the parameter's name)."""
    for pattern, kept in model._get_dtype_plan(dtype).items():
        if re.search(pattern, name):
            return kept
    return dtype


@dataclass
class Needed:
    """One tensor to materialize: its names in the model (tied weights have several) and its holders."""

    names: list[str]
    owners: list[tuple[nn.Module, str]]

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def meta(self) -> nn.Parameter:
        module, leaf = self.owners[0]
        return module._parameters[leaf]

    def assign(self, tensor: torch.Tensor) -> None:
        param = nn.Parameter(tensor, requires_grad=False)
        for module, leaf in self.owners:
            module._parameters[leaf] = param


def _needed_parameters(model: nn.Module, roots: list[nn.Module]) -> list[Needed]:
    wanted = {id(p) for r in roots for p in r.parameters()}
    by_id: dict[int, Needed] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for leaf, p in module.named_parameters(recurse=False):
            if id(p) in wanted:
                item = by_id.setdefault(id(p), Needed([], []))
                item.names.append(f"{mod_name}.{leaf}" if mod_name else leaf)
                item.owners.append((module, leaf))
    for item in by_id.values():
        item.names.sort(key=len)
    return list(by_id.values())


def _materialize_buffers(model: nn.Module, roots: list[nn.Module]) -> None:
    """Non-persistent buffers (position ids) are recomputed by the model's own initializer."""
    for root in roots:
        for module in root.modules():
            metas = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
            for n in metas:
                module._buffers[n] = torch.empty_like(module._buffers[n], device="cpu")
            if metas:
                model._init_weights(module)


def target_dtype(enc: Encoder, name: str) -> torch.dtype:
    module_name = name.rsplit(".", 1)[0]
    if enc.dtype == torch.float16 and any(module_name.endswith(s) for s in enc.adapter.fp32_in_fp16):
        return torch.float32
    return enc.dtype


RANDOM_WEIGHTS_SEED = 0  # report.json records it


def _random_parameters(enc: Encoder, needed: list[Needed]) -> None:
    """The model's own initializer, seeded per module from ``RANDOM_WEIGHTS_SEED`` and the module's name: the same
    command writes the same model.onnx, and a sub-block holds the same values whichever plan (or the dense stream)
    asks for it."""
    for item in needed:
        item.assign(torch.empty(item.meta.shape, dtype=target_dtype(enc, item.name)))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for name in _owners_and_ancestors(needed):
            torch.manual_seed(zlib.crc32(name.encode(), RANDOM_WEIGHTS_SEED))  # 32 bits: what the generator keeps
            enc.model._init_weights(enc.model.get_submodule(name))


def _owners_and_ancestors(needed: list[Needed]) -> list[str]:
    """The modules holding ``needed`` and every module above them, children first: a family's initializer sets some
    weights from the parent (T5's attention scales q, k, v, o by its own sizes), which must come last, as in
    Hugging Face's own initialization (a Linear alone gets the generic std-1 normal)."""
    names = set()
    for item in needed:
        parts = item.name.split(".")[:-1]
        names.update(".".join(parts[:k]) for k in range(len(parts) + 1))
    return sorted(names, key=lambda n: (-n.count(".") if n else 1, n))


def _all_names(model: nn.Module) -> set[str]:
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return params | {n for n, _ in model.named_buffers(remove_duplicate=False)}


def _open_checkpoint(enc: Encoder, source: ModelSource) -> Any:
    """``source``'s checkpoint, checked against the model by names (nothing is read)."""
    from .checkpoint import Checkpoint

    ckpt = Checkpoint.open(source.folder, enc.adapter, source.allow_pickle)
    ckpt.check_keys(_all_names(enc.model))
    _check_complete(enc, ckpt)
    return ckpt


def _check_complete(enc: Encoder, ckpt: Any) -> None:
    """Every parameter of the model, kept or skipped, must be in the checkpoint (names only, nothing read)."""
    for item in _needed_parameters(enc.model, [enc.model]):
        ckpt.key_for(item.names)


def _read_parameters(enc: Encoder, needed: list[Needed], ckpt: Any) -> None:
    for item in each(needed, "tensors"):
        item.assign(ckpt.read(item.names, tuple(item.meta.shape), target_dtype(enc, item.name)))


class PartStreamer:
    """A meta-device encoder whose parts are materialized one at a time and dropped again: ``part(roots)`` reads
    the parameters of ``roots`` that are not in memory yet (from the checkpoint, or random values) and, on exit,
    puts them back on the meta device and releases their checkpoint pages, so memory holds what is in use only."""

    def __init__(self, source: ModelSource, precision: str):
        self.enc = build_meta(load_config(source))
        self.enc.dtype, self.enc.source = DTYPES[precision], source
        self.ckpt = None if source.random_weights else _open_checkpoint(self.enc, source)

    @contextmanager
    def part(self, roots: list[nn.Module]) -> Iterator[None]:
        needed = [item for item in _needed_parameters(self.enc.model, roots) if item.meta.is_meta]
        metas = [item.meta for item in needed]
        _materialize_buffers(self.enc.model, roots)
        if self.ckpt is None:
            _random_parameters(self.enc, needed)
        else:
            _read_parameters(self.enc, needed, self.ckpt)
        try:
            yield
        finally:
            for item, meta in zip(needed, metas):
                for module, leaf in item.owners:
                    module._parameters[leaf] = meta
                if self.ckpt is not None:
                    self.ckpt.release(item.names)
