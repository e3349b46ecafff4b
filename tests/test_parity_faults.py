"""The main job's parity checks fail on single planted faults, at the default tolerances.

Each fault is planted in the exported graph only (the PyTorch reference stays right), one at a time, by wrapping the
export the job calls; the job must exit with a parity failure naming the check that caught it. The cases are the
weakest of benchmarks/results/parity-separation-cpu.json's kinds that run in seconds; the benchmark holds the matrix.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from skrr_export import export as export_module
from skrr_export.compare import DEFAULT_TOLERANCES
from skrr_export.errors import AccuracyError
from skrr_export.pipeline import ExportConfig, run_export

from . import planted
from .helpers import build_reference_model


def plan_file(tmp_path, family: str) -> str:
    """Two kept sub-blocks of each kind and one re-used slot each: attention slot 2 re-uses sub-block 0 (4 kept),
    FFN slot 3 re-uses 5 (1 kept)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format": "skrr-plan/1", "encoder": {"family": family, "num_blocks": 3},
                                "skip": [2, 3], "reuse": {"2": 0, "3": 5}}))
    return str(path)


def run_with(plant, tmp_path, folder, family, precision="fp32", quantization=None):
    """The main job with ``plant`` applied to the exported model.onnx (None: left correct); its report."""
    export = export_module.export_onnx

    def planted_export(*args, **kwargs):
        artifact = export(*args, **kwargs)
        if plant is not None:
            plant(artifact.path)
        return artifact

    cfg = ExportConfig(plan=plan_file(tmp_path, family), out=tmp_path / "out", model=folder, random_ids=True,
                       precision=precision, dense_distance=False, quantization=quantization)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export_module, "export_onnx", planted_export)
        try:
            run_export(cfg)
        except AccuracyError:
            pass
    return json.loads((tmp_path / "out" / "report.json").read_text())


def verify_fails(folder, check: str, capsys, only: bool = False) -> None:
    """``skrr-export verify`` on the folder fails (exit 1) in the named check (``only``: and in no other; a strong
    wiring fault may fail the precision check too)."""
    from skrr_export.cli import main

    capsys.readouterr()
    assert main(["verify", str(folder), "--json", "-q"]) == 1
    result = json.loads(capsys.readouterr().out)
    failed = {p["check"] for p in result["parity"] if p["passed"] is False}
    assert (failed == {check} if only else check in failed) and result["weights_once"]["passed"], result["parity"]


@pytest.fixture(scope="module")
def correct(tiny_models, tmp_path_factory):
    """``correct(family, precision)``: the folder of the main job on the correct export (every check passed), made
    once per module; a test plants its fault in a copy and verifies that."""
    made = {}

    def get(family: str, precision: str):
        if (family, precision) not in made:
            work = tmp_path_factory.mktemp(f"correct-{family}-{precision}")
            report = run_with(None, work, tiny_models[family][1], family, precision)
            assert all(verdicts(report).values()), report["parity"]
            made[family, precision] = work / "out"
        return made[family, precision]

    return get


def planted_copy(folder, plant, tmp_path):
    copy = tmp_path / "planted"
    shutil.copytree(folder, copy)
    plant(copy / "model.onnx")
    return copy


def verdicts(report) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for p in report["parity"]:
        out[p["check"]] = out.get(p["check"], True) and p["passed"]
    return out


@pytest.mark.parametrize("family, precision", [("bert", "fp32"), ("clip", "bf16"), ("t5", "bf16"), ("umt5", "fp16")])
@pytest.mark.parametrize("kind", ["attention", "ffn"])
def test_one_reused_slot_reading_another_sub_blocks_weight_fails_the_wiring_check(family, precision, kind, correct,
                                                                                  tmp_path, capsys):
    """Planted in a copy of the correct export and verified (the same checks as the main job's; the main job itself
    fails on planted faults below)."""
    folder = planted_copy(correct(family, precision), lambda p: planted.plant_reused_weight(p, kind, "last"), tmp_path)
    verify_fails(folder, "wiring", capsys)


def test_q_and_k_swapped_in_one_slot_fails_the_wiring_check(correct, tmp_path, capsys):
    verify_fails(planted_copy(correct("clip", "bf16"), lambda p: planted.plant_qk_swap(p, "first"), tmp_path), "wiring",
                 capsys)


def test_a_quantized_weight_reading_another_blocks_scales_fails_the_wiring_check(tiny_models, tmp_path, capsys):
    from skrr_export.quantize import quantization

    _, folder = tiny_models["bert"]
    report = run_with(lambda p: planted.plant_scales(p, "middle"), tmp_path, folder, "bert", "bf16",
                      quantization("int8", None))
    assert verdicts(report)["wiring"] is False
    verify_fails(tmp_path / "out", "wiring", capsys)


@pytest.fixture(scope="module")
def t5_at_xxl_scale(tmp_path_factory):
    """The tiny T5 with its embedding scaled up, so that the squares its norms average exceed fp16's 65504, as
    T5-v1.1-XXL's activations do."""
    model = build_reference_model("t5")
    with torch.no_grad():
        model.shared.weight.mul_(1e3)
    folder = tmp_path_factory.mktemp("t5-xxl-scale")
    model.save_pretrained(folder)
    return folder


def test_an_fp16_round_trip_in_a_norm_fails_only_the_precision_check(t5_at_xxl_scale, tmp_path, capsys):
    """The wiring check widens every Cast, so it cannot see a fault that exists only in half precision; the
    precision check, which rounds where the graph stores a half tensor, must. The same model exported correctly
    passes both; verify on a copy with the fault planted fails in the precision check only."""
    correct = run_with(None, tmp_path / "correct", t5_at_xxl_scale, "t5", "bf16")
    assert verdicts(correct) == {"wiring": True, "precision": True}, correct["parity"]
    checks = {c["check"]: c for c in correct["checks"]}  # what ran, how, and against which tolerance
    assert list(checks) == ["wiring", "precision", "policy"] and checks["policy"]["passed"]
    assert (checks["wiring"]["tolerance_key"], checks["precision"]["tolerance_key"]) == ("wiring", "precision-bf16")
    assert checks["precision"]["tolerance"]["max_token_error"] == DEFAULT_TOLERANCES["precision-bf16"].max_token_error
    folder = planted_copy(tmp_path / "correct" / "out", lambda p: planted.plant_fp16_round_trip(p, "last"), tmp_path)
    verify_fails(folder, "precision", capsys, only=True)
