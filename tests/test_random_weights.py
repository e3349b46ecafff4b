"""--random-weights: the model's own initializer, seeded per module: the same command gives the same weights, another
seed other weights, and a sub-block holds the same values whichever plan asks for it."""

from __future__ import annotations

import pytest
import torch

from skrr_export import model as model_module
from skrr_export.model import ModelSource, load_encoder
from skrr_export.plan import Plan


def weights(folder, plan, seed=0):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_module, "RANDOM_WEIGHTS_SEED", seed)
        enc = load_encoder(ModelSource(folder, random_weights=True), plan)
    return {n: p.detach().clone() for n, p in enc.model.named_parameters() if not p.is_meta}


def test_seeded_per_module_and_independent_of_the_plan(tiny_models):
    _, folder = tiny_models["t5"]
    dense, pruned = Plan("t5", 3), Plan("t5", 3, skip=(2, 3), reuse={2: 0})
    first, again, other = weights(folder, dense), weights(folder, dense), weights(folder, dense, seed=1)
    assert first.keys() == again.keys() and all(torch.equal(first[n], again[n]) for n in first)
    varied = [n for n in first if first[n].std() > 0]  # norms start at a constant
    assert varied and all(not torch.equal(first[n], other[n]) for n in varied)
    subset = weights(folder, pruned)
    assert subset.keys() < first.keys() and all(torch.equal(subset[n], first[n]) for n in subset)
