"""Calibration that a NaN cannot hijack, and a resume that survives the memory plan (issue 25, items 4 and 5).

The search logic is checked against an independent plain beam search on a discrepancy given by a formula (a table
scorer), so that NaN can be planted exactly where wanted; the resume on a tiny T5 with a tokenizer (so that the
padding differs with the batch size)."""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path

import pytest
import torch

import skrr_export.calibrate as cal
from skrr_export.calibrate import CalibrationConfig, Scorer, calibrate, reuse_search, schedule_of, skip_search
from skrr_export.cli import main
from skrr_export.errors import AccuracyError
from skrr_export.plan import load_plan

from .test_calibrate import same_or_near_tie, tiny_t5
from .test_tokenizer_lookup import write_tokenizer

N = 8  # slots of the table scorer


class TableScorer:
    """D of a schedule from a formula: a cost per skipped slot plus a pair term (so the order of choices matters),
    minus a gain per re-use. NaN for every schedule that skips ``poisoned`` or re-uses ``poisoned_reuse``
    (slot, source). Answers the two calls the search makes, counting the NaNs it returns."""

    def __init__(self, poisoned: int | None = None, poisoned_reuse: tuple[int, int] | None = None,
                 costs: dict[int, float] | None = None):
        self.num_slots, self.evaluations, self.nans = N, 0, 0
        self.costs = {t: 1.0 + 0.37 * ((5 * t) % N) for t in range(N)} | (costs or {})
        self.poisoned, self.poisoned_reuse = poisoned, poisoned_reuse

    def d(self, schedule: tuple[int | None, ...]) -> float:
        skipped = [t for t, s in enumerate(schedule) if s is None]
        reused = {t: s for t, s in enumerate(schedule) if s is not None and s != t}
        if self.poisoned in skipped or (self.poisoned_reuse is not None and self.poisoned_reuse in reused.items()):
            self.nans += 1
            return math.nan
        pairs = sum(self.costs[a] * self.costs[b] for a, b in itertools.combinations(skipped + list(reused), 2))
        gains = sum(0.4 * self.costs[t] / (1 + abs(t - s)) for t, s in reused.items())
        return sum(self.costs[t] for t in skipped) + sum(self.costs[t] for t in reused) + 0.01 * pairs - gains

    def score(self, base: tuple[int | None, ...], branches: list[tuple[int, int | None]]) -> list[float]:
        return [self.d(tuple(src if t == slot else s for t, s in enumerate(base))) for slot, src in branches]

    def score_full(self, schedules: list[tuple[int | None, ...]]) -> list[float]:
        return [self.d(s) for s in schedules]

    def discrepancy(self, schedule: tuple[int | None, ...]) -> float:
        return self.d(schedule)


def plain_beam_search(d, steps: int, beam: int, banned: set[int]) -> list[tuple[int, ...]]:
    """The paper's beam search written out, never offering a banned slot: the best order after every step."""
    beams: list[tuple[int, ...]] = [()]
    best = []
    for _ in range(steps):
        candidates: dict[frozenset[int], tuple[int, ...]] = {}
        for order in beams:
            for j in range(N):
                if j not in order and j not in banned:
                    candidates.setdefault(frozenset((*order, j)), (*order, j))
        ranked = sorted((d(schedule_of(N, order)), order) for order in candidates.values())
        beams = [order for _, order in ranked[:beam]]
        best.append(beams[0])
    return best


def search(scorer: TableScorer, steps: int, naive: bool = False) -> cal.SearchState:
    return skip_search(scorer, [1] * N, N, steps / N, beam=3, naive=naive)  # type: ignore[arg-type]


@pytest.mark.parametrize("naive", [False, True])
def test_a_nan_candidate_is_dropped_counted_and_never_chosen(naive, caplog):
    clean = search(TableScorer(), 4, naive)
    first = clean.history[0]["order"][0]  # the slot a clean search takes first: planted where it matters most
    scorer = TableScorer(poisoned=first)
    with caplog.at_level(logging.WARNING, logger="skrr_export"):
        state = search(scorer, 4, naive)
    expected = plain_beam_search(TableScorer().d, 4, 3, banned={first})
    assert [tuple(h["order"]) for h in state.history] == expected
    assert all(first not in b.order and math.isfinite(b.score) for b in state.beams)
    assert all(math.isfinite(s) for h in state.history for s in h["beam_scores"])
    assert state.non_finite == sum(h["non_finite"] for h in state.history) > 0
    if not naive:  # the fast search scores each distinct set once: every NaN it got is one dropped candidate
        assert state.non_finite == scorer.nans
    assert "non-finite D" in caplog.text and "were dropped" in caplog.text


