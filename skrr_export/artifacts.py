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
