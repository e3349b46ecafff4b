"""Reading named tensors from local safetensors checkpoints (single file, sharded with an index, or several files).

Only the tensors asked for are read; every read is recorded so that tests (and users) can see what was touched.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from .adapters import Adapter
from .errors import ModelError

INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "model.bin", "model.pt")


class Checkpoint:
    def __init__(self, folder: Path, adapter: Adapter, files: dict[str, Path], stack: ExitStack):
        self.folder = folder
        self.adapter = adapter
        self._files = files  # key -> file
        self._stack = stack
        self._handles: dict[Path, Any] = {}
        self.reads: list[str] = []

    @classmethod
    def open(cls, folder: Path, adapter: Adapter, allow_pickle: bool = False) -> Checkpoint:
        return cls(folder, adapter, _key_files(folder, allow_pickle), ExitStack())

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def keys(self) -> set[str]:
        return set(self._files)

    def key_for(self, names: list[str]) -> str:
        """The checkpoint key of a model tensor, allowing the prefixes checkpoints of this family use."""
        for name in names:
            for candidate in _candidates(name, self.adapter.name_prefixes):
                if candidate in self._files:
                    return candidate
        raise ModelError(f"checkpoint in {self.folder} has no tensor '{names[0]}'; is it a {self.adapter.family} model?")

    def check_keys(self, model_names: set[str]) -> None:
        """Every model tensor is in the checkpoint and every checkpoint tensor belongs to the model (or to a
        known other part, such as a decoder or a vision tower). Checks names only; nothing is read."""
        known = {c for n in model_names for c in _candidates(n, self.adapter.name_prefixes)}
        extra = sorted(k for k in self._files if k not in known and not k.startswith(self.adapter.foreign_prefixes))
        if extra:
            raise ModelError(
                f"checkpoint in {self.folder} has {len(extra)} tensors this {self.adapter.family} model does not have, "
                f"e.g. '{extra[0]}'; is the config right for these weights?"
            )

    def read(self, names: list[str], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = self.key_for(names)
        path = self._files[key]
        try:
            handle = self._handle(path)
            tensor = handle.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
            raise ModelError(f"cannot read tensor '{key}' from {path.name}: {exc}") from None
        if tuple(tensor.shape) != shape:
            raise ModelError(f"tensor '{key}' in {path.name} has shape {tuple(tensor.shape)}, the config expects {shape}")
        if not tensor.is_floating_point() and dtype.is_floating_point:
            raise ModelError(f"tensor '{key}' in {path.name} is {tensor.dtype} (quantized?); skrr-export converts "
                             f"float checkpoints to {dtype} and does not dequantize")
        self.reads.append(key)
        return tensor.to(dtype)

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            from safetensors import safe_open

            if not path.is_file():
                raise ModelError(f"{INDEX} in {self.folder} names {path.name}, which does not exist")
            if path.suffix == ".safetensors":
                self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
            else:
                self._handles[path] = _PickledTensors(_load_pickle(path))
        return self._handles[path]


class _PickledTensors:
    """The safe_open interface over a state dict from a pickle checkpoint (loaded with weights_only=True)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.state[key]


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:  # weights_only: tensors and plain containers, no arbitrary objects; mmap: no full copy in memory
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ModelError(f"cannot load pickle checkpoint {path.name} with weights_only=True: {str(exc).splitlines()[0]}") from None


def _candidates(name: str, prefixes: tuple[str, ...]) -> list[str]:
    out = [name]
    for p in prefixes:
        out.append(name[len(p):] if name.startswith(p) else p + name)
    return out


def _key_files(folder: Path, allow_pickle: bool) -> dict[str, Path]:
    from .model import read_json

    index = folder / INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelError(f"{index} has no 'weight_map'")
        return {k: folder / v for k, v in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p for p in PICKLES if (folder / p).is_file()]
        if pickles and allow_pickle:
            return {k: folder / pickles[0] for k in _load_pickle(folder / pickles[0])}
        if pickles:
            raise ModelError(
                f"{folder} holds only pickle weights ({pickles[0]}), which can run code when loaded; skrr-export "
                "loads safetensors. Convert them once (save_pretrained(..., safe_serialization=True)), or pass "
                "--allow-pickle if you trust the file"
            )
        raise ModelError(f"{folder} has no *.safetensors weights (or pass --random-weights)")
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                out.update({k: f for k in handle.keys()})
        except Exception as exc:
            raise ModelError(f"cannot open {f}: {exc}") from None
    return out
