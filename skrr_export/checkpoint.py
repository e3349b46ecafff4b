"""Reading named tensors from local safetensors checkpoints (single file, sharded with an index, or several files).

Only the tensors asked for are read; every read is recorded so that tests (and users) can see what was touched.

Memory: a tensor already in the wanted dtype is a zero-copy view of the memory-mapped file (its pages become
resident as they are used, once); a tensor that needs converting is converted and its file pages are dropped
again at once. The safetensors library's own reader copies every tensor out of a mapping whose touched pages
stay resident until the file is closed, which doubles peak memory on a 10 GB checkpoint (measured).
"""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from pathlib import Path
from typing import Any

import torch

from .adapters import Adapter
from .errors import ModelError

INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "model.bin", "model.pt")


class Checkpoint:
    def __init__(self, folder: Path, adapter: Adapter, files: dict[str, Path]):
        self.folder = folder
        self.adapter = adapter
        self._files = files  # key -> file
        self._handles: dict[Path, Any] = {}
        self.reads: list[str] = []

    @classmethod
    def open(cls, folder: Path, adapter: Adapter, allow_pickle: bool = False) -> Checkpoint:
        return cls(folder, adapter, _key_files(folder, allow_pickle))

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handles.clear()  # mappings stay alive as long as tensors viewing them do

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
        if tensor.dtype == dtype:
            return tensor
        converted = tensor.to(dtype)
        release = getattr(handle, "release", None)
        if release is not None:
            release(key)
        return converted

    def release(self, names: list[str]) -> None:
        """Drop the file pages of a tensor read earlier (whose tensors are no longer used)."""
        key = self.key_for(names)
        release = getattr(self._handle(self._files[key]), "release", None)
        if release is not None:
            release(key)

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            if not path.is_file():
                raise ModelError(f"{INDEX} in {self.folder} names {path.name}, which does not exist")
            if path.suffix == ".safetensors":
                self._handles[path] = MappedSafetensors(path)
            else:
                self._handles[path] = _PickledTensors(_load_pickle(path))
        return self._handles[path]


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class MappedSafetensors:
    """A safetensors file as zero-copy tensor views of a private (copy-on-write) memory mapping."""

    def __init__(self, path: Path):
        with path.open("rb") as f:
            size = path.stat().st_size
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header length exceeds the file")
            header = json.loads(f.read(n))
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
        header.pop("__metadata__", None)
        self._base = 8 + n
        self._entries = header
        for key, e in header.items():
            begin, end = e["data_offsets"]
            if self._base + end > size:
                raise ValueError(f"tensor '{key}' ends at byte {self._base + end}, past the end of the file ({size})")

    def keys(self) -> list[str]:
        return list(self._entries)

    def get_tensor(self, key: str) -> torch.Tensor:
        e = self._entries[key]
        dtype = _DTYPES.get(e["dtype"])
        if dtype is None:
            raise ValueError(f"unsupported safetensors dtype {e['dtype']}")
        begin, end = e["data_offsets"]
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        if count == 0:
            return torch.empty(e["shape"], dtype=dtype)
        start = (self._base + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        self._map.madvise(mmap.MADV_WILLNEED, start, self._base + end - start)  # read ahead, in the background
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._base + begin)
        return flat.view(e["shape"])

    def release(self, key: str) -> None:
        """Drop the file pages of a tensor that was converted (its view is no longer used)."""
        begin, end = self._entries[key]["data_offsets"]
        page = mmap.PAGESIZE
        start = -(-(self._base + begin) // page) * page
        stop = (self._base + end) // page * page
        if self._map is not None and stop > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)


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


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None


def _key_files(folder: Path, allow_pickle: bool) -> dict[str, Path]:
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
    out: dict[str, Path] = {}
    for f in files:
        try:
            out.update({k: f for k in MappedSafetensors(f).keys()})
        except Exception as exc:
            raise ModelError(f"cannot open {f}: {exc}") from None
    return out
