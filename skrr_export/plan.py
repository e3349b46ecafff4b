"""The plan file (format ``skrr-plan/1``): parsing, validation and the slot schedule it implies."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import PlanError

FORMAT = "skrr-plan/1"
FAMILIES = ("t5", "umt5", "clip", "bert")
SPARSITY_TOLERANCE = 5e-4  # plans state sparsity to about four decimals


@cache
def plan_schema() -> dict[str, Any]:
    """The JSON Schema shipped with the package."""
    return json.loads(resources.files("skrr_export").joinpath("plan.schema.json").read_text())


def kind_of(slot: int) -> str:
    """Sub-block 2b is attention, 2b+1 feed-forward."""
    return "attention" if slot % 2 == 0 else "ffn"


def slot_sources(num_slots: int, skip: tuple[int, ...], reuse: dict[int, int] | None = None) -> tuple[int | None, ...]:
    """Per slot, the sub-block whose weights run there, or None where the slot is empty: the one rule that turns
    skip and re-use into a schedule (plans, and calibration's candidates)."""
    reuse = reuse or {}
    skipped = set(skip)
    return tuple(reuse.get(s) if s in skipped else s for s in range(num_slots))


@dataclass(frozen=True)
class Plan:
    family: str
    num_blocks: int
    skip: tuple[int, ...] = ()
    reuse: dict[int, int] = field(default_factory=dict)
    sparsity: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def num_slots(self) -> int:
        return 2 * self.num_blocks

    @property
    def kept(self) -> tuple[int, ...]:
        skipped = set(self.skip)
        return tuple(i for i in range(self.num_slots) if i not in skipped)

    def source(self, slot: int) -> int | None:
        """The sub-block whose weights run at ``slot``, or None when the slot is empty."""
        return slot_sources(self.num_slots, self.skip, self.reuse)[slot]

    def schedule(self) -> tuple[tuple[int, int], ...]:
        """(slot, source sub-block) for every slot that executes, in order."""
        pairs = enumerate(slot_sources(self.num_slots, self.skip, self.reuse))
        return tuple((slot, src) for slot, src in pairs if src is not None)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "encoder": {"family": self.family, "num_blocks": self.num_blocks},
            "skip": list(self.skip),
            "reuse": {str(k): v for k, v in sorted(self.reuse.items())},
        }
        if self.sparsity is not None:
            out["sparsity"] = self.sparsity
        if self.provenance:
            out["provenance"] = self.provenance
        return out

    def digest(self) -> str:
        """sha256 of what determines the computation (provenance and sparsity excluded)."""
        core = {k: v for k, v in self.to_json().items() if k in ("format", "encoder", "skip", "reuse")}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()

    @classmethod
    def dense(cls, family: str, num_blocks: int) -> Plan:
        return cls(family=family, num_blocks=num_blocks)

    def check_fits(self, family: str, num_blocks: int) -> None:
        """The model must be of the plan's family and depth."""
        if self.family != family:
            raise PlanError(f"encoder.family: plan is for '{self.family}' but the model is '{family}'")
        if self.num_blocks != num_blocks:
            raise PlanError(f"encoder.num_blocks: plan has {self.num_blocks} blocks but the model has {num_blocks}")

    def check_sparsity(self, computed: float) -> None:
        """A stated sparsity must be what the plan removes from this model (``computed``)."""
        if self.sparsity is not None and abs(self.sparsity - computed) > SPARSITY_TOLERANCE:
            raise PlanError(
                f"sparsity: plan states {self.sparsity:.4f} but it removes {computed:.4f} of this model's "
                "parameters; fix or drop the field"
            )


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file; every problem is a PlanError naming the field and the value."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PlanError(f"cannot read plan file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError(f"plan file {path} is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    return parse_plan(data)


def parse_plan(data: Any) -> Plan:
    _check_schema(data)
    enc = data["encoder"]
    num_blocks = enc["num_blocks"]
    num_slots = 2 * num_blocks
    skip = list(data.get("skip", []))
    _check_indices("skip", skip, num_slots)
    blocks = list(data.get("skip_blocks", []))
    _check_indices("skip_blocks", blocks, num_blocks)
    for b in blocks:
        for slot in (2 * b, 2 * b + 1):
            if slot in skip:
                raise PlanError(f"skip_blocks: block {b} overlaps sub-block {slot} already listed in skip")
            skip.append(slot)
    if len(skip) >= num_slots:
        raise PlanError(f"skip: all {num_slots} sub-blocks are skipped; a plan must keep at least one")
    reuse = {int(k): v for k, v in data.get("reuse", {}).items()}
    _check_reuse(reuse, set(skip), num_slots)
    return Plan(
        family=enc["family"],
        num_blocks=num_blocks,
        skip=tuple(skip),
        reuse=reuse,
        sparsity=data.get("sparsity"),
        provenance=data.get("provenance", {}),
    )


def _check_schema(data: Any) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(plan_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "plan"
        raise PlanError(f"{where}: {err.message}")


def _check_indices(name: str, values: list[int], limit: int) -> None:
    seen: set[int] = set()
    for v in values:
        if v >= limit:
            raise PlanError(f"{name}: index {v} is out of range; valid indices are 0..{limit - 1}")
        if v in seen:
            raise PlanError(f"{name}: index {v} appears more than once")
        seen.add(v)


def _check_reuse(reuse: dict[int, int], skipped: set[int], num_slots: int) -> None:
    for target, src in sorted(reuse.items()):
        where = f"reuse.{target}"
        if target >= num_slots:
            raise PlanError(f"{where}: slot {target} is out of range; valid slots are 0..{num_slots - 1}")
        if src >= num_slots:
            raise PlanError(f"{where}: source {src} is out of range; valid sub-blocks are 0..{num_slots - 1}")
        if target not in skipped:
            raise PlanError(f"{where}: slot {target} is not skipped; only a skipped slot can re-use a sub-block")
        if src in skipped:
            raise PlanError(f"{where}: source {src} is itself skipped; re-use a kept sub-block")
        if kind_of(src) != kind_of(target):
            raise PlanError(
                f"{where}: source {src} is {kind_of(src)} but slot {target} is {kind_of(target)}; "
                "re-use must stay within one kind"
            )
