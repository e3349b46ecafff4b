"""The command line end to end: exit codes, files written, nothing half-written after a failure."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from skrr_export.cli import main

ROOT = Path(__file__).resolve().parents[1]
MINILM_PLAN = ROOT / "recipes" / "minilm" / "plan.json"
PIXART_PLAN = ROOT / "recipes" / "t5-v1_1-xxl" / "pixart-sigma-41.9.json"
T5XXL_CONFIG = ROOT / "recipes" / "t5-v1_1-xxl" / "config.json"


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def write_plan(tmp_path: Path, data) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return path


# The main job's output folder (fp32): the parity data for Polygraphy where polygraphy is installed.
ARTIFACTS = sorted(["manifest.json", "model.onnx", "report.json", "report.md"]
                   + (["parity_inputs.json", "parity_reference.json"] if importlib.util.find_spec("polygraphy") else []))


def test_minilm_end_to_end_from_the_console_script(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "skrr_export.cli", "--plan", str(MINILM_PLAN), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ARTIFACTS
    report = json.loads((out / "report.json").read_text())
    assert report["cost"]["sparsity"] == pytest.approx(0.1049, abs=5e-5)
    assert [p["passed"] for p in report["parity"]] == [True, True]
    assert report["parity"][0]["batch"] == "prompts, tokenizer"
    assert set(report["distance_to_dense"]) == {"prompts", "empty prompt"}
    assert 0 < report["distance_to_dense"]["prompts"]["last_hidden_state"]["mse"]
    assert report["onnx"]["initializer_bytes"] <= report["onnx"]["unique_parameter_bytes"] + 65536
    md = (out / "report.md").read_text()
    assert md.startswith("# skrr-export report: bert, fp32\n") and "## Parity" in md
    assert report["peak_memory_bytes"] > 0 and "- peak memory: " in md
    assert md.count("Decides pass/fail:\n\n| output | token error | min cos | tolerance | pass |") == 2
    assert md.count("Information only (not tested):\n\n| output | max abs | mean abs | max rel | mean cos |") == 2
    assert "[skrr-export] export done in" in proc.stderr and "\r" not in proc.stderr  # not a terminal: plain lines
    assert re.search(r"\[skrr-export\] finished in [\d.]+ s wall, peak memory [\d.,]+ (MiB|GiB) \(resident", proc.stderr)
    assert leftovers(tmp_path) == []


def test_parity_failure_exits_1_and_names_the_tolerance(tmp_path, tiny_models, capsys):
    _, folder = tiny_models["bert"]
    plan = write_plan(tmp_path, {"format": "skrr-plan/1", "encoder": {"family": "bert", "num_blocks": 3}, "skip": [3]})
    out = tmp_path / "out"
    code = main(["--plan", str(plan), "--model", str(folder), "--random-ids", "--out", str(out), "--atol", "0", "--rtol", "0", "-q"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parity failed" in err[0]
    report = json.loads((out / "report.json").read_text())
    first = report["parity"][0]["outputs"][0]
    assert not first["passed"] and first["needed_atol"] > 0
    md = (out / "report.md").read_text()
    assert f"- last_hidden_state: max abs error {first['max_abs']:.3g} exceeds atol 0 (rtol 0); " \
           f"atol={first['needed_atol']:.3g} would have passed" in md


@pytest.mark.parametrize(
    "plan_data, message",
    [
        ({"format": "skrr-plan/1", "encoder": {"family": "bert", "num_blocks": 3}, "skip": [9]}, "skip: index 9 is out of range"),
        ({"format": "skrr-plan/1", "encoder": {"family": "bert", "num_blocks": 6}}, "num_blocks: plan has 6 blocks but the model has 3"),
        ({"format": "skrr-plan/1", "encoder": {"family": "t5", "num_blocks": 3}}, "family: plan is for 't5' but the model is 'bert'"),
        ({"format": "skrr-plan/1", "encoder": {"family": "bert", "num_blocks": 3}, "skip": [1], "sparsity": 0.3}, "sparsity: plan states 0.3000"),
    ],
)
def test_bad_plans_exit_2_with_one_line_and_no_output(plan_data, message, tmp_path, tiny_models, capsys):
    _, folder = tiny_models["bert"]
    out = tmp_path / "out"
    code = main(["--plan", str(write_plan(tmp_path, plan_data)), "--model", str(folder), "--random-ids", "--out", str(out), "-q"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() and leftovers(tmp_path) == []


def test_missing_weights_and_bad_arguments_exit_2(tmp_path, tiny_models, capsys):
    _, folder = tiny_models["bert"]
    empty = tmp_path / "model"
    empty.mkdir()
    (empty / "config.json").write_text((folder / "config.json").read_text())
    plan = write_plan(tmp_path, {"format": "skrr-plan/1", "encoder": {"family": "bert", "num_blocks": 3}})
    out = ["--out", str(tmp_path / "o"), "-q"]
    assert main(["--plan", str(plan), "--model", str(empty), "--random-ids", *out]) == 2
    assert "has no *.safetensors weights" in capsys.readouterr().err
    assert main(["--plan", str(plan), "--precision", "fp8", *out]) == 2
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
    assert main(["--plan", str(plan), "--model", str(tmp_path / "nowhere"), *out]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_inputs_are_checked_before_the_output_folder(tmp_path, tiny_models, capsys, monkeypatch):
    """The README's main job leaves ./out behind; a later mistake in the inputs is still named as such."""
    _, folder = tiny_models["bert"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    good = write_plan(tmp_path, {"format": "skrr-plan/1", "encoder": {"family": "bert", "num_blocks": 3}})
    cases = [
        (["--plan", str(good), "--model", str(tmp_path / "nowhere")], "nowhere has no config.json"),
        (["--plan", str(tmp_path / "missing.json"), "--model", str(folder), "--random-ids"], "missing.json"),
        (["--plan", str(good), "--model", str(folder), "--random-ids", "--fixed-sequence", "100"], "exceeds this model's 64 positions"),
        (["--recipe", "minilm", "--model", str(folder)], "recipe minilm expects hidden_size=384"),
        (["--plan", str(good), "--model", str(folder), "--random-ids"], "output folder out exists; pass --force"),
    ]
    for argv, message in cases:
        assert main([*argv, "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_sequence_profile_that_contradicts_the_fixed_sequence_is_refused(tmp_path, tiny_models, capsys):
    """--fixed-sequence 16 --sequence 1,32,64: refused in one line (exit 2, nothing written), not replaced by 16;
    the same check as trtexec's (trt.ShapeRange.check_fixed). --sequence 16 agrees with it and passes the check."""
    _, folder = tiny_models["bert"]
    plan = write_plan(tmp_path, {"format": "skrr-plan/1", "encoder": {"family": "bert", "num_blocks": 3}})
    argv = ["--plan", str(plan), "--model", str(folder), "--random-ids", "--out", str(tmp_path / "o"), "-q",
            "--fixed-sequence", "16"]
    assert main([*argv, "--sequence", "1,32,64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sequence 1,32,64: the export (--fixed-sequence 16) is fixed at sequence 16" in err[0]
    assert not (tmp_path / "o").exists()
    assert main([*argv, "--sequence", "16", "--plan", str(tmp_path / "missing.json")]) == 2  # past the check
    assert "missing.json" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="needs tensorrt-rtx (the test extra)")
def test_engine_flags_the_build_would_refuse_are_refused_before_any_work(tmp_path, tiny_models, capsys, monkeypatch):
    """An unknown compute capability, the other runtime's target flag and (on a machine without CUDA) a weight-stripped
    TensorRT-RTX plan fail at build time, after the export: they are refused before any weight is loaded, in one
    line, exit 2, nothing written."""
    import skrr_export.model
    from skrr_export.environment import cuda_available

    _, folder = tiny_models["bert"]
    plan = write_plan(tmp_path, {"format": "skrr-plan/1", "encoder": {"family": "bert", "num_blocks": 3}})
    monkeypatch.setattr(skrr_export.model, "load_encoder", lambda *a, **k: pytest.fail("loaded weights"))
    argv = ["--plan", str(plan), "--model", str(folder), "--random-ids", "--out", str(tmp_path / "o"), "-q",
            "--engine", "trt-rtx"]
    refused = [(["--compute-capability", "sm99"], "unknown compute capability 'sm99'"),
               (["--hardware-compatibility", "ampere_plus"], "TensorRT-RTX has no hardware compatibility levels")]
    if not cuda_available():
        refused.append((["--strip-weights"], "--strip-weights with --engine trt-rtx needs a CUDA GPU"))
    for flags, message in refused:
        assert main([*argv, *flags]) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "o").exists()


def test_an_output_path_under_a_file_is_refused_before_any_work(tmp_path, tiny_models, capsys, monkeypatch):
    import skrr_export.model

    _, folder = tiny_models["bert"]
    plan = write_plan(tmp_path, {"format": "skrr-plan/1", "encoder": {"family": "bert", "num_blocks": 3}})
    (tmp_path / "file").write_text("mine")
    monkeypatch.setattr(skrr_export.model, "load_encoder", lambda *a, **k: pytest.fail("loaded weights"))
    assert main(["--plan", str(plan), "--model", str(folder), "--random-ids", "--out", str(tmp_path / "file" / "sub"), "-q"]) == 2
    assert "cannot be created: " + str(tmp_path / "file") + " is a file" in capsys.readouterr().err
    for extra in ([], ["--force"]):  # --force cannot help, so it is not suggested
        assert main(["--plan", str(plan), "--model", str(folder), "--random-ids", "--out", str(tmp_path / "file"), "-q", *extra]) == 2
        err = capsys.readouterr().err
        assert "is a file, not a folder" in err and "--force" not in err
    assert (tmp_path / "file").read_text() == "mine"


def test_version_names_the_tool_and_its_libraries_without_importing_them():
    import importlib.metadata as md

    code = ("import sys\nfrom skrr_export.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0\nassert 'torch' not in sys.modules and 'onnx' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines["skrr-export"] == md.version("skrr-export")
    for package in ("torch", "transformers", "onnx", "onnxruntime"):
        assert lines[package] == md.version(package)
    assert set(lines) >= {"python", "tensorrt", "tensorrt-rtx"}


def test_an_internal_error_is_one_line_with_exit_3_and_debug_shows_the_traceback(capsys, monkeypatch):
    import skrr_export.inspect_plan

    def bug(*args, **kwargs):
        return {}["missing"]

    monkeypatch.setattr(skrr_export.inspect_plan, "inspect_plan", bug)
    argv = ["inspect", "--plan", str(PIXART_PLAN), "--model", str(T5XXL_CONFIG)]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("skrr-export: error: internal error: KeyError: 'missing'") and "--debug" in err
    assert main([*argv, "--debug"]) == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and 'return {}["missing"]' in err
    assert err.strip().splitlines()[-1].startswith("skrr-export: error: internal error: KeyError")


def test_plan_and_recipe_together_are_refused(capsys):
    assert main(["--plan", str(MINILM_PLAN), "--recipe", "minilm", "-q"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["inspect", "--plan", str(MINILM_PLAN), "--recipe", "minilm"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_existing_output_needs_force(tmp_path, tiny_models, capsys):
    _, folder = tiny_models["bert"]
    plan = write_plan(tmp_path, {"format": "skrr-plan/1", "encoder": {"family": "bert", "num_blocks": 3}, "skip": [2]})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--plan", str(plan), "--model", str(folder), "--random-ids", "--out", str(out), "--no-dense-distance", "-q"]
    assert main(args) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(args + ["--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ARTIFACTS
    assert leftovers(tmp_path) == []
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("wiring check: onnxruntime vs pytorch on the prompts, ")
    assert ": PASSED (decided by token error " in printed[0] and " <= 3e-05, min cosine " in printed[0]
    assert " in last_hidden_state; max abs/rel: information only, in report.md)" in printed[0]
    assert printed[1].startswith("wiring check: onnxruntime vs pytorch on the empty prompt, ") and ": PASSED" in printed[1]


def test_interrupt_during_export_leaves_nothing(tmp_path, tiny_models, monkeypatch, capsys):
    import skrr_export.export

    def interrupted(*args, **kwargs):
        (args[1].parent / "model.onnx").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(skrr_export.export, "export_onnx", interrupted)
    _, folder = tiny_models["bert"]
    plan = write_plan(tmp_path, {"format": "skrr-plan/1", "encoder": {"family": "bert", "num_blocks": 3}})
    out = tmp_path / "out"
    assert main(["--plan", str(plan), "--model", str(folder), "--random-ids", "--out", str(out), "-q"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []


def test_trt_engines_say_they_are_not_built_by_this_version(tmp_path, tiny_models, capsys):
    _, folder = tiny_models["bert"]
    plan = write_plan(tmp_path, {"format": "skrr-plan/1", "encoder": {"family": "bert", "num_blocks": 3}})
    out = tmp_path / "out"
    assert main(["--plan", str(plan), "--model", str(folder), "--random-ids", "--out", str(out), "--engine", "trt", "-q"]) == 2
    assert "--engine trt" in capsys.readouterr().err
    assert not out.exists()


BLOCKER = """
import sys

# Each module named is absent as an uninstalled one is: `import torch` (and `import torch.nn`) raises
# ModuleNotFoundError and importlib.util.find_spec("torch") returns None, which is how transformers asks whether
# torch is there (a meta-path finder that raised from find_spec made transformers itself fail to import).
for name in BLOCKED:
    sys.modules[name] = None
"""


def python_without(blocked: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, run from this checkout, where the ``blocked`` modules cannot be imported."""
    code = f"BLOCKED = {blocked!r}\n{BLOCKER}\n{code}"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def cli_without(blocked: tuple[str, ...], *argv: str) -> subprocess.CompletedProcess:
    """``skrr-export *argv`` (the CLI's main) where the ``blocked`` modules cannot be imported."""
    return python_without(blocked, f"from skrr_export.cli import main\nsys.exit(main({list(argv)!r}))")


def test_help_and_plans_work_without_torch():
    done = cli_without(("torch", "transformers"), "--help")
    assert done.returncode == 0, done.stderr
    assert "--plan" in done.stdout and "inspect" in done.stdout
    done = python_without(("torch", "transformers"), f"from skrr_export.plan import load_plan\n"
                                                     f"print(len(load_plan({str(PIXART_PLAN)!r}).schedule()))")
    assert done.returncode == 0 and done.stdout == "36\n", done.stderr  # DESIGN.md: 36 executed sub-blocks


def test_inspect_works_without_torch():
    """The real inspect of the PixArt plan on T5-v1.1-XXL's config, with torch not importable: the config-only
    numbers (DESIGN.md; test_inspect_t5_xxl_pixart_plan_reports_41_92_percent checks them with torch)."""
    done = cli_without(("torch",), "inspect", "--plan", str(PIXART_PLAN), "--model", str(T5XXL_CONFIG))
    assert done.returncode == 0, done.stderr
    assert "parameters: 4,762,310,656 -> 2,765,735,936" in done.stdout
    assert "bytes bfloat16: 8.87 GiB -> 5.15 GiB" in done.stdout and "sparsity: 41.92 %" in done.stdout
    plan, dense = t5_flops(256, 17, 19), t5_flops(256, 24, 24)  # PixArt 41.9 %: 17 attention and 19 FFN slots run
    assert (f"executed sub-blocks: 36 of 48 (compute fraction 0.763)\nexecuted FLOPs at 1x256: {plan / 1e12:.4g} of "
            f"{dense / 1e12:.4g} TFLOP (fraction {plan / dense:.3f};") in done.stdout


def test_inspect_of_the_embedded_default_recipe_works_without_torch():
    done = cli_without(("torch",), "inspect", "--recipe", "minilm")
    assert done.returncode == 0, done.stderr
    assert "bert encoder, 6 blocks" in done.stdout


def test_inspect_of_an_export_works_without_torch(tiny_models, tmp_path):
    """The exported file's bytes, and whether they agree with the plan, read without torch."""
    from .test_apply import make_plan

    _, folder = tiny_models["bert"]
    plan = write_plan(tmp_path, make_plan("bert", "heavy-reuse").to_json())
    assert main(["--plan", str(plan), "--model", str(folder), "--random-ids", "--out", str(tmp_path / "out"), "-q"]) == 0
    done = cli_without(("torch",), "inspect", "--plan", str(plan), "--model", str(folder),
                       "--onnx", str(tmp_path / "out" / "model.onnx"))
    assert done.returncode == 0, done.stderr
    assert "agrees with the plan in fp32: yes" in done.stdout


def test_inspect_quantize_without_torch_says_it_needs_torch():
    done = cli_without(("torch",), "inspect", "--plan", str(PIXART_PLAN), "--model", str(T5XXL_CONFIG), "--quantize", "int4")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "inspect --quantize needs torch" in done.stderr, done.stderr


def test_inspect_t5_xxl_pixart_plan_reports_41_92_percent(capsys):
    assert main(["inspect", "--plan", str(PIXART_PLAN), "--model", str(T5XXL_CONFIG), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_params"] == 4_762_310_656  # DESIGN.md
    assert round(info["sparsity"] * 100, 2) == 41.92
    # independent arithmetic: 11 attention (67,112,960) + 10 FFN (125,833,216) sub-blocks removed
    assert info["total_params"] - info["kept_params"] == 11 * 67_112_960 + 10 * 125_833_216
    assert info["bytes_after"]["bfloat16"] == 5_531_471_872
    assert info["executed_slots"] == 36
    states = {s["slot"]: s["state"] for s in info["slots"]}
    assert states[2] == "re-uses 0" and states[46] == "skipped" and states[0] == "kept"
    assert main(["inspect", "--plan", str(PIXART_PLAN), "--model", str(T5XXL_CONFIG)]) == 0
    assert "sparsity: 41.92 %" in capsys.readouterr().out
    # the recipe fixes 300 tokens (PixArt-Sigma's call), profile batch 1,1,4: FLOPs counted at 1x300 (opt batch)
    assert main(["inspect", "--recipe", "pixart-sigma-41.9", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flops"] | {"fraction": 0} == {
        "batch": 1, "seq": 300, "dense": t5_flops(300, 24, 24), "plan": t5_flops(300, 17, 19), "fraction": 0,
        "shape_from": "the recipe"}


def t5_flops(seq: int, attention: int, ffn: int) -> int:
    """Matmul FLOPs of T5-v1.1-XXL sub-blocks at batch 1, by hand: q, k, v, o projections (4096 x 4096), scores
    and weighted sum (64 heads x 64), and the gated FFN (wi_0, wi_1: 4096 -> 10240; wo: 10240 -> 4096)."""
    d, inner, ff = 4096, 64 * 64, 10240
    per_attention = 2 * seq * d * inner * 4 + 2 * seq * seq * inner * 2
    per_ffn = 2 * seq * d * ff * 3
    return attention * per_attention + ffn * per_ffn


def test_inspect_counts_the_plans_executed_flops(capsys):
    from skrr_export.plan import load_plan

    plan = load_plan(PIXART_PLAN)
    executed = [src for _, src in plan.schedule()]
    attention, ffn = sum(s % 2 == 0 for s in executed), sum(s % 2 == 1 for s in executed)
    assert main(["inspect", "--plan", str(PIXART_PLAN), "--model", str(T5XXL_CONFIG), "--shape", "1x512", "--json"]) == 0
    flops = json.loads(capsys.readouterr().out)["flops"]
    assert (flops["batch"], flops["seq"]) == (1, 512)
    assert flops["dense"] == t5_flops(512, 24, 24)
    assert flops["plan"] == t5_flops(512, attention, ffn)
    assert round(flops["fraction"], 2) == 0.76  # DESIGN.md: the plan's executed-FLOP fraction
    assert main(["inspect", "--plan", str(PIXART_PLAN), "--model", str(T5XXL_CONFIG), "--shape", "2by512"]) == 2
    assert "--shape must be BATCHxSEQ" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_inspect_of_the_export_agrees_with_inspect_of_the_plan(precision, tmp_path, tiny_models, capsys):
    """No --precision: inspect reads it from the ONNX (it used to assume bf16 and report a correct export as NO)."""
    _, folder = tiny_models["t5"]
    plan = write_plan(tmp_path, {"format": "skrr-plan/1", "encoder": {"family": "t5", "num_blocks": 3}, "skip": [1, 2, 4],
                                 "reuse": {"2": 0, "4": 0}})
    out = tmp_path / "out"
    assert main(["--plan", str(plan), "--model", str(folder), "--random-ids", "--out", str(out), "--no-dense-distance",
                 "--precision", precision, "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", "--plan", str(plan), "--model", str(folder), "--onnx", str(out / "model.onnx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    exported = info["exported"]
    assert info["precision"] == exported["precision"] == precision
    assert exported["plan_kept_bytes"] == sum(info["bytes_after"].values())
    assert exported["onnx_initializer_bytes"] == json.loads((out / "report.json").read_text())["onnx"]["initializer_bytes"]
    assert exported["agrees"]
    assert main(["inspect", "--plan", str(plan), "--model", str(folder), "--onnx", str(out / "model.onnx")]) == 0
    assert f"agrees with the plan in {precision}: yes" in capsys.readouterr().out
    other = "bf16"
    assert main(["inspect", "--plan", str(plan), "--model", str(folder), "--onnx", str(out / "model.onnx"),
                 "--precision", other]) == 2
    assert f"--precision {other}, but {out / 'model.onnx'} holds {precision} weights" in capsys.readouterr().err
    assert main(["inspect"]) == 2


def test_recipes_run_from_any_folder_and_inspect_takes_them(tmp_path):
    done = subprocess.run([sys.executable, "-m", "skrr_export.cli", "inspect", "--recipe", "pixart-sigma-41.9", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert round(info["sparsity"] * 100, 2) == 41.92 and info["precision"] == "bf16"  # the recipe's precision
    assert info["bytes_after"]["bfloat16"] == 5_531_471_872


def test_a_recipe_that_needs_a_checkpoint_says_so(tmp_path, capsys):
    from skrr_export.recipes import load_recipe

    assert main(["--recipe", "pixart-sigma-41.9", "--out", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert ("recipe pixart-sigma-41.9 needs its checkpoint, PixArt-alpha/PixArt-Sigma-XL-2-1024-MS (subfolder "
            "text_encoder): pass --model with its local folder and --subfolder text_encoder, or --random-weights") in err[0]
    recipe = load_recipe("pixart-sigma-41.9")
    assert recipe.model_folder(None, random_weights=True) == T5XXL_CONFIG.parent  # the config it ships
    assert load_recipe("minilm").model_folder(None, random_weights=False) is None  # the embedded default is its model


def test_output_piped_into_a_reader_that_leaves_is_not_an_error():
    """`skrr-export inspect ... | head -1`: no traceback when the reader has closed the pipe (`true` closes it
    before Python has even started, so every write hits a closed pipe)."""
    cmd = (f"'{sys.executable}' -m skrr_export.cli inspect --plan '{PIXART_PLAN}' "
           f"--model '{ROOT / 'recipes' / 't5-v1_1-xxl'}' | true")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, check=False)
    assert done.stderr == "" and done.returncode == 0
