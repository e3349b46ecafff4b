"""One convention for sizes: binary units everywhere a person reads one (reports, console, errors, thresholds).

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40 bytes. Binary, because the numbers a user sets ours against are:
device and host memory (nvidia-smi and TensorRT's logs in MiB, ``free -h`` in GiB, an "8 GB" Jetson Orin holding
8 GiB), trtexec's ``--memPoolSize`` in MiB, and the memory floors and targets this tool checks. File sizes follow
the same units so a weight figure and the memory it must fit in compare directly. JSON keeps the exact bytes.
"""

from __future__ import annotations

BINARY = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
SCALE = dict(BINARY) | {"B": 1}


def size(n: float | None, unit: str | None = None, digits: int = 2) -> str:
    """``n`` bytes for a person: ``1.55 GiB``, ``812.34 MiB``, ``512 B``. ``unit`` fixes the unit (two numbers that
    are compared, such as a need and a limit, are printed in one); by default the largest with a value >= 1."""
    if n is None:
        return "unknown"
    if unit is None:
        unit = next((u for u, scale in BINARY if abs(n) >= scale), "B")
    if unit == "B":
        return f"{int(n):,} B"
    return f"{n / SCALE[unit]:,.{digits}f} {unit}"


def size_exact(n: int | None) -> str:
    """``1.55 GiB (1,662,750,720 bytes)``: where the exact count matters (a difference, an engine's file)."""
    return "unknown" if n is None else f"{size(n)} ({int(n):,} bytes)"
