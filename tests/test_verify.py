"""``skrr-export verify OUT``: the checks re-run on a folder as it is. A correct export passes; a rewired node or a
changed weight fails (exit 1) and a file changed since the export is said to be; a folder it cannot read is exit 2."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from skrr_export.cli import main

from . import planted


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    """A bf16 BERT export (wiring and precision checks) with one re-used attention and FFN slot, and its plan."""
    _, folder = tiny_models["bert"]
    work = tmp_path_factory.mktemp("verify")
    plan = work / "plan.json"
    plan.write_text(json.dumps({"format": "skrr-plan/1", "encoder": {"family": "bert", "num_blocks": 3},
                                "skip": [2, 3], "reuse": {"2": 0, "3": 5}}))
    out = work / "out"
    assert main(["--plan", str(plan), "--model", str(folder), "--random-ids", "--precision", "bf16", "--out", str(out),
                 "--no-dense-distance", "-q"]) == 0
    return out


def copy_of(out, tmp_path):
    import shutil

    shutil.copytree(out, tmp_path / "copy")
    return tmp_path / "copy"


def test_a_correct_folder_passes_both_checks(exported, capsys):
    assert main(["verify", str(exported), "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {p["check"] for p in result["parity"]} == {"wiring", "precision"} and result["passed"]
    assert result["onnx_changed_since_export"] is False


def test_a_rewired_slot_fails_and_the_change_is_named(exported, tmp_path, capsys):
    folder = copy_of(exported, tmp_path)
    planted.plant_reused_weight(folder / "model.onnx", "attention", "last")
    assert main(["verify", str(folder), "-q"]) == 1
    captured = capsys.readouterr()
    assert "changed since the export" in captured.out and "wiring check: " in captured.out
    assert "verify: the wiring check failed" in captured.err


def test_a_changed_weight_fails(exported, tmp_path):
    folder = copy_of(exported, tmp_path)
    model = onnx.load(str(folder / "model.onnx"))
    weight = next(i for i in model.graph.initializer if i.name.endswith("attention.self.key.weight"))
    raw = np.frombuffer(weight.raw_data, dtype=np.uint16).copy()
    raw[: raw.size // 2] = raw[raw.size // 2: 2 * (raw.size // 2)]  # half of the key's rows replaced by the others
    weight.raw_data = raw.tobytes()
    onnx.save(model, str(folder / "model.onnx"))
    assert main(["verify", str(folder), "-q"]) == 1


def test_a_folder_without_its_report_or_with_other_random_weights_is_refused(exported, tmp_path, capsys):
    folder = copy_of(exported, tmp_path)
    (folder / "report.json").unlink()
    assert main(["verify", str(folder)]) == 2
    assert "holds no report.json" in capsys.readouterr().err
    folder = copy_of(exported, tmp_path / "b")
    report = json.loads((folder / "report.json").read_text())
    report["model"]["random_weights"], report["tool"]["torch"] = True, "0.0"
    (folder / "report.json").write_text(json.dumps(report))
    assert main(["verify", str(folder)]) == 2
    assert "other library versions" in capsys.readouterr().err