def test_every_candidate_nan_is_an_accuracy_error():
    scorer = TableScorer()
    scorer.d = lambda schedule: math.nan  # type: ignore[method-assign]
    with pytest.raises(AccuracyError, match="skip step 1: the D of every candidate is NaN or infinite"):
        search(scorer, 2)


def test_a_nan_reuse_trial_is_never_taken():
    """The re-use pass: the planted trial would have been the best choice at its slot; it is recorded as null,
    counted, and the pass goes on as if that trial had been worse than leaving the slot empty."""
    skip = (2, 3, 5)
    clean = reuse_search(TableScorer(), skip)  # type: ignore[arg-type]
    slot, src = next((s, r) for s, r in clean[0].items())
    reuse, initial, final, steps, _ = reuse_search(TableScorer(poisoned_reuse=(slot, src)), skip)  # type: ignore[arg-type]
    assert reuse.get(slot) != src and math.isfinite(final) and final <= initial
    step = next(s for s in steps if s["slot"] == slot)
    assert step["tried"][str(src)] is None and step["non_finite"] == [src]
    reference = TableScorer()  # the same pass with that trial's D made worse than any: the same choices
    reference_d = reference.d
    reference.d = lambda s: math.inf if (slot, src) in {(t, x) for t, x in enumerate(s) if x is not None and x != t} \
        else reference_d(s)  # type: ignore[method-assign]
    assert reuse_search(reference, skip)[0] == reuse  # type: ignore[arg-type]


def test_near_ties_are_logged_and_recorded(caplog):
    """Two candidates 1e-8 apart (relative) are a near-tie: another batching may swap them; 1e-3 apart they are not."""
    base = TableScorer().costs
    low = min(base, key=base.get)
    twin = next(t for t in base if t != low)
    with caplog.at_level(logging.INFO, logger="skrr_export"):
        state = search(TableScorer(costs={twin: base[low] * (1 + 1e-8)}), 1)
    assert [[low], [twin]] in state.history[0]["near_ties"]
    assert f"near-tie at skip step 1: skipping [{low}] and [{twin}]" in caplog.text
    apart = search(TableScorer(costs={twin: base[low] * (1 + 1e-3)}), 1)
    assert [[low], [twin]] not in apart.history[0]["near_ties"]


# ----------------------------------------------------------------------------------------------- on a real model

