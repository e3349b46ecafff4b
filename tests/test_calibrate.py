"""Calibration: the fast search gives the naive method's answer with at most half its sub-block evaluations;
calibrated plans beat whole-block and random plans on real MiniLM weights; bad input is a clear error."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from skrr_export.apply import apply_plan, plan_cost, sub_block_parameters
from skrr_export.calibrate import CalibrationConfig, Scorer, calibrate, read_prompts, reuse_search, skip_search
from skrr_export.cli import main
from skrr_export.errors import UserError
from skrr_export.inputs import load_tokenizer
from skrr_export.model import ModelSource, load_encoder
from skrr_export.plan import Plan, load_plan

SMALL = dict(num_prompts=8, max_length=48, batch_size=8)


def tiny_t5_24_blocks(tmp_path: Path) -> Path:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=24, num_heads=4,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    model = T5EncoderModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path)
    return tmp_path


def test_fast_search_equals_naive_with_at_most_half_the_evaluations(tmp_path):
    folder = tiny_t5_24_blocks(tmp_path)
    enc = load_encoder(ModelSource(folder), Plan.dense("t5", 24))
    sizes = [sum(p.numel() for _, p in b) for b in sub_block_parameters(enc)]
    total = sum(p.numel() for p in enc.model.parameters())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 64, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    feeds = [(ids, mask), (torch.tensor([[1]]), torch.tensor([[1]]))]
    results = {}
    for naive in (False, True):
        scorer = Scorer(enc, feeds, None, "cpu")
        state = skip_search(scorer, sizes, total, 0.42, beam=3, naive=naive)
        before = scorer.evaluations
        reuse, _, score, _, naive_reuse = reuse_search(scorer, state.beams[0].order[:12], naive=naive)
        results[naive] = (state.beams[0].order, reuse, score, state.evaluations, state.naive_evaluations,
                          scorer.evaluations - before, naive_reuse)
    fast, slow = results[False], results[True]
    assert fast[:3] == slow[:3], "skip order, re-use map and score must be identical"
    assert slow[3] == slow[4] and slow[5] == slow[6], "the naive run's measured evaluations are the naive count"
    assert fast[3] <= 0.5 * slow[3], f"skip phase: fast {fast[3]} vs naive {slow[3]}"
    assert fast[3] + fast[5] <= 0.5 * (slow[3] + slow[5]), "both phases together"


def discrepancy(enc, plan: Plan, feeds) -> float:
    """Independent D: the applied module's last hidden state against the dense one, masked MSE, summed over batches."""
    dense = apply_plan(enc, Plan.dense(plan.family, plan.num_blocks))
    pruned = apply_plan(enc, plan)
    d = 0.0
    with torch.no_grad():
        for ids, mask in feeds:
            a, b = dense(ids, mask)[0], pruned(ids, mask)[0]
            keep = mask.bool()
            d += float(((a[keep] - b[keep]) ** 2).mean())
    return d


def minilm_feeds(path: Path, n: int = 8):
    tok = load_tokenizer(path)
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


def test_calibrated_minilm_plan_beats_whole_block_and_random_plans(minilm_path, tmp_path):
    out = tmp_path / "plan.json"
    plan = calibrate(CalibrationConfig(out=out, sparsities=(0.16,), **SMALL))[0.16]
    assert load_plan(out) == plan
    enc = load_encoder(ModelSource(minilm_path), Plan.dense("bert", 6))
    feeds = minilm_feeds(minilm_path)
    target = plan_cost(enc, plan).sparsity
    ours = discrepancy(enc, plan, feeds)
    assert ours == pytest.approx(plan.provenance["score"], rel=1e-4)
    baseline = shortgpt_plan(enc, feeds, blocks=2)
    assert plan_cost(enc, baseline).sparsity >= target - 1e-3
    assert ours < discrepancy(enc, baseline, feeds)
    rng = random.Random(0)
    attention = sum(1 for s in plan.skip if s % 2 == 0)
    for _ in range(10):  # random plans with as many attention and FFN sub-blocks: the same sparsity
        skip = rng.sample(range(0, 12, 2), attention) + rng.sample(range(1, 12, 2), len(plan.skip) - attention)
        random_plan = Plan("bert", 6, skip=tuple(skip))
        assert plan_cost(enc, random_plan).sparsity == pytest.approx(target)
        assert ours < discrepancy(enc, random_plan, feeds)
    p = plan.provenance
    assert p["subblock_evaluations"] < p["naive_subblock_evaluations"]
    assert p["beam"] == 3 and p["num_prompts"] == 8 and len(p["skip_steps"]) >= len(plan.skip)
    assert "no projection" in p["metric"]


def test_calibrate_then_export_from_the_cli(minilm_path, tmp_path, capsys):
    plan_path = tmp_path / "plans" / "minilm.json"
    assert main(["calibrate", "--out", str(plan_path), "--sparsity", "0.08", "0.12", "--num-prompts", "8",
                 "--max-length", "48", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "sparsity 0.08:" in printed and "naive" in printed
    files = sorted(p.name for p in plan_path.parent.iterdir())
    assert files == ["minilm-12.json", "minilm-8.json"]
    out = tmp_path / "export"
    assert main(["--plan", str(plan_path.parent / "minilm-12.json"), "--out", str(out), "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert all(p["passed"] for p in report["parity"])


def test_projection_changes_the_metric(minilm_path, tmp_path):
    torch.manual_seed(0)
    proj = tmp_path / "caption_projection.safetensors"
    save_file({"caption_projection.linear_1.weight": torch.randn(24, 384) * 0.1, "caption_projection.linear_1.bias": torch.zeros(24),
               "caption_projection.linear_2.weight": torch.randn(24, 24) * 0.1, "caption_projection.linear_2.bias": torch.zeros(24)}, proj)
    plan = calibrate(CalibrationConfig(out=tmp_path / "p.json", sparsities=(0.05,), projection=proj, **SMALL))[0.05]
    assert "projection caption_projection.safetensors" in plan.provenance["metric"]
    raw = calibrate(CalibrationConfig(out=tmp_path / "r.json", sparsities=(0.05,), **SMALL))[0.05]
    assert plan.provenance["score"] != raw.provenance["score"]
    wrong = tmp_path / "wrong.safetensors"
    save_file({"weight": torch.zeros(8, 512), "bias": torch.zeros(8)}, wrong)
    with pytest.raises(UserError, match="projection takes 512 features but the encoder outputs 384"):
        calibrate(CalibrationConfig(out=tmp_path / "w.json", sparsities=(0.05,), projection=wrong, **SMALL))


def test_interrupted_calibration_resumes_from_its_checkpoint(minilm_path, tmp_path, monkeypatch, capsys):
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
    assert main(args) == 0
    assert resumed_steps[0] == 3, "the resumed run starts after the last finished step"
    assert not checkpoint.exists()
    assert main(args) == 2, "an existing plan is not replaced without --force"
    assert "exists; pass --force" in capsys.readouterr().err
    uninterrupted = calibrate(CalibrationConfig(out=tmp_path / "again.json", sparsities=(0.16,), **SMALL))[0.16]
    resumed = load_plan(out)
    assert (resumed.skip, resumed.reuse) == (uninterrupted.skip, uninterrupted.reuse)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity", "1.5"], "a target sparsity must lie in (0, 1)"),
        (["--sparsity", "0"], "a target sparsity must lie in (0, 1)"),
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
    gpt2 = tmp_path / "GPT2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    args = [str(tmp_path / a) if a in ("MISSING", "EMPTY", "GPT2") else a for a in args]
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
