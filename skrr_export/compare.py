"""Comparing named outputs: per-output statistics over real tokens, per-precision tolerances,
results that are truthy when they pass and say which tolerance would have passed when they fail."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .errors import UserError

log = logging.getLogger("skrr_export")


@dataclass(frozen=True)
class Tolerance:
    """Per real token: cosine >= ``min_cosine`` and ``||test - ref|| / ||ref|| <= max_token_error`` (scale-free:
    it also catches a token whose norm changes, which cosine does not). Element-wise ``|test - ref| <= atol +
    rtol * |ref|`` where ``atol`` is given (None: not checked; absolute errors depend on the model's scale)."""

    atol: float | None
    rtol: float
    min_cosine: float
    max_token_error: float | None = None


# The statistics a parity result reports (OutputStats field -> the name a person reads), in report order.
STATISTICS = {"max_token_error": "token error", "min_cosine": "min cos", "max_abs": "max abs", "mean_abs": "mean abs",
              "max_rel": "max rel", "mean_cosine": "mean cos"}
INFORMATION_ONLY = ("absolute errors depend on the model's scale, and relative error |test - ref| / |ref| grows "
                    "without bound at elements whose reference is near zero (values above 1 are normal in bf16), so "
                    "neither separates a correct export from a faulty one; the token error is scale-free "
                    "per token (benchmarks/README.md, parity separation)")


# The statistic (``STATISTICS`` key) each ``Tolerance`` field bounds: min_cosine from below, the others from above
# (max_abs through atol + rtol * |ref|: ``OutputStats.needed_atol``). The one rule of pass/fail (``OutputStats.within``).
BOUNDED_BY = {"max_token_error": "max_token_error", "min_cosine": "min_cosine", "max_abs": "atol"}


def deciding(tol: Tolerance) -> tuple[str, ...]:
    """The statistics (``STATISTICS`` keys) that ``tol`` bounds, i.e. that decide pass/fail; the rest are reported
    for information. NaN/Inf always decides."""
    return tuple(s for s, bound in BOUNDED_BY.items() if getattr(tol, bound) is not None)


# Per check (checks.py): "wiring" (the graph and PyTorch both computing in fp32 on the same stored weights, every
# precision) and "precision-<p>" (the graph as shipped in its precision against PyTorch in that precision: emulated
# on ONNX Runtime's CPU provider, or CUDA / TensorRT). Set from benchmarks/results/parity-separation-cpu.json
# (benchmarks/README.md, "Parity: separation of correct and faulty exports"; 28 cases, 10 seeds per family's small
# model). Token error decides; cosine does not separate (BERT's weakest fault: 1 - cos ~ 2e-8).
# - wiring: worst correct 3.6e-6 (T5 fp32, 10 seeds), weakest single fault 2.1e-4 (BERT, a re-used slot's key):
#   3e-5 sits ~8x from each; per model the two are >= 490x apart.
# - precision-bf16: worst correct 0.052 (T5, 10 seeds), the fp16 round trip at T5-XXL scale 1.0; precision-fp16:
#   worst correct 0.0049. Miswired slots are the wiring check's (bf16 T5 q/k swap: 0.19, 3.8x the noise here).
# "precision-fp32" is what CUDA and the engines run in fp32; no GPU has measured it yet, so it keeps the earlier bound.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "wiring": Tolerance(atol=None, rtol=0.0, min_cosine=0.9999, max_token_error=3e-5),
    "precision-fp32": Tolerance(atol=None, rtol=0.0, min_cosine=0.997, max_token_error=0.08),
    "precision-fp16": Tolerance(atol=None, rtol=0.0, min_cosine=0.999, max_token_error=0.03),
    "precision-bf16": Tolerance(atol=None, rtol=0.0, min_cosine=0.99, max_token_error=0.15),
}


def tolerance_for(check: str, recipe: dict[str, dict[str, float]] | None = None,
                  overrides: dict[str, float] | None = None) -> Tolerance:
    """The check's default, then the recipe's tolerance for it (which may only tighten it), then each value given
    on the command line."""
    base = DEFAULT_TOLERANCES[check]
    if recipe and check in recipe:
        tighter = Tolerance(**recipe[check])
        looser = looser_fields(tighter, base)
        if looser:
            raise UserError(f"the recipe's '{check}' tolerance loosens the default ({', '.join(looser)}); "
                            "a recipe may only tighten it: pass a flag (--max-token-error ...) to loosen one run")
        base = tighter
    return replace(base, **(overrides or {}))


def looser_fields(tol: Tolerance, default: Tolerance) -> list[str]:
    """The bounds of ``tol`` that admit more than ``default``'s."""
    out = []
    if tol.min_cosine < default.min_cosine:
        out.append(f"min_cosine {tol.min_cosine:g} < {default.min_cosine:g}")
    if default.max_token_error is not None and (tol.max_token_error is None or tol.max_token_error > default.max_token_error):
        out.append(f"max_token_error {tol.max_token_error} > {default.max_token_error:g}")
    if default.atol is not None and (tol.atol is None or tol.atol > default.atol):
        out.append(f"atol {tol.atol} > {default.atol:g}")
    return out


