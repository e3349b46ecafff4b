"""Plan parsing and validation: every error names the field and the offending value."""

from __future__ import annotations

import json

import jsonschema
import pytest

from skrr_export.errors import PlanError
from skrr_export.plan import Plan, load_plan, parse_plan, plan_schema


def plan(**overrides):
    base = {"format": "skrr-plan/1", "encoder": {"family": "t5", "num_blocks": 4}, "skip": [5, 2], "reuse": {"2": 0}}
    base.update(overrides)
    return base


def test_schedule_runs_kept_and_reused_slots_in_order():
    p = parse_plan(plan(skip=[5, 2, 7], reuse={"2": 0, "7": 3}))
    assert p.skip == (5, 2, 7)  # pruning order preserved
    assert p.schedule() == ((0, 0), (1, 1), (2, 0), (3, 3), (4, 4), (6, 6), (7, 3))
    assert p.kept == (0, 1, 3, 4, 6)


def test_skip_blocks_shorthand_skips_both_sub_blocks():
    p = parse_plan(plan(skip=[], reuse={}, skip_blocks=[1, 3]))
    assert sorted(p.skip) == [2, 3, 6, 7]


def test_round_trip_and_digest_ignores_provenance():
    p = parse_plan(plan(provenance={"by": "test"}, sparsity=0.1))
    again = parse_plan(json.loads(json.dumps(p.to_json())))
    assert again == p
    assert parse_plan(plan()).digest() == p.digest()
    assert parse_plan(plan(skip=[5, 2, 3])).digest() != p.digest()


def test_shipped_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(plan_schema())


@pytest.mark.parametrize(
    "data, message",
    [
        (plan(skip=[8]), "skip: index 8 is out of range; valid indices are 0..7"),
        (plan(skip=[2, 2]), "skip: index 2 appears more than once"),
        (plan(skip=[-1]), "skip.0: -1 is less than the minimum of 0"),
        (plan(reuse={"2": 5}), "reuse.2: source 5 is itself skipped"),
        (plan(reuse={"2": 1}), "reuse.2: source 1 is ffn but slot 2 is attention"),
        (plan(reuse={"3": 1}), "reuse.3: slot 3 is not skipped"),
        (plan(reuse={"9": 1}), "reuse.9: slot 9 is out of range"),
        (plan(reuse={"2": 10}), "reuse.2: source 10 is out of range"),
        (plan(reuse={"x": 0}), "reuse: 'x' does not match"),
        (plan(extra=1), "Additional properties are not allowed ('extra' was unexpected)"),
        (plan(encoder={"family": "gpt", "num_blocks": 4}), "encoder.family: 'gpt' is not one of"),
        (plan(encoder={"family": "t5", "num_blocks": 0}), "encoder.num_blocks: 0 is less than the minimum of 1"),
        (plan(encoder={"family": "t5"}), "encoder: 'num_blocks' is a required property"),
        (plan(format="skrr-plan/2"), "format: 'skrr-plan/1' was expected"),
        (plan(skip=list(range(8)), reuse={}), "skip: all 8 sub-blocks are skipped"),
        (plan(skip=[0, 1], reuse={}, skip_blocks=[0]), "skip_blocks: block 0 overlaps sub-block 0"),
        (plan(sparsity=1.5), "sparsity: 1.5 is greater than or equal to the maximum of 1"),
        ([1, 2], "plan: [1, 2] is not of type 'object'"),
    ],
)
def test_validation_errors_name_field_and_value(data, message):
    with pytest.raises(PlanError) as err:
        parse_plan(data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_load_plan_reports_unreadable_and_non_json_files(tmp_path):
    with pytest.raises(PlanError, match="cannot read plan file"):
        load_plan(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": ')
    with pytest.raises(PlanError, match="is not JSON: .* at line 1"):
        load_plan(bad)


def test_dense_plan_has_no_skips():
    p = Plan.dense("bert", 2)
    assert p.schedule() == ((0, 0), (1, 1), (2, 2), (3, 3))
