"""The preflight counts the engine build (issue 26): the estimate is printed before any work, a machine that cannot
hold it is refused with both numbers, and --skip-memory-check overrides. No model is loaded in these tests."""

from __future__ import annotations

import logging

import pytest

import skrr_export.artifacts as artifacts
from skrr_export.cli import main
from skrr_export.errors import ArtifactError
from skrr_export.stages import check_footprint
from skrr_export.trt import BUILD_OVERHEAD, BUILD_WEIGHT_FACTOR, available, build_memory

from .test_apply import make_plan
from .test_cli import write_plan

GIB = 1 << 30


def test_the_estimate_is_the_largest_stage_and_is_printed(monkeypatch, caplog):
    monkeypatch.setattr(artifacts, "available_memory", lambda: 64 * GIB)
    held = {"load and export": 5 * GIB, "dense distance": 1 * GIB, "engine build": build_memory(5 * GIB)}
    with caplog.at_level(logging.INFO, logger="skrr_export"):
        check_footprint(held, skip=False)
    need = int(held["engine build"] * 1.1) + (600 << 20)
    assert f"memory estimate: {need / GIB:.1f} GiB at the peak (engine build;" in caplog.text
    assert "64.0 GiB available" in caplog.text
    assert build_memory(5 * GIB) == int(5 * GIB * BUILD_WEIGHT_FACTOR) + BUILD_OVERHEAD > 5 * GIB


def test_a_machine_that_cannot_hold_the_build_is_refused_with_both_numbers(monkeypatch):
    monkeypatch.setattr(artifacts, "available_memory", lambda: 6 * GIB)
    held = {"load and export": 5 * GIB, "engine build": build_memory(5 * GIB)}
    need = int(held["engine build"] * 1.1) + (600 << 20)
    with pytest.raises(ArtifactError, match=rf"needs about {need / GIB:.1f} GiB of host memory but 6.0 GiB is available "
                       r"\(its peak: engine build\).*--skip-memory-check"):
        check_footprint(held, skip=False)
    check_footprint(held, skip=True)  # the user knows better


@pytest.mark.skipif(not available("trt-rtx"), reason="tensorrt-rtx is not installed")
def test_the_cli_refuses_before_any_work_and_names_the_engine_stage(tiny_models, tmp_path, monkeypatch, capsys):
    _, folder = tiny_models["bert"]
    plan = write_plan(tmp_path, make_plan("bert", "dense").to_json())
    monkeypatch.setattr(artifacts, "available_memory", lambda: 256 << 20)
    argv = ["--plan", str(plan), "--model", str(folder), "--random-ids", "--engine", "trt-rtx", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "GiB is available (its peak: engine build)" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
