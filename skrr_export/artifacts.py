"""Output folders appear whole or not at all: work happens in a hidden sibling, renamed when complete."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ArtifactError, UserError
from .units import size

# The footprint rule: a stage holds its weights plus 10 % (activations, allocator slack) and, on the host, 0.6 GiB for
# the runtimes (``need``); on disk an export writes its weights plus 5 %, and an engine build as much again
# (``disk_need``). Every preflight (main job, measure, calibrate, engine build) states its need with these.
SLACK = 1.1  # a stage holds its weights and 10 % for activations and the allocator
RUNTIME_BYTES = 600 << 20  # the runtimes' own host memory (libraries, sessions)
DISK_SLACK = 1.05  # an export's file beside its weights: graph, names, alignment


def need(held: int, runtime: int = RUNTIME_BYTES) -> int:
    """What a stage holding ``held`` bytes of weights needs: 10 % more, and the runtimes' own (host)."""
    return int(held * SLACK) + runtime


def disk_need(weight_bytes: int, engine: bool) -> int:
    """Disk an export of ``weight_bytes`` writes; an engine stores the weights once more."""
    return int(weight_bytes * (DISK_SLACK + (1 if engine else 0)))


def check_writable(out: Path, force: bool) -> None:
    """``out`` can become a folder: nothing on its path is a file, and it exists only when ``force`` is given."""
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ArtifactError(f"output folder {out} cannot be created: {blocker} is a file, not a folder")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output path {out} is a file, not a folder; remove it or choose another --out")
    if out.exists() and not force:
        raise ArtifactError(f"output folder {out} exists; pass --force to replace it")


def unique_sibling(path: Path, tag: str) -> Path:
    """A hidden name beside ``path`` that no other process or thread uses: ``.NAME.TAG-PID-RANDOM``."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


@contextmanager
def staged_folder(out: Path, force: bool) -> Iterator[Path]:
    """Yield a fresh staging folder; on success it becomes ``out``, on any failure (Ctrl-C too) it is removed.

    Publishing renames onto a path that must not exist, so a folder that appeared while the job ran is never
    replaced; with ``force`` only the folder that was there when the job started, unchanged, is."""
    check_writable(out, force)
    existing = _identity(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = unique_sibling(out, "partial")
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _publish(stage, out, existing)


def _identity(path: Path) -> tuple[int, int, int] | None:
    """Device, inode and change time: a folder recreated under the same name (inode numbers are reused) or
    written into meanwhile no longer matches."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _publish(stage: Path, out: Path, existing: tuple[int, int, int] | None) -> None:
    now = _identity(out)
    if now is not None and now != existing:
        raise ArtifactError(f"output folder {out} appeared or changed while this job ran and was left alone; "
                            f"the finished result is in {stage}")
    old = None
    if now is not None:
        old = unique_sibling(out, "old")
        rename_noreplace(out, old)
    try:
        rename_noreplace(stage, out)
    except FileExistsError:
        raise ArtifactError(f"output folder {out} appeared while this job ran and was left alone; the finished "
                            f"result is in {stage}{f', the previous folder in {old}' if old else ''}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, raising FileExistsError if ``dst`` exists (never replacing it, not even an
    empty folder, which a plain rename(2) would). Linux: renameat2(RENAME_NOREPLACE), atomic; elsewhere, or on
    file systems without it: check, then rename (a narrow window remains)."""
    code = _renameat2(src, dst)
    if code == 0:
        return
    if code == errno.EEXIST:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    if code not in (errno.ENOSYS, errno.EINVAL, -1):
        raise OSError(code, os.strerror(code), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _renameat2(src: Path, dst: Path) -> int:
    """0 on success, the errno on failure, -1 where the C library has no renameat2."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return -1
    at_fdcwd, rename_noreplace_flag = -100, 1
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace_flag) == 0:
        return 0
    return ctypes.get_errno()