@dataclass(frozen=True)
class OutputStats:
    name: str
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    min_cosine: float
    mean_cosine: float
    nonfinite: int
    tolerance: Tolerance
    needed_atol: float  # smallest atol that passes at this rtol
    max_token_error: float = 0.0  # max over real tokens of ||test - ref|| / ||ref||

    def within(self, statistic: str) -> bool:
        """Whether ``statistic`` (one of ``deciding(self.tolerance)``) is within its bound."""
        bound = getattr(self.tolerance, BOUNDED_BY[statistic])
        if statistic == "min_cosine":
            return self.min_cosine >= bound
        return (self.needed_atol if statistic == "max_abs" else getattr(self, statistic)) <= bound

    @property
    def passed(self) -> bool:
        return self.nonfinite == 0 and all(self.within(s) for s in deciding(self.tolerance))

    def failure(self) -> str:
        if self.nonfinite:
            return f"{self.name}: {self.nonfinite} NaN/Inf values"
        tol = self.tolerance
        says = {
            "max_token_error": lambda: f"token error {self.max_token_error:.3g} exceeds {tol.max_token_error:g}; "
                                       f"max_token_error={self.max_token_error * 1.0001:.3g} would have passed",
            "min_cosine": lambda: f"min cosine {self.min_cosine:.6f} below {tol.min_cosine:g}; "
                                  f"min_cosine={np.floor(self.min_cosine * 1e6) / 1e6:.6f} would have passed",
            "max_abs": lambda: f"max abs error {self.max_abs:.3g} exceeds atol {tol.atol:g} (rtol {tol.rtol:g}); "
                               f"atol={self.needed_atol:.3g} would have passed",
        }
        return f"{self.name}: " + "; ".join(says[s]() for s in deciding(tol) if not self.within(s))


@dataclass(frozen=True)
class Comparison:
    reference: str
    test: str
    outputs: list[OutputStats] = field(default_factory=list)

    def __bool__(self) -> bool:
        return all(o.passed for o in self.outputs)

    def failures(self) -> list[str]:
        return [o.failure() for o in self.outputs if not o.passed]

    def __str__(self) -> str:
        verdict = "PASSED" if self else "FAILED: " + " | ".join(self.failures())
        return f"{self.test} vs {self.reference}: {verdict}"

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "test": self.test,
            "passed": bool(self),
            "outputs": [asdict(o) | {"passed": o.passed} for o in self.outputs],
        }


def rows(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Real (unpadded) token vectors of a (batch, seq, dim) output, or the rows of a (batch, dim) one."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 3 and mask is not None:
        return array[mask.astype(bool)]
    return array.reshape(-1, array.shape[-1])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), np.where(np.abs(a).sum(-1) + np.abs(b).sum(-1) == 0, 1.0, 0.0))


def output_stats(name: str, ref: np.ndarray, test: np.ndarray, mask: np.ndarray | None, tol: Tolerance) -> OutputStats:
    if np.shape(ref) != np.shape(test):
        raise ValueError(f"{name}: shapes differ, reference {np.shape(ref)} vs test {np.shape(test)}")
    r, t = rows(ref, mask), rows(test, mask)
    nonfinite = int((~np.isfinite(t)).sum() + (~np.isfinite(r)).sum())
    if nonfinite:
        nan = float("nan")
        return OutputStats(name, nan, nan, nan, nan, nan, nan, nonfinite, tol, nan, nan)
    err = np.abs(r - t)
    rel = err / np.maximum(np.abs(r), np.finfo(np.float32).tiny)
    cos = cosine(r, t)
    diff, norm = np.linalg.norm(r - t, axis=-1), np.linalg.norm(r, axis=-1)
    token_error = np.where(norm > 0, diff / np.maximum(norm, 1e-300), np.where(diff > 0, np.inf, 0.0))
    return OutputStats(
        name=name,
        max_abs=float(err.max()),
        mean_abs=float(err.mean()),
        max_rel=float(rel.max()),
        mean_rel=float(rel.mean()),
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        nonfinite=0,
        tolerance=tol,
        needed_atol=float(max((err - tol.rtol * np.abs(r)).max(), 0.0)),
        max_token_error=float(token_error.max()),
    )


def compare(
    reference: tuple[str, dict[str, np.ndarray]],
    test: tuple[str, dict[str, np.ndarray]],
    mask: np.ndarray | None,
    tolerances: dict[str, Tolerance],
) -> Comparison:
    """Every output of ``reference`` compared with ``test``; ``tolerances`` maps output name (or '*') to bounds."""
    (ref_name, ref), (test_name, out) = reference, test
    stats = []
    for name, value in ref.items():
        if name not in out:
            raise ValueError(f"{test_name} has no output '{name}' (it has {sorted(out)})")
        stats.append(output_stats(name, value, out[name], mask, tolerances.get(name, tolerances["*"])))
    return Comparison(reference=ref_name, test=test_name, outputs=stats)


def distance(dense: dict[str, np.ndarray], pruned: dict[str, np.ndarray], mask: np.ndarray | None) -> dict[str, dict[str, float]]:
    """What a plan costs: MSE and cosine of the pruned outputs against the dense model's, over real tokens."""
    out = {}
    for name, d in dense.items():
        r, t = rows(d, mask), rows(pruned[name], mask)
        cos = cosine(r, t)
        out[name] = {
            "mse": float(((r - t) ** 2).mean()),
            "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min()),
            "dense_norm": float(np.linalg.norm(r, axis=-1).mean()),
            "pruned_norm": float(np.linalg.norm(t, axis=-1).mean()),
        }
    return out


def runner_parity(reference: dict[str, Any], runner: Any, batches: Any, tolerances: dict[str, Tolerance],
                  reference_name: str = "pytorch", check: str | None = None) -> list[dict[str, Any]]:
    """``reference`` (outputs per batch label) vs what ``runner`` computes on every batch; one result per batch.
    ``check``: the check's name (wiring, precision), for the log line."""
    results = []
    with runner:
        for batch in batches:
            result = compare((reference_name, reference[batch.label]), (runner.name, runner.infer(batch.feed)),
                             batch.mask, tolerances)
            log.info("%s%s on the %s (%s)", f"{check} check: " if check else "", result, batch.label, batch.source)
            results.append(result.to_json() | {"batch": f"{batch.label}, {batch.source}"})
    return results
