"""Progress of long stages (skrr_export.progress): plain lines with a count and an estimate when stderr is not a
terminal, elapsed time where nothing is counted, nothing with -q, and the ticking thread stopped when the stage ends
(also when it fails)."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from skrr_export import progress


def _progress_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("progress ")]


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 0.2)
    logging.getLogger("skrr_export").setLevel(logging.INFO)
    yield
    logging.getLogger("skrr_export").setLevel(logging.NOTSET)


def test_plain_lines_count_the_outer_loop_and_tick_elapsed_time(fast, caplog):
    with caplog.at_level(logging.INFO, logger="skrr_export"):
        with progress.stage_bar("export"):
            time.sleep(0.5)  # nothing counted: elapsed time only
        with progress.stage_bar("dense distance"):
            for _ in progress.each(range(4), "sub-blocks"):
                for _ in progress.each(range(3), "tensors"):  # inside a counted loop: not counted
                    time.sleep(0.06)
    lines = caplog.messages
    assert any(line.startswith("export: 00:00 elapsed") for line in lines), lines
    counted = [line for line in lines if line.startswith("dense distance: ")]
    assert counted and all(" sub-blocks (" in line and " elapsed, about " in line for line in counted), counted
    assert not any("tensors" in line or "\r" in line for line in lines), lines
    assert _progress_threads() == []


def test_quiet_prints_nothing_and_a_failing_stage_stops_its_thread(fast, caplog):
    logging.getLogger("skrr_export").setLevel(logging.ERROR)  # -q
    with caplog.at_level(logging.ERROR, logger="skrr_export"), pytest.raises(RuntimeError):
        with progress.stage_bar("engine"):
            assert list(progress.each([1, 2], "items")) == [1, 2]
            time.sleep(0.3)
            raise RuntimeError("the builder failed")
    assert caplog.messages == [] and _progress_threads() == []
    logging.getLogger("skrr_export").setLevel(logging.INFO)
    with pytest.raises(RuntimeError), progress.stage_bar("engine"):
        assert _progress_threads()  # ticking
        raise RuntimeError("the builder failed")
    assert _progress_threads() == []
    assert list(progress.each(iter([3]), "items", total=1)) == [3]  # no open stage: a plain loop
