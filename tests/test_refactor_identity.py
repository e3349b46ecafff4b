"""Pure refactoring leaves behaviour unchanged: the main job's model.onnx and every number of its report (timings,
paths and versions aside) are byte-identical to the recorded ones.

The record holds the library versions it was made with; under other versions the test skips (their exporters
write other bytes). A change meant to alter the output re-records it, and says so in its commit:
    python -m tests.test_refactor_identity --record
"""

from __future__ import annotations

import hashlib
import json
import sys
from importlib import metadata
from pathlib import Path

import pytest

from skrr_export.cli import main

from .helpers import build_reference_model
from .test_apply import make_plan

RECORD = Path(__file__).parent / "golden" / "refactor-identity.json"
PACKAGES = ("torch", "transformers", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "numpy")
CASES = [("t5", "heavy-reuse", "fp32"), ("bert", "heavy-reuse", "fp32"), ("clip", "heavy-reuse", "fp32"),
         ("t5", "heavy-reuse", "bf16")]
VOLATILE = ("seconds", "tool", "path", "model", "provenance")  # report keys that say when, where and with what, not what


def versions() -> dict[str, str]:
    return {p: metadata.version(p) for p in PACKAGES}


def digests(family: str, plan_kind: str, precision: str, tmp: Path) -> dict[str, str]:
    """sha256 of model.onnx and of the report's numbers, for one run of the main job on a seeded tiny model."""
    folder = tmp / f"{family}-model"
    build_reference_model(family).save_pretrained(folder)
    plan = tmp / f"{family}-plan.json"
    plan.write_text(json.dumps(make_plan(family, plan_kind).to_json()))
    out = tmp / f"{family}-{precision}-out"
    assert main(["--plan", str(plan), "--model", str(folder), "--random-ids", "--out", str(out), "--precision", precision, "-q"]) == 0
    report = _without(json.loads((out / "report.json").read_text()), VOLATILE)
    return {"model.onnx": _sha256((out / "model.onnx").read_bytes()),
            "report numbers": _sha256(json.dumps(report, sort_keys=True).encode())}


def _without(value: object, keys: tuple[str, ...]) -> object:
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _key(case: tuple[str, str, str]) -> str:
    return "/".join(case)


@pytest.mark.parametrize("case", CASES, ids=_key)
def test_output_is_byte_identical_to_the_record(case, tmp_path):
    record = json.loads(RECORD.read_text())
    if record["versions"] != versions():
        pytest.skip(f"recorded with {record['versions']}; this machine has {versions()}")
    assert digests(*case, tmp_path) == record["cases"][_key(case)], (
        "the export or its report changed; if that was meant, re-record: python -m tests.test_refactor_identity --record")


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cases = {_key(c): digests(*c, Path(tmp) / _key(c).replace("/", "-")) for c in CASES}
    RECORD.write_text(json.dumps({"versions": versions(), "cases": cases}, indent=2) + "\n")
    print(f"recorded {RECORD}")
