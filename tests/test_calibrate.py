"""Calibration: the fast search gives the naive method's answer with at most half its sub-block evaluations;
calibrated plans beat whole-block and random plans on real MiniLM weights; bad input is a clear error."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy
import pytest
import torch
from safetensors.torch import save_file

from skrr_export.apply import apply_plan, plan_cost, sub_block_parameters
from skrr_export.calibrate import (CalibrationConfig, Scorer, calibrate, read_prompts, reuse_search, schedule_of,
                                   skip_search)
from skrr_export.cli import main
from skrr_export.errors import UserError
from skrr_export.inputs import load_tokenizer
from skrr_export.model import ModelSource, load_encoder
from skrr_export.plan import Plan, load_plan

from .helpers import NUM_BLOCKS
from .reference import reference_forward

SMALL = dict(num_prompts=8, max_length=48, batch_size=8)


def tiny_t5(tmp_path: Path, blocks: int) -> Path:
    """A tiny T5 whose odd blocks are near-copies of the block before (so re-using a neighbour can pay)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=blocks, num_heads=4,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    model = T5EncoderModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        layers = model.encoder.block
        for b in range(1, blocks, 2):
            twin = dict(layers[b - 1].named_parameters())
            for name, mine in layers[b].named_parameters():
                mine.copy_(twin[name] + torch.randn_like(mine) * 0.02)
    model.save_pretrained(tmp_path)
    return tmp_path


def same_or_near_tie(a, b) -> None:
    """Same skip order and re-use map, or the first difference comes after a near-tie that one of the two runs logged
    (at that skip step or before: a swap among the kept beams shows later; at that re-use slot)."""
    ha, hb = a.provenance["skip_steps"], b.provenance["skip_steps"]
    for step, (x, y) in enumerate(zip(ha, hb)):
        if x["order"] != y["order"]:
            assert any(h["near_ties"] for h in ha[:step + 1] + hb[:step + 1]), (x, y)
            return
    assert a.skip == b.skip
    for x, y in zip(a.provenance["reuse_steps"], b.provenance["reuse_steps"]):
        if x["accepted"] != y["accepted"]:
            assert x["near_tie"] or y["near_tie"], (x, y)
            return
    assert a.reuse == b.reuse


