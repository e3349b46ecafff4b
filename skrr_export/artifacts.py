"""Output folders appear whole or not at all: work happens in a hidden sibling, renamed when complete."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ArtifactError


def check_writable(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ArtifactError(f"output folder {out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output path {out} exists and is not a folder")


@contextmanager
def staged_folder(out: Path, force: bool) -> Iterator[Path]:
    """Yield a fresh staging folder; on success it replaces ``out``, on any failure (Ctrl-C too) it is removed."""
    check_writable(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        stage.rename(out)


def write_atomic(path: Path, data: bytes | str | memoryview, mode: int | None = None) -> None:
    """Write ``data`` to a hidden sibling and rename it over ``path``: the file appears whole or not at all."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        if mode is not None:
            tmp.chmod(mode)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, plan_sha256: str, versions: dict[str, str]) -> None:
    """manifest.json: every artifact in ``folder`` with its size and sha256, the plan hash and the versions."""
    import json

    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "manifest.json")
    manifest = {
        "plan_sha256": plan_sha256,
        "versions": versions,
        "artifacts": [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def available_memory() -> int | None:
    """Bytes of host memory available to a new allocation (MemAvailable), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(needed: int, what: str) -> None:
    free = available_memory()
    if free is not None and needed > free:
        raise ArtifactError(
            f"{what} needs about {needed / 2**30:.1f} GiB of host memory but {free / 2**30:.1f} GiB is available; "
            "free memory, use a smaller plan, or use a bigger machine"
        )


def check_disk(folder: Path, needed: int, what: str) -> None:
    folder = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ArtifactError(
            f"{what} needs about {needed / 2**30:.2f} GiB on disk but {folder} has {free / 2**30:.2f} GiB free"
        )


def check_device_memory(needed: int, what: str) -> None:
    """Refuse when a CUDA device is in use and has less free memory than ``needed`` (no-op without CUDA)."""
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        return
    free, _ = torch.cuda.mem_get_info()
    if needed > free:
        raise ArtifactError(
            f"{what} needs about {needed / 2**30:.1f} GiB of GPU memory but {free / 2**30:.1f} GiB is free on "
            f"{torch.cuda.get_device_name()}"
        )
