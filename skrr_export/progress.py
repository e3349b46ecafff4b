"""Progress of long stages, shown with tqdm: a bar with a count and an estimate where the work can be counted
(tensors loaded, sub-blocks run, checks made), elapsed time where it cannot (inside torch's exporter or TensorRT's
builder); plain lines every ``PLAIN_INTERVAL`` seconds when stderr is not a terminal; nothing with ``-q``.

A stage opens one bar (``stage_bar``) and keeps its elapsed time ticking from a background thread, stopped in a
``finally``. Code that does countable work inside the stage wraps its loop in ``each``, which counts on the open bar
(and is a plain loop when none is open: library calls and tests)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

log = logging.getLogger("skrr_export")

T = TypeVar("T")
TERMINAL_INTERVAL = 1.0  # seconds between refreshes of a bar on a terminal
PLAIN_INTERVAL = 15.0  # seconds between plain lines in a log file or a pipe
_current: list[Any] = []  # the open stage's bar (one at a time: stages do not nest)
ELAPSED = "{desc}: {elapsed} elapsed"
COUNTED = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed} elapsed, {remaining} left{postfix}]"
PLAIN_COUNTED = ("{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f} %), {elapsed} elapsed, about {remaining} left"
                 "{postfix}")


class _LogLines:
    """A file for tqdm that turns its refreshes into log lines (no carriage returns in a log file), at most one per
    ``PLAIN_INTERVAL`` besides the one that completes the count (the ticker and an update can refresh together)."""

    def __init__(self) -> None:
        self.last = -float("inf")

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        now = time.monotonic()
        if line and (now - self.last >= 0.9 * PLAIN_INTERVAL or "(100 %)" in line):
            self.last = now
            log.info("%s", line)

    def flush(self) -> None:
        pass


def enabled() -> bool:
    return log.isEnabledFor(logging.INFO)


def counted_bar(name: str, total: int | None, unit: str, initial: int = 0, leave: bool = True) -> Any:
    """A tqdm bar as this tool shows one: on a terminal a bar refreshed every second, else one log line every
    ``PLAIN_INTERVAL`` seconds; disabled with -q. ``total`` None: elapsed time only (until ``each`` counts)."""
    from tqdm import tqdm

    terminal = sys.stderr.isatty()
    interval = TERMINAL_INTERVAL if terminal else PLAIN_INTERVAL
    counted = COUNTED if terminal else PLAIN_COUNTED
    bar = tqdm(desc=f"[skrr-export] {name}" if terminal else name, total=total, initial=initial, unit=unit,
               disable=not enabled(), file=sys.stderr if terminal else _LogLines(), mininterval=interval,
               maxinterval=interval, dynamic_ncols=terminal, leave=leave and terminal, delay=interval,
               bar_format=ELAPSED if total is None else counted)
    bar.counted_format, bar.counting = counted, False
    return bar


@contextmanager
def stage_bar(name: str) -> Iterator[Any]:
    """The bar of one stage: elapsed time from the start, ticking every interval until the stage ends; ``each``
    inside it gives it a count and an estimate."""
    bar = counted_bar(name, None, "step", leave=False)
    interval = TERMINAL_INTERVAL if sys.stderr.isatty() else PLAIN_INTERVAL
    stop = threading.Event()
    ticker = threading.Thread(target=_tick, args=(bar, stop, interval), daemon=True, name=f"progress {name}")
    _current.append(bar)
    if not bar.disable:
        ticker.start()
    try:
        with _logs_above(bar):
            yield bar
    finally:
        stop.set()
        if ticker.is_alive():
            ticker.join()
        _current.remove(bar)
        bar.close()


def _logs_above(bar: Any) -> Any:
    """On a terminal, log lines are printed above the bar (tqdm's logging redirect) instead of through it."""
    if bar.disable or not sys.stderr.isatty():
        return nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def _tick(bar: Any, stop: threading.Event, interval: float) -> None:
    """Refresh ``bar`` every ``interval`` seconds (its elapsed time and estimate) until ``stop`` is set."""
    while not stop.wait(interval):
        bar.refresh()


def each(items: Iterable[T], unit: str, total: int | None = None) -> Iterator[T]:
    """``items``, counted on the open stage's bar (``total``: their number where ``items`` has no len). The outermost
    loop counts: one inside it (the tensors of each sub-block the dense distance streams) is a plain loop. The
    estimate comes from the counted work alone; the bar shows it at its next refresh."""
    bar = _current[-1] if _current else None
    if bar is None or bar.disable or bar.counting:
        yield from items
        return
    bar.counting, bar.unit, bar.bar_format = True, unit, bar.counted_format
    bar.total, bar.n, bar.last_print_n = (total if total is not None else len(items)), 0, 0  # type: ignore[arg-type]
    bar.start_t = bar.last_print_t = time.time()
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.counting = False


def peak_memory() -> int | None:
    """This process's peak resident set in bytes (``getrusage``; Linux counts KiB, macOS bytes); None where unknown."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def finished(what: str, seconds: float) -> None:
    """The one final line: wall time and peak memory."""
    from .units import size

    log.info("%s in %.1f s wall, peak memory %s (resident, this process)", what, seconds, size(peak_memory()))