SETTINGS = ["--num-prompts", "12", "--max-length", "24", "-q"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny 6-block T5 with near-twin blocks (re-use pays) and a word-level tokenizer of its vocabulary."""
    folder = tiny_t5(tmp_path_factory.mktemp("t5"), 6)
    return write_tokenizer(folder, 64)


@pytest.fixture(scope="module")
def uninterrupted(model, tmp_path_factory):
    """A 35 % calibration run start to end at the default batch size (16: all 12 prompts at once)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "plan.json"
    assert main(["calibrate", "--model", str(model), "--out", str(out), "--sparsity", "0.35", *SETTINGS]) == 0
    return load_plan(out)


def test_resume_after_out_of_memory_with_a_smaller_batch(model, uninterrupted, tmp_path, monkeypatch, capsys, caplog):
    """A run stopped by out-of-memory after step 2 resumes, with --batch-size 3 (the memory plan changed), from its
    checkpoint: it starts at step 3 and ends with the uninterrupted run's plan (or differs only at a near-tie)."""
    out = tmp_path / "plan.json"
    args = ["calibrate", "--model", str(model), "--out", str(out), "--sparsity", "0.35", *SETTINGS]
    real_save, real_score = cal._save_checkpoint, Scorer.score
    saved: list[int] = []

    def score_until_memory_runs_out(self, base, branches):
        if saved and saved[-1] >= 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_score(self, base, branches)

    monkeypatch.setattr(cal, "_save_checkpoint", lambda p, k, s: (saved.append(s.step), real_save(p, k, s)))
    monkeypatch.setattr(Scorer, "score", score_until_memory_runs_out)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    checkpoint = tmp_path / "plan.json.calibration-checkpoint.json"
    assert len(err) == 1 and "ran out of memory" in err[0] and f"checkpoint {checkpoint} kept" in err[0], err
    assert checkpoint.is_file() and not out.exists()
    monkeypatch.setattr(Scorer, "score", real_score)
    saved.clear()
    with caplog.at_level(logging.INFO, logger="skrr_export"):
        assert main([*args, "--batch-size", "3"]) == 0
    assert "resuming calibration from plan.json.calibration-checkpoint.json at step 2" in caplog.text
    assert saved[0] == 3, "the resumed run starts after the last finished step"
    resumed = load_plan(out)
    assert resumed.provenance["memory_plan"]["batch"] == 3 and uninterrupted.provenance["memory_plan"]["batch"] == 16
    same_or_near_tie(resumed, uninterrupted)
    assert resumed.provenance["score"] == pytest.approx(uninterrupted.provenance["score"], rel=1e-5)


def test_a_finished_run_continues_to_a_higher_sparsity(model, uninterrupted, tmp_path, monkeypatch, caplog):
    """The checkpoint outlives a finished run: a higher --sparsity (same --out, --force) continues from its last
    step instead of starting over, and ends where a run straight to that target ends."""
    out = tmp_path / "plan.json"
    args = ["calibrate", "--model", str(model), "--out", str(out), *SETTINGS]
    assert main([*args, "--sparsity", "0.2"]) == 0
    lower = load_plan(out)
    steps = len(lower.provenance["skip_steps"])
    assert (tmp_path / "plan.json.calibration-checkpoint.json").is_file()
    real_save = cal._save_checkpoint
    saved: list[int] = []
    monkeypatch.setattr(cal, "_save_checkpoint", lambda p, k, s: (saved.append(s.step), real_save(p, k, s)))
    with caplog.at_level(logging.INFO, logger="skrr_export"):
        assert main([*args, "--sparsity", "0.35", "--force"]) == 0
    assert f"at step {steps}" in caplog.text and saved[0] == steps + 1
    higher = load_plan(out)
    assert (higher.skip, higher.reuse) == (uninterrupted.skip, uninterrupted.reuse)
    assert higher.provenance["skip_steps"] == uninterrupted.provenance["skip_steps"]


def test_nan_candidates_are_counted_in_the_plans_provenance(model, tmp_path, monkeypatch):
    """Through the command: a scorer returning NaN for every candidate that skips slot 1 (and any re-use trial of
    source 0): the plan never holds them, and its provenance counts what was dropped."""
    real_score = Scorer.score

    def planted(self, base, branches):
        scores = real_score(self, base, branches)
        return [math.nan if (slot == 1 and src is None) or src == 0 else d for (slot, src), d in zip(branches, scores)]

    monkeypatch.setattr(Scorer, "score", planted)
    plan = calibrate(CalibrationConfig(out=tmp_path / "p.json", sparsities=(0.35,), model=model, num_prompts=12,
                                       max_length=24))[0.35]
    counts = plan.provenance["non_finite_candidates"]
    assert 1 not in plan.skip and 0 not in plan.reuse.values()
    assert counts["skip"] == sum(h["non_finite"] for h in plan.provenance["skip_steps"]) > 0
    assert counts["reuse"] == sum(len(s["non_finite"]) for s in plan.provenance["reuse_steps"])
    assert json.loads((tmp_path / "p.json").read_text())["provenance"]["non_finite_candidates"] == counts


def test_a_non_finite_dense_reference_is_exit_1(tmp_path, capsys):
    from transformers import T5EncoderModel

    folder = tiny_t5(tmp_path / "nan", 2)
    model = T5EncoderModel.from_pretrained(folder)
    with torch.no_grad():
        model.encoder.final_layer_norm.weight[0] = math.nan
    model.save_pretrained(folder)
    capsys.readouterr()
    out = tmp_path / "p.json"
    assert main(["calibrate", "--model", str(folder), "--out", str(out), "--sparsity", "0.2", "--random-ids", *SETTINGS]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dense model's output on the prompts and the empty prompt is not finite" in err[0], err
    assert not out.exists()
