"""Pure refactoring leaves behaviour unchanged: the main job's model.onnx stores the same weights (each initializer's
name, dtype, shape and bytes), takes and gives the same inputs and outputs, and computes the same values (ONNX
Runtime on a fixed batch, within 1e-5) as the recorded run.

Nothing here depends on a library's version: the tiny models' weights are drawn by torch's seeded generator in
parameter-name order (not by Hugging Face's initializers, which may change), and the comparison is of what the file
holds and computes, not of its bytes (another exporter version may order or name its nodes otherwise). A change meant
to alter the output re-records it, and says so in its commit:
    python -m tests.test_refactor_identity --record
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from skrr_export.cli import main
from skrr_export.runners import OrtFp32ArithmeticRunner, OrtRunner

from .helpers import build_reference_model, ids_and_mask
from .test_apply import make_plan

RECORD = Path(__file__).parent / "golden" / "refactor-identity.json"
VALUES = RECORD.with_suffix(".npz")
CASES = [("t5", "heavy-reuse", "fp32"), ("bert", "heavy-reuse", "fp32"), ("clip", "heavy-reuse", "fp32"),
         ("t5", "heavy-reuse", "bf16")]
ATOL = 1e-5  # fp32 arithmetic on both sides; another ONNX Runtime may sum in another order (measured: 0 here)


def seeded_model(family: str, folder: Path) -> None:
    """The tiny model with every parameter drawn from torch's generator (seed 0, parameters in name order):
    vectors around 1 (norm scales) and biases alike, matrices N(0, 0.2^2)."""
    model = build_reference_model(family)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            values = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_(1 + 0.1 * values if p.dim() == 1 else 0.2 * values)
    model.save_pretrained(folder)


def exported(family: str, plan_kind: str, precision: str, tmp: Path) -> Path:
    folder = tmp / f"{family}-model"
    seeded_model(family, folder)
    plan = tmp / f"{family}-plan.json"
    plan.write_text(json.dumps(make_plan(family, plan_kind).to_json()))
    out = tmp / f"{family}-{precision}-out"
    assert main(["--plan", str(plan), "--model", str(folder), "--random-ids", "--out", str(out), "--precision",
                 precision, "--no-dense-distance", "-q"]) == 0
    return out / "model.onnx"


def contents(path: Path, precision: str) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """What the file stores and takes (weights by name with dtype, shape and sha256; inputs; outputs) and what ONNX
    Runtime computes from it on the fixed batch (half precision: in fp32 arithmetic on its own weights)."""
    model = onnx.load(str(path))
    weights = {i.name: [i.data_type, list(i.dims), hashlib.sha256(onnx.numpy_helper.to_array(i).tobytes()).hexdigest()]
               for i in model.graph.initializer if "." in i.name}  # checkpoint names; the exporter's constants have no dot
    io = {"inputs": [(v.name, v.type.tensor_type.elem_type) for v in model.graph.input],
          "outputs": [(v.name, v.type.tensor_type.elem_type) for v in model.graph.output]}
    ids, mask = ids_and_mask()
    batch = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    feed = {name: batch.get(name, np.zeros_like(batch["input_ids"])) for name, _ in io["inputs"]}  # BERT's segments
    runner = OrtRunner(path) if precision == "fp32" else OrtFp32ArithmeticRunner(path, precision)
    with runner:
        values = {k: np.asarray(v, np.float32) for k, v in runner.infer(feed).items()}
    return {"weights": weights, **io}, values


def _key(case: tuple[str, str, str]) -> str:
    return "/".join(case)


@pytest.fixture(scope="module")
def export_of(tmp_path_factory):
    """case -> its model.onnx, exported once for the module."""
    made: dict[tuple[str, str, str], Path] = {}

    def get(case: tuple[str, str, str]) -> Path:
        if case not in made:
            made[case] = exported(*case, tmp_path_factory.mktemp(_key(case).replace("/", "-")))
        return made[case]

    return get


@pytest.mark.parametrize("case", CASES, ids=_key)
def test_output_is_the_recorded_one(case, export_of):
    record = json.loads(RECORD.read_text())["cases"][_key(case)]
    stored, values = contents(export_of(case), case[2])
    assert json.loads(json.dumps(stored)) == record, (
        "the export stores or takes something else; if that was meant, re-record: python -m tests.test_refactor_identity --record")
    recorded = np.load(VALUES)
    for name, value in values.items():
        np.testing.assert_allclose(value, recorded[f"{_key(case)}/{name}"], rtol=0, atol=ATOL, err_msg=name)


def test_a_changed_weight_or_value_is_seen(export_of, tmp_path):
    """The comparison fails on one weight's bytes changed in the file (planted)."""
    model = onnx.load(str(export_of(("bert", "heavy-reuse", "fp32"))))
    path = tmp_path / "model.onnx"
    weight = next(i for i in model.graph.initializer if i.name.endswith("attention.self.key.weight"))
    array = onnx.numpy_helper.to_array(weight).copy()
    array[0, 0] += 1e-3
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save(model, str(path))
    stored, values = contents(path, "fp32")
    assert stored != json.loads(RECORD.read_text())["cases"]["bert/heavy-reuse/fp32"]
    recorded = np.load(VALUES)
    assert np.abs(values["last_hidden_state"] - recorded["bert/heavy-reuse/fp32/last_hidden_state"]).max() > ATOL


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    cases, arrays = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for c in CASES:
            work = Path(tmp) / _key(c).replace("/", "-")
            work.mkdir()
            cases[_key(c)], values = contents(exported(*c, work), c[2])
            arrays |= {f"{_key(c)}/{k}": v for k, v in values.items()}
    RECORD.write_text(json.dumps({"cases": cases}, indent=1) + "\n")
    np.savez_compressed(VALUES, **arrays)
    print(f"recorded {RECORD} and {VALUES}")