def write_atomic(path: Path, data: bytes | str | memoryview, mode: int | None = None) -> None:
    """Write ``data`` to a uniquely named hidden sibling and rename it over ``path``: the file appears whole
    or not at all, and concurrent writers (two builds sharing one timing cache) never share a temporary file."""
    tmp = unique_sibling(path, "partial")
    try:
        with tmp.open("xb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
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


def write_manifest(folder: Path, record: dict[str, Any]) -> None:
    """manifest.json: ``record`` (what made the folder: provenance.manifest_record) and every artifact in ``folder``
    with its size and sha256."""
    import json

    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "manifest.json")
    manifest = record | {
        "artifacts": [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


ENGINE_METADATA = "skrr-export engine metadata"  # engine.json, beside engine.plan (trt.build_engine writes it)


def read_json(folder: Path, name: str, what: str | None = None, remedy: str | None = None) -> dict[str, Any]:
    """``folder/name``, a record skrr-export writes, as a JSON object. Missing: a user error (not a folder the tool
    wrote); not JSON or not an object: an ArtifactError naming ``what`` it should be (default: the file's name),
    each message ending with ``remedy`` when given."""
    import json

    path = folder / name
    then = f"; {remedy}" if remedy else ""
    if not path.is_file():
        raise UserError(f"{folder} holds no {name}: an artifacts folder written by skrr-export was expected{then}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not JSON: {exc.msg} (line {exc.lineno}){then}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is not {what or 'a skrr-export ' + name} (a JSON object){then}")
    return data


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
            f"{what} needs about {size(needed, 'GiB', 1)} of host memory but {size(free, 'GiB', 1)} is available; "
            "free memory, use a smaller plan, or use a bigger machine"
        )


def check_disk(folder: Path, needed: int, what: str) -> None:
    folder = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ArtifactError(
            f"{what} needs about {size(needed, 'GiB')} on disk but {folder} has {size(free, 'GiB')} free"
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
            f"{what} needs about {size(needed, 'GiB', 1)} of GPU memory but {size(free, 'GiB', 1)} is free on "
            f"{torch.cuda.get_device_name()}"
        )


def check_onnx_files(path: Path) -> None:
    """The ONNX file and every external data file it names must exist (and stay inside its folder)."""
    import onnx

    if not path.is_file():
        raise ArtifactError(f"{path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and the like: not an ONNX file
        raise ArtifactError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None
    check_onnx_model(path, model)


def check_onnx_model(path: Path, model: Any) -> None:
    """``model`` (the ModelProto read from ``path``, its weights' bytes there or not) is a model, and every external
    data file it names is beside ``path``."""
    import onnx

    if model.ir_version == 0 or not model.graph.node:
        raise ArtifactError(f"{path} is not an ONNX model (empty or truncated)")
    folder = path.parent.resolve()
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in init.external_data}.get("location", "")
        target = (folder / location).resolve()
        if folder not in target.parents:
            raise ArtifactError(f"{path.name}: external data location '{location}' points outside {folder}")
        if not target.is_file():
            raise ArtifactError(f"{path.name} needs its external data file '{location}', which is missing beside it")


# Everything an exported graph stores besides its weights (shape vectors, scalars, masks' fill values) stays below
# this in all, or below 4 S^2 bytes at a fixed sequence S when that is more (graph.weights.bound).
SMALL_CONSTANT_BYTES = 64 * 1024


def onnx_initializer_sizes(path: Path) -> list[int]:
    """Byte size of every initializer of an ONNX file on disk (external data included), without loading the data."""
    import onnx

    if not path.is_file():
        raise UserError(f"{path} does not exist")
    model = onnx.load(str(path), load_external_data=False)
    sizes = []
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            sizes.append(int({e.key: e.value for e in init.external_data}.get("length", 0)))
        else:
            sizes.append(len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes)
    return sizes


def onnx_weight_bytes(path: Path) -> int:
    return sum(onnx_initializer_sizes(path))
