"""The comparator against statistics computed independently (torch, explicit loops over real tokens)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from skrr_export.compare import Tolerance, compare, distance

TOL = Tolerance(atol=1e-3, rtol=1e-3, min_cosine=0.999)


def batch(seed=0):
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(2, 5, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    return ref, mask


def real_tokens(a, mask):
    return [a[b, s] for b in range(a.shape[0]) for s in range(a.shape[1]) if mask[b, s]]


def test_statistics_match_an_independent_computation():
    ref, mask = batch()
    test = ref + np.random.default_rng(1).normal(scale=1e-4, size=ref.shape).astype(np.float32)
    test[1, 3:] += 100.0  # padded positions must not count
    result = compare(("torch", {"h": ref}), ("ort", {"h": test}), mask, {"*": TOL})
    stats = result.outputs[0]
    r, t = torch.tensor(np.stack(real_tokens(ref, mask))), torch.tensor(np.stack(real_tokens(test, mask)))
    assert stats.max_abs == pytest.approx(float((r - t).abs().max()), rel=1e-6)
    assert stats.mean_abs == pytest.approx(float((r - t).abs().mean()), rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(r.double(), t.double(), dim=-1)
    assert stats.min_cosine == pytest.approx(float(cos.min()), abs=1e-12)
    assert stats.mean_cosine == pytest.approx(float(cos.mean()), abs=1e-12)
    assert result and stats.passed


def test_failure_names_output_statistic_and_passing_tolerance():
    ref, mask = batch()
    test = ref.copy()
    test[0, 2, 3] += 0.05
    result = compare(("torch", {"h": ref}), ("ort", {"h": test}), mask, {"*": TOL})
    assert not result
    message = result.failures()[0]
    assert message.startswith("h: max abs error 0.05")
    needed = 0.05 - 1e-3 * abs(float(ref[0, 2, 3]))  # |err| - rtol*|ref| at the worst element
    assert result.outputs[0].needed_atol == pytest.approx(needed, rel=1e-3)
    loose = compare(("torch", {"h": ref}), ("ort", {"h": test}), mask,
                    {"*": Tolerance(atol=result.outputs[0].needed_atol * 1.0001, rtol=1e-3, min_cosine=0.99)})
    assert loose, "the tolerance the failure names must pass"


def test_nan_and_inf_fail_loudly():
    ref, mask = batch()
    test = ref.copy()
    test[0, 0, 0] = np.nan
    test[1, 1, 1] = np.inf
    result = compare(("torch", {"h": ref}), ("ort", {"h": test}), mask, {"*": TOL})
    assert not result
    assert result.failures() == ["h: 2 NaN/Inf values"]


def test_pooled_outputs_are_compared_per_row_and_tolerances_per_output():
    ref = np.random.default_rng(0).normal(size=(3, 4))
    test = ref * 1.01
    tols = {"*": TOL, "pooled": Tolerance(atol=0.1, rtol=0.0, min_cosine=0.999)}
    result = compare(("a", {"pooled": ref, "h": ref[None]}), ("b", {"pooled": test, "h": test[None]}), None, tols)
    by_name = {o.name: o for o in result.outputs}
    assert by_name["pooled"].passed and not by_name["h"].passed
    assert by_name["pooled"].min_cosine == pytest.approx(1.0)


def test_distance_is_mse_and_cosine_over_real_tokens():
    ref, mask = batch()
    pruned = ref * 2.0
    d = distance({"h": ref}, {"h": pruned}, mask)["h"]
    r = np.stack(real_tokens(ref, mask)).astype(np.float64)
    assert d["mse"] == pytest.approx(float((r**2).mean()), rel=1e-9)
    assert d["mean_cosine"] == pytest.approx(1.0)
    assert d["pruned_norm"] == pytest.approx(2 * d["dense_norm"])


def test_token_error_is_scale_free_and_catches_a_norm_change_cosine_misses():
    ref, mask = batch()
    test = ref.copy()
    test[0, 1] *= 1.5  # same direction, norm x1.5: cosine 1, token error 0.5
    tol = Tolerance(atol=None, rtol=0.0, min_cosine=0.999, max_token_error=0.1)
    result = compare(("torch", {"h": ref}), ("ort", {"h": test}), mask, {"*": tol})
    stats = result.outputs[0]
    r, t = np.stack(real_tokens(ref, mask)).astype(np.float64), np.stack(real_tokens(test, mask)).astype(np.float64)
    assert stats.max_token_error == pytest.approx(float((np.linalg.norm(t - r, axis=1) / np.linalg.norm(r, axis=1)).max()))
    assert stats.max_token_error == pytest.approx(0.5) and stats.min_cosine == pytest.approx(1.0)
    assert not result and "max_token_error=0.5" in result.failures()[0]
    scaled = compare(("torch", {"h": ref * 1000}), ("ort", {"h": test * 1000}), mask, {"*": tol}).outputs[0]
    assert scaled.max_token_error == pytest.approx(stats.max_token_error), "independent of the output's scale"
    bumped = ref.copy()
    bumped[0, 2, 3] += 0.05  # fails atol 1e-3 (test above); without atol only the token criteria judge it
    no_atol = Tolerance(atol=None, rtol=0.0, min_cosine=0.99, max_token_error=0.1)
    assert compare(("torch", {"h": ref}), ("ort", {"h": bumped}), mask, {"*": no_atol})
    assert not compare(("torch", {"h": ref}), ("ort", {"h": bumped}), mask, {"*": replace(no_atol, atol=1e-3)})
