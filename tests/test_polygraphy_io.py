"""Polygraphy re-checks an export with the parity data the job saves beside it (where polygraphy installs)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from skrr_export.cli import main

from .helpers import plant_wiring_error
from .test_apply import make_plan
from .test_cli import write_plan

pytest.importorskip("polygraphy", reason="polygraphy is not installed (pip install 'skrr-export[polygraphy]')")


def polygraphy_run(folder) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    """The README's command, in the artifact folder (tolerances: fp32 ONNX Runtime vs PyTorch on a tiny model)."""
    command = json.loads((folder / "report.json").read_text())["polygraphy"]["command"].split()
    assert command[:2] == ["polygraphy", "run"]
    runner = shutil.which("polygraphy")
    assert runner, "polygraphy's console script is not on PATH"
    return subprocess.run([runner, *command[1:], "--atol", "1e-4", "--rtol", "1e-3"], cwd=folder, capture_output=True,
                          text=True)


@pytest.mark.parametrize("family", ["t5", "clip"])  # one output; three (CLIP's pooled output is not per token)
def test_polygraphy_rechecks_the_export_and_catches_a_wrong_reuse(family, tiny_models, tmp_path):
    _, folder = tiny_models[family]
    out = tmp_path / "out"
    plan = write_plan(tmp_path, make_plan(family, "heavy-reuse").to_json())
    assert main(["--plan", str(plan), "--model", str(folder), "--random-ids", "--out", str(out), "--no-dense-distance", "-q"]) == 0
    assert (out / "parity_inputs.json").is_file() and (out / "parity_reference.json").is_file()
    ok = polygraphy_run(out)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert "PASSED" in ok.stdout + ok.stderr
    plant_wiring_error(out / "model.onnx", every=True)
    bad = polygraphy_run(out)
    assert bad.returncode != 0 and "FAILED" in bad.stdout + bad.stderr


def test_bf16_exports_say_why_there_is_no_polygraphy_data(tiny_models, tmp_path):
    _, folder = tiny_models["t5"]
    out = tmp_path / "out"
    plan = write_plan(tmp_path, make_plan("t5", "skip-only").to_json())
    assert main(["--plan", str(plan), "--model", str(folder), "--random-ids", "--out", str(out), "--precision", "bf16",
                 "--no-dense-distance", "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["polygraphy"] == {"written": False, "reason": "Polygraphy has no bf16 path (numpy has no bfloat16)"}
    assert not (out / "parity_inputs.json").exists()
    assert "Polygraphy parity data: not written" in (out / "report.md").read_text()