def padded_prompts(n: int, vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` prompts of 3 to 12 tokens, right-padded."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 13, (n,), generator=g)
    ids = torch.randint(5, vocab, (n, int(lengths.max())), generator=g)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def batched(ids: torch.Tensor, mask: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``size`` prompts, each cut to its own longest prompt (so padding differs per batch)."""
    out = []
    for i in range(0, len(ids), size):
        m = mask[i:i + size]
        longest = int(m.sum(1).max())
        out.append((ids[i:i + size, :longest], m[:, :longest]))
    return out


def test_search_is_the_same_for_every_batch_size_and_equals_the_naive_search(tmp_path):
    """Batch sizes 1 and 16 of the fast search and 3 of the naive one (padding differs in each; 3 leaves a partial
    last batch) give the same scores, skip order and re-use map, and the fast search gives the naive one's answer
    with fewer sub-block evaluations (the fast path on partial batches: test_score_is_the_papers_d...). The runs are
    checked to be free of near-ties first, so any difference is a real one."""
    folder = tiny_t5(tmp_path, 6)
    enc = load_encoder(ModelSource(folder), Plan.dense("t5", 6))
    sizes = [sum(p.numel() for _, p in b) for b in sub_block_parameters(enc)]
    total = sum(p.numel() for p in enc.model.parameters())
    ids, mask = padded_prompts(10, 64)
    empty = (torch.tensor([[1]]), torch.tensor([[1]]))
    runs = {}
    for batch, naive in ((1, False), (16, False), (3, True)):
        scorer = Scorer(enc, batched(ids, mask, batch), empty, None, "cpu")
        state = skip_search(scorer, sizes, total, 0.35, beam=3, naive=naive)
        skip = state.beams[0].order
        before = scorer.evaluations
        reuse, _, score, steps, naive_reuse = reuse_search(scorer, skip, naive=naive)
        for h in state.history:  # no near-ties: the kept beams are apart from the first dropped candidate
            assert h["margin"] is None or h["margin"] > 1e-4 * h["beam_scores"][-1], h
        for r in steps:
            assert all(abs(v - r["before"]) > 1e-4 * r["before"] for v in r["tried"].values()), r
        runs[batch, naive] = dict(order=state.beams[0].order, reuse=reuse, score=score,
                                  scores=[h["beam_scores"] for h in state.history], evaluations=state.evaluations,
                                  naive=state.naive_evaluations, reuse_evaluations=scorer.evaluations - before,
                                  naive_reuse=naive_reuse)
    reference = runs[3, True]
    assert reference["evaluations"] == reference["naive"] and reference["reuse_evaluations"] == reference["naive_reuse"], \
        "the naive run's measured evaluations are the naive count"
    assert len(reference["order"]) >= 4 and len(reference["reuse"]) >= 2, "a search deep enough to test, with re-use"
    for key, run in runs.items():
        assert (run["order"], run["reuse"]) == (reference["order"], reference["reuse"]), key
        assert run["score"] == pytest.approx(reference["score"], rel=1e-5), key
        assert numpy.allclose(run["scores"], reference["scores"], rtol=1e-5), key
    fast = runs[16, False]
    assert fast["evaluations"] + fast["reuse_evaluations"] < 0.7 * (fast["naive"] + fast["naive_reuse"])


def reference_d(model, family: str, blocks: int, skip, reuse, prompts, empty) -> float:
    """D from the Hugging Face submodules, one unpadded prompt at a time: squared error summed over every real
    token of the prompts / (tokens x width), plus the same on the empty prompt."""
    total = 0.0
    for group in (prompts, [empty]):
        err, tokens = 0.0, 0
        for ids, mask in group:
            dense = reference_forward(family, model, blocks, (), {}, ids, mask)["last_hidden_state"]
            pruned = reference_forward(family, model, blocks, skip, reuse, ids, mask)["last_hidden_state"]
            err += float(((dense - pruned).double() ** 2).sum())
            tokens += ids.numel()
        total += err / (tokens * dense.shape[-1])
    return total


@pytest.mark.parametrize("family", ["t5", "bert"])
def test_score_is_the_papers_d_whatever_the_batching(family, tiny_models):
    """Every candidate's score equals D computed independently, one prompt at a time, for batch sizes 1, 3 and
    16 (a batch-weighted mean would count the empty prompt once per batch) and for the fast and naive paths."""
    model, folder = tiny_models[family]
    enc = load_encoder(ModelSource(folder), Plan.dense(family, NUM_BLOCKS))
    ids, mask = padded_prompts(7, 96)
    prompts = [(ids[i:i + 1, :int(mask[i].sum())], mask[i:i + 1, :int(mask[i].sum())]) for i in range(len(ids))]
    empty = (torch.tensor([[4]]), torch.tensor([[1]]))
    n = 2 * NUM_BLOCKS
    skips = [(j,) for j in range(n)] + [(2, j) for j in range(n) if j != 2]
    expected = [reference_d(model, family, NUM_BLOCKS, s, {}, prompts, empty) for s in skips]
    expected_reuse = reference_d(model, family, NUM_BLOCKS, (2, 3), {2: 0}, prompts, empty)
    for batch in (1, 3, 16):
        scorer = Scorer(enc, batched(ids, mask, batch), empty, None, "cpu")
        single = scorer.score(schedule_of(n, ()), [(j, None) for j in range(n)])
        double = scorer.score(schedule_of(n, (2,)), [(j, None) for j in range(n) if j != 2])
        naive = scorer.score_full([schedule_of(n, s) for s in skips])
        assert single + double == pytest.approx(expected, rel=1e-5), batch
        assert naive == pytest.approx(expected, rel=1e-5), batch
        reused = scorer.score(schedule_of(n, (2, 3)), [(2, 0)])[0]
        assert reused == pytest.approx(expected_reuse, rel=1e-5), batch


def last_hidden_states(enc, plan: Plan, feeds) -> list[torch.Tensor]:
    module = apply_plan(enc, plan)
    with torch.no_grad():
        return [module(ids, mask)[0] for ids, mask in feeds]


def discrepancy(enc, plan: Plan, feeds, dense: list[torch.Tensor]) -> float:
    """Independent D: the applied module's last hidden state against the dense one (``dense``: the dense plan's
    last_hidden_states on ``feeds``, computed once by the caller), masked MSE, summed over batches."""
    d = 0.0
    for a, b, (_, mask) in zip(dense, last_hidden_states(enc, plan, feeds), feeds, strict=True):
        keep = mask.bool()
        d += float(((a[keep] - b[keep]) ** 2).mean())
    return d


def minilm_feeds(path: Path, n: int = 8):
    tok = load_tokenizer(ModelSource(path))
    prompts = read_prompts(None, n)
    enc = tok(prompts, padding=True, truncation=True, max_length=48, return_tensors="pt")
    empty = tok([""], return_tensors="pt")
    return [(enc["input_ids"], enc["attention_mask"]), (empty["input_ids"], empty["attention_mask"])]


def shortgpt_plan(enc, feeds, blocks: int) -> Plan:
    """Whole-block baseline: drop the blocks whose output is most similar to their input (ShortGPT)."""
    ids, mask = feeds[0]
    with torch.no_grad():
        hidden, ctx = enc.stem(ids, mask)
        influence = []
        for b in range(len(enc.sub_blocks) // 2):
            out = enc.sub_blocks[2 * b + 1](enc.sub_blocks[2 * b](hidden, ctx), ctx)
            cos = torch.nn.functional.cosine_similarity(hidden[mask.bool()], out[mask.bool()], dim=-1)
            influence.append(float(1 - cos.mean()))
            hidden = out
    order = sorted(range(len(influence)), key=influence.__getitem__)[:blocks]
    return Plan("bert", 6, skip=tuple(s for b in order for s in (2 * b, 2 * b + 1)))


@pytest.fixture(scope="module")
def minilm_calibration(minilm_path, tmp_path_factory):
    """The library's MiniLM calibration at 16 % with the SMALL settings, run once for the tests that read it: the
    plan by sparsity, the plan file, and what the run wrote to stderr (its progress bar) and to the log at INFO."""
    out = tmp_path_factory.mktemp("minilm-calibration") / "plan.json"
    logger, err, log = logging.getLogger("skrr_export"), io.StringIO(), io.StringIO()
    handler, level = logging.StreamHandler(log), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stderr(err):
            plans = calibrate(CalibrationConfig(out=out, sparsities=(0.16,), **SMALL))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return plans, out, err.getvalue(), log.getvalue()


def checkpoint_of(minilm_calibration) -> Path:
    """The checkpoint the library's MiniLM run kept (SMALL settings, 16 %): a run with the same settings resumes it."""
    out = minilm_calibration[1]
    return out.with_name(out.name + ".calibration-checkpoint.json")


def test_calibrated_minilm_plan_beats_whole_block_and_random_plans(minilm_path, minilm_calibration):
    plans, out, err, log = minilm_calibration
    plan = plans[0.16]
    bars = re.findall(r"(\d+)/(\d+) \w+ \(100 %\)", log)  # not a terminal: the bar's plain line when it completes
    steps = len(plan.provenance["skip_steps"])
    assert bars and bars[-1] == (str(steps), str(steps)), "the progress bar ends at the steps taken"
    assert "memory plan on cpu: weights 0.08 GiB" in log
    assert load_plan(out) == plan
    enc = load_encoder(ModelSource(minilm_path), Plan.dense("bert", 6))
    feeds = minilm_feeds(minilm_path)
    target = plan_cost(enc, plan).sparsity
    dense = last_hidden_states(enc, Plan.dense("bert", 6), feeds)
    ours = discrepancy(enc, plan, feeds, dense)
    assert ours == pytest.approx(plan.provenance["score"], rel=1e-4)
    baseline = shortgpt_plan(enc, feeds, blocks=2)
    assert plan_cost(enc, baseline).sparsity >= target - 1e-3
    assert ours < discrepancy(enc, baseline, feeds, dense)
    rng = random.Random(0)
    attention = sum(1 for s in plan.skip if s % 2 == 0)
    for _ in range(10):  # random plans with as many attention and FFN sub-blocks: the same sparsity
        skip = rng.sample(range(0, 12, 2), attention) + rng.sample(range(1, 12, 2), len(plan.skip) - attention)
        random_plan = Plan("bert", 6, skip=tuple(skip))
        assert plan_cost(enc, random_plan).sparsity == pytest.approx(target)
        assert ours < discrepancy(enc, random_plan, feeds, dense)
    p = plan.provenance
    assert p["subblock_evaluations"] < p["naive_subblock_evaluations"]
    assert p["beam"] == 3 and p["num_prompts"] == 8 and len(p["skip_steps"]) >= len(plan.skip)
    assert "no projection" in p["metric"]


def test_calibrate_then_export_from_the_cli(minilm_path, minilm_calibration, tmp_path, capsys):
    """Two targets from the command line, then an export of one. The skip search resumes from the library run's
    checkpoint (same settings, deeper target), so only the re-use passes run here."""
    plan_path = tmp_path / "plans" / "minilm.json"
    plan_path.parent.mkdir()
    shutil.copyfile(checkpoint_of(minilm_calibration), plan_path.with_name("minilm.json.calibration-checkpoint.json"))
    assert main(["calibrate", "--out", str(plan_path), "--sparsity", "0.08", "0.12", "--num-prompts", "8",
                 "--max-length", "48", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "sparsity 0.08:" in printed and "naive" in printed
    files = sorted(p.name for p in plan_path.parent.iterdir())
    assert files == ["minilm-12.json", "minilm-8.json", "minilm.json.calibration-checkpoint.json"]  # for a deeper run
    out = tmp_path / "export"
    assert main(["--plan", str(plan_path.parent / "minilm-12.json"), "--out", str(out), "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert all(p["passed"] for p in report["parity"])


def test_projection_changes_the_metric(minilm_path, minilm_calibration, tmp_path):
    torch.manual_seed(0)
    proj = tmp_path / "caption_projection.safetensors"
    save_file({"caption_projection.linear_1.weight": torch.randn(24, 384) * 0.1, "caption_projection.linear_1.bias": torch.zeros(24),
               "caption_projection.linear_2.weight": torch.randn(24, 24) * 0.1, "caption_projection.linear_2.bias": torch.zeros(24)}, proj)
    plan = calibrate(CalibrationConfig(out=tmp_path / "p.json", sparsities=(0.05,), projection=proj, **SMALL))[0.05]
    assert "projection caption_projection.safetensors" in plan.provenance["metric"]
    shutil.copyfile(checkpoint_of(minilm_calibration), tmp_path / "r.json.calibration-checkpoint.json")  # resumed
    raw = calibrate(CalibrationConfig(out=tmp_path / "r.json", sparsities=(0.05,), **SMALL))[0.05]
    assert plan.provenance["score"] != raw.provenance["score"]
    wrong = tmp_path / "wrong.safetensors"
    save_file({"weight": torch.zeros(8, 512), "bias": torch.zeros(8)}, wrong)
    with pytest.raises(UserError, match="projection takes 512 features but the encoder outputs 384"):
        calibrate(CalibrationConfig(out=tmp_path / "w.json", sparsities=(0.05,), projection=wrong, **SMALL))


def test_interrupted_calibration_resumes_from_its_checkpoint(minilm_path, minilm_calibration, tmp_path, monkeypatch,
                                                           capsys):
    import skrr_export.calibrate as cal

    out = tmp_path / "plan.json"
    args = ["calibrate", "--out", str(out), "--sparsity", "0.16", "--num-prompts", "8", "--max-length", "48", "-q"]
    real = cal._save_checkpoint
    calls = []

    def save_then_interrupt(path, key, state):
        real(path, key, state)
        calls.append(state.step)
        if state.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(cal, "_save_checkpoint", save_then_interrupt)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "calibration interrupted; checkpoint" in err and "run the same command again to resume" in err
    checkpoint = tmp_path / "plan.json.calibration-checkpoint.json"
    assert checkpoint.is_file() and not out.exists()
    monkeypatch.setattr(cal, "_save_checkpoint", real)
    resumed_steps = []
    monkeypatch.setattr(cal, "_save_checkpoint", lambda p, k, s: (resumed_steps.append(s.step), real(p, k, s)))
    assert main([*args, "--batch-size", "3"]) == 0, "fewer prompts in flight (a lower memory plan) still resumes"
    assert resumed_steps[0] == 3, "the resumed run starts after the last finished step"
    assert checkpoint.is_file(), "kept for a run with a higher --sparsity"
    assert main(args) == 2, "an existing plan is not replaced without --force"
    assert "exists; pass --force" in capsys.readouterr().err
    uninterrupted = minilm_calibration[0][0.16]  # the library's run with the same settings, start to end
    resumed = load_plan(out)
    same_or_near_tie(resumed, uninterrupted)
    assert resumed.provenance["score"] == pytest.approx(uninterrupted.provenance["score"], rel=1e-5)


def test_a_checkpoint_made_otherwise_is_not_resumed_and_the_log_says_why(minilm_path, tmp_path, caplog):
    """Every input that changes D changes the resume key (the batch size, which the memory plan sets, is not one);
    a different key starts over, naming what changed."""
    import skrr_export.calibrate as cal
    from skrr_export.model import load_config

    source = ModelSource(minilm_path)
    config = load_config(source)
    prompts = read_prompts(None, 8)
    cfg = CalibrationConfig(out=tmp_path / "p.json", sparsities=(0.1,), **SMALL)
    tok = load_tokenizer(source)
    tokens = (tok(prompts)["input_ids"], tok("")["input_ids"])
    key = cal.resume_key(cfg, source, config, prompts, tokens)
    proj = tmp_path / "proj.safetensors"
    save_file({"weight": torch.zeros(4, 384)}, proj)
    other_model = tmp_path / "other"
    other_model.mkdir()
    for f in minilm_path.iterdir():
        if f.is_file():
            (other_model / f.name).write_bytes(f.read_bytes())
    weights = other_model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    variants = {
        "prompts": cal.resume_key(cfg, source, config, prompts[::-1], tokens),
        "num_prompts": cal.resume_key(cfg, source, config, prompts[:7], tokens),
        "tokens": cal.resume_key(cfg, source, config, prompts, (tokens[0][::-1], tokens[1])),  # another tokenizer
        "model": cal.resume_key(cfg, ModelSource(other_model), config, prompts, tokens),
    }
    for field, value in [("max_length", 40), ("precision", "bf16"), ("device", "cuda:1"), ("beam", 2),
                         ("projection", proj), ("naive", True)]:
        variants[field] = cal.resume_key(dataclasses.replace(cfg, **{field: value}), source, config, prompts, tokens)
    for field, value in [("sparsities", (0.3,)), ("batch_size", 3), ("max_memory", 2**20)]:
        assert cal.resume_key(dataclasses.replace(cfg, **{field: value}), source, config, prompts, tokens) == key, \
            f"{field} is not in the key: a deeper run continues a shallower one, a smaller memory plan resumes"
    for field, changed in variants.items():
        assert changed != key, field
    checkpoint = tmp_path / "p.json.calibration-checkpoint.json"
    cal._save_checkpoint(checkpoint, key, cal.SearchState(step=2, beams=[cal.Beam((3, 5), 0.25)]))
    assert cal._resume(checkpoint, key).beams[0].order == (3, 5)
    with caplog.at_level(logging.INFO, logger="skrr_export"):
        assert cal._resume(checkpoint, variants["precision"]) is None
    assert "starting over" in caplog.text and "precision fp32, now bf16" in caplog.text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity", "1.5"], "must lie in (0, 1)"),
        (["--sparsity", "0"], "must lie in (0, 1)"),
        (["--sparsity", "0.1", "--num-prompts", "0"], "must be at least 1"),
        (["--sparsity", "0.1", "--num-prompts", "-3"], "must be at least 1"),
        (["--sparsity", "0.1", "--prompts", "BLANK"], "all 2 prompts are empty after tokenization"),
        (["--sparsity", "0.1", "--max-memory", "50MiB"], "needs at least"),
        (["--sparsity", "0.1", "--max-memory", "lots"], "expected a size such as 24GiB"),
        (["--sparsity", "0.1", "--max-memory", "0GiB"], "more than zero bytes"),
        (["--sparsity", "0.9"], "not reachable for this model"),
        (["--sparsity", "0.01"], "not reachable for this model"),
        (["--sparsity", "0.1", "--prompts", "MISSING"], "cannot read prompt file"),
        (["--sparsity", "0.1", "--prompts", "EMPTY"], "holds no prompts"),
        (["--sparsity", "0.1", "--device", "cuda"], None),
        (["--sparsity", "0.1", "--model", "GPT2"], "model_type 'gpt2' has no adapter"),
    ],
)
def test_bad_calibration_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    (tmp_path / "EMPTY").write_text("\n\n")
    (tmp_path / "BLANK").write_text("\u200b\n\u200b \u200b\n")  # zero-width spaces: BERT's tokenizer drops them
    gpt2 = tmp_path / "GPT2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    args = [str(tmp_path / a) if a in ("MISSING", "EMPTY", "BLANK", "GPT2") else a for a in args]
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = main(["calibrate", "--out", str(tmp_path / "p.json"), "-q", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert message is None or message in err[0], err
    assert not (tmp_path / "p.json").exists()


def test_prompt_files_accept_lines_and_jsonl(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a red fox"}\n"a blue bird"\n{"caption": "a cat"}\nplain line\n')
    assert read_prompts(path, None) == ["a red fox", "a blue bird", "a cat", "plain line"]
    assert len(read_prompts(None, None)) == 512
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nope": 1}\n')
    with pytest.raises(UserError, match="bad.jsonl:1: JSON line has no 'prompt'"):
        read_prompts(bad, None)


def test_numbers_out_of_range_are_refused_by_the_library_too(tmp_path):
    for field, value in [("num_prompts", 0), ("num_prompts", -3), ("batch_size", 0), ("max_length", 0), ("beam", 0),
                         ("max_memory", 0)]:
        cfg = CalibrationConfig(out=tmp_path / "p.json", sparsities=(0.1,), **{field: value})
        with pytest.raises(UserError, match="must be at least 1"):
            calibrate(cfg)


def test_plan_path_under_a_file_is_refused_before_loading(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code = main(["calibrate", "--out", str(tmp_path / "file" / "p.json"), "--sparsity", "0.1", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"skrr-export: error: --out {tmp_path / 'file' / 'p.json'} cannot be written: "
                                 f"{tmp_path / 'file'} is a file, not a folder"]
