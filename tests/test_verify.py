"""``skrr-export verify OUT``: the checks re-run on a folder as it is, with the settings its manifest records. A
correct export passes; a rewired node, a changed weight, a planted copy of a weight or a changed checkpoint fails
(exit 1) and names what changed; a folder it cannot read is exit 2. ``--from-manifest`` reruns the recorded settings
into a byte-identical model.onnx and data file. One export for the module; every other case edits a copy of it."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import numpy as np
import onnx
import pytest

from skrr_export.cli import main

from . import planted

PLAN = {"format": "skrr-plan/1", "encoder": {"family": "bert", "num_blocks": 3}, "skip": [2, 3], "reuse": {"2": 0, "3": 5}}
WIRING = {"atol": None, "rtol": 0.0, "min_cosine": 0.99999, "max_token_error": 2e-5}  # tighter than the default
RECIPE = {"name": "tiny-bert", "sparsity": 0.3, "plan": "plan.json", "export": {"precision": "bf16"},
          "checkpoint": {"family": "bert", "num_blocks": 3, "config": {"hidden_size": 32}}, "tolerances": {"wiring": WIRING}}


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    """A bf16 BERT export (wiring and precision checks) with one re-used attention and FFN slot, weights in
    model.onnx.data, from a recipe folder (its plan, precision and a tightened wiring tolerance) and flags; its
    command line in argv.json beside it."""
    _, folder = tiny_models["bert"]
    work = tmp_path_factory.mktemp("verify")
    (work / "recipe").mkdir()
    (work / "recipe" / "plan.json").write_text(json.dumps(PLAN))
    (work / "recipe" / "recipe.json").write_text(json.dumps(RECIPE))
    out = work / "out"
    argv = ["--recipe", str(work / "recipe"), "--model", str(folder), "--random-ids", "--out", str(out),
            "--no-dense-distance", "--external-data", "-q"]
    assert main(argv) == 0
    (work / "argv.json").write_text(json.dumps(argv))
    return out


def copy_of(out, tmp_path):
    shutil.copytree(out, tmp_path / "copy")
    return tmp_path / "copy"


def edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_a_correct_folder_passes_every_check(exported, capsys):
    assert main(["verify", str(exported), "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {p["check"] for p in result["parity"]} == {"wiring", "precision"} and result["passed"]
    assert result["weights_once"]["passed"] and result["weights_once"]["weights"]["count"] > 0
    assert result["settings_from"] == "manifest.json" and result["model_files_changed"] == []
    assert result["onnx_changed_since_export"] is False and result["engine"] is None


def test_the_manifest_and_report_record_what_made_the_folder(exported, tiny_models):
    """The command line, versions, plan, model files with sha256, merged settings with each check's tolerance; the
    report says the same in short."""
    _, folder = tiny_models["bert"]
    manifest = json.loads((exported / "manifest.json").read_text())
    recipe_json = exported.parent / "recipe" / "recipe.json"
    recipe = {"name": "tiny-bert", "path": str(recipe_json.resolve()),
              "sha256": hashlib.sha256(recipe_json.read_bytes()).hexdigest()}
    assert manifest["format"] == "skrr-export-manifest/2" and manifest["recipe"] == recipe | {"recipe": RECIPE}
    assert manifest["command"]["argv"] == ["skrr-export", *json.loads((exported.parent / "argv.json").read_text())]
    assert {"skrr-export", "torch", "transformers", "onnx", "onnx-ir"} <= set(manifest["tool"])
    assert manifest["plan"] == PLAN and manifest["model"]["random_weights_seed"] is None
    files = {f["name"]: f["sha256"] for f in manifest["model"]["files"]}
    assert files == {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in ("config.json", "model.safetensors")}
    settings = manifest["settings"]
    assert (settings["precision"], settings["input_dtype"], settings["external_data"], settings["random_ids"],
            settings["dense_distance"], settings["model"]) == ("bf16", "int64", True, True, False, str(folder.resolve()))
    assert settings["tolerances"]["wiring"] == WIRING and "precision-bf16" in settings["tolerances"]
    report = json.loads((exported / "report.json").read_text())
    provenance = report["provenance"]
    assert (provenance["settings"], provenance["command"], provenance["recipe"]) == (settings, manifest["command"], recipe)
    markdown = (exported / "report.md").read_text()
    assert "## Provenance" in markdown and manifest["command"]["line"] in markdown and recipe["sha256"] in markdown


def test_from_manifest_reruns_into_a_byte_identical_model(exported, tmp_path, capsys, caplog):
    """Where the recipe the export used is gone, the rerun says so and uses the recipe as recorded (its tolerances)."""
    folder, new = copy_of(exported, tmp_path), tmp_path / "new"
    edit_json(folder / "manifest.json", lambda m: m["recipe"].update(path=str(tmp_path / "gone" / "recipe.json")))
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="skrr_export"):
        assert main(["--from-manifest", str(folder), "--out", str(new), "-q"]) == 0
    for name in ("model.onnx", "model.onnx.data"):
        assert (new / name).read_bytes() == (exported / name).read_bytes(), name
    assert "model.onnx: byte-identical to the original" in capsys.readouterr().out
    assert f"the recipe the export used, {tmp_path / 'gone' / 'recipe.json'}, no longer exists" in caplog.text
    old, rerun = (json.loads((f / "manifest.json").read_text()) for f in (folder, new))
    assert (rerun["settings"], rerun["plan"], rerun["recipe"]) == (old["settings"], old["plan"], old["recipe"])
    assert rerun["command"]["argv"] == ["skrr-export", "--from-manifest", str(folder), "--out", str(new), "-q"]


def test_from_manifest_refuses_what_it_cannot_rerun(exported, tmp_path, capsys):
    """One line, exit 2, before any work: a model folder that is gone, a flag that changes a setting, a manifest
    without settings, random weights drawn by other library versions."""
    folder = copy_of(exported, tmp_path)
    cases = [
        (lambda m: m["settings"].update(model=str(tmp_path / "gone")), [], f"the model folder the export read, {tmp_path / 'gone'}, no longer exists"),
        (lambda m: None, ["--precision", "fp16"], "--precision cannot be given with it"),
        (lambda m: m.pop("settings"), [], "records no settings"),
        (lambda m: m["settings"].pop("precision"), [], "manifest.json is not what skrr-export writes: missing or "
                                                       "malformed field 'precision'"),
        (lambda m: (m["settings"].update(random_weights=True), m["tool"].update(torch="0.0")), [], "other library versions"),
    ]
    original = (folder / "manifest.json").read_text()
    for edit, flags, words in cases:
        (folder / "manifest.json").write_text(original)
        edit_json(folder / "manifest.json", edit)
        capsys.readouterr()
        assert main(["--from-manifest", str(folder), "--out", str(tmp_path / "new"), *flags]) == 2, words
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    assert not (tmp_path / "new").exists()
    assert main(["--from-manifest", str(folder), "--out", str(folder), "--force"]) == 2
    assert "the rerun needs a new folder" in capsys.readouterr().err


def test_a_rewired_slot_fails_and_the_change_is_named(exported, tmp_path, capsys):
    folder = copy_of(exported, tmp_path)
    planted.plant_reused_weight(folder / "model.onnx", "attention", "last")
    assert main(["verify", str(folder), "-q"]) == 1
    captured = capsys.readouterr()
    assert "changed since the export" in captured.out and "wiring check: " in captured.out
    assert "verify: the wiring check failed" in captured.err


def test_a_changed_weight_fails(exported, tmp_path):
    folder = copy_of(exported, tmp_path)
    model = onnx.load(str(folder / "model.onnx"))
    weight = next(i for i in model.graph.initializer if i.name.endswith("attention.self.key.weight"))
    raw = np.frombuffer(weight.raw_data, dtype=np.uint16).copy()
    raw[: raw.size // 2] = raw[raw.size // 2: 2 * (raw.size // 2)]  # half of the key's rows replaced by the others
    weight.raw_data = raw.tobytes()
    onnx.save(model, str(folder / "model.onnx"))
    assert main(["verify", str(folder), "-q"]) == 1


def test_a_folder_without_its_manifest_or_with_other_random_weights_is_refused(exported, tmp_path, capsys):
    folder = copy_of(exported, tmp_path)
    (folder / "manifest.json").unlink()
    assert main(["verify", str(folder)]) == 2
    assert "holds no manifest.json" in capsys.readouterr().err
    folder = copy_of(exported, tmp_path / "b")
    edit_json(folder / "manifest.json", lambda m: (m["settings"].update(random_weights=True), m["tool"].update(torch="0.0")))
    assert main(["verify", str(folder)]) == 2
    assert "other library versions" in capsys.readouterr().err
    edit_json(folder / "manifest.json", lambda m: m["model"].pop("files"))
    assert main(["verify", str(folder)]) == 2
    assert "missing or malformed field 'files'" in capsys.readouterr().err
    edit_json(folder / "manifest.json", lambda m: m["settings"].update(random_weights=False, model=str(tmp_path / "gone")))
    assert main(["verify", str(folder)]) == 2
    assert f"the model folder the export read, {tmp_path / 'gone'}, no longer exists: pass --model" in capsys.readouterr().err


def test_an_older_folder_is_verified_from_its_report(exported, tmp_path, capsys):
    """A manifest written before it recorded settings: report.json stands in (without it: exit 2)."""
    folder = copy_of(exported, tmp_path)
    edit_json(folder / "manifest.json", lambda m: [m.pop(k) for k in list(m) if k not in ("plan_sha256", "versions", "artifacts")])
    assert main(["verify", str(folder), "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["settings_from"] == "report.json"
    (folder / "report.json").unlink()
    assert main(["verify", str(folder)]) == 2


def plant_copy(path):
    """A transposed copy of a key weight added as an initializer named like the exporter's constants."""
    import onnx_ir as ir

    model = ir.load(str(path))
    name = next(n for n in model.graph.initializers if n.endswith("attention.self.key.weight"))
    copy = np.ascontiguousarray(model.graph.initializers[name].const_value.numpy().T)
    model.graph.register_initializer(ir.Value(name="val_9017", const_value=ir.tensor(copy, name="val_9017")))
    ir.save(model, str(path))
    return "val_9017"


# kind -> (plant on model.onnx, words the error must hold): each fails verify as it fails the main job
# (test_parity_faults plants the quantized-scales and fp16 round-trip faults into folders of their own and verifies them)
PLANTS = {
    "re-used FFN slot": (lambda p: planted.plant_reused_weight(p, "ffn", "last"), "the wiring check failed"),
    "q and k swapped": (lambda p: planted.plant_qk_swap(p, "first"), "the wiring check failed"),
    "a copy of a weight": (plant_copy, 'check "weights once" failed: val_9017', "copies weight encoder.layer."),
}


@pytest.mark.parametrize("kind", PLANTS)
def test_a_planted_fault_fails_verify(kind, exported, tmp_path, capsys):
    folder = copy_of(exported, tmp_path)
    plant, *words = PLANTS[kind]
    plant(folder / "model.onnx")
    capsys.readouterr()
    assert main(["verify", str(folder), "-q"]) == 1
    err = capsys.readouterr().err
    assert all(w in err for w in words), err  # a weight by its checkpoint name (encoder.layer.0.…), never kept.0.…


def test_a_changed_checkpoint_is_named(exported, tiny_models, tmp_path, capsys):
    """A weight file whose sha256 differs from the recorded one: the reference is built from it as it is now, the
    export no longer matches it, and the failure names the file."""
    from safetensors.torch import load_file, save_file

    _, folder = tiny_models["bert"]
    model = tmp_path / "model"
    shutil.copytree(folder, model)
    tensors = load_file(model / "model.safetensors")
    key = next(k for k in tensors if k.endswith("layer.0.attention.self.key.weight"))
    tensors[key] = tensors[key].flip(0).contiguous()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert main(["verify", str(exported), "--model", str(model), "-q"]) == 1
    captured = capsys.readouterr()
    assert "model files changed since the export: model.safetensors (sha256 differs)" in captured.err
    assert "model.safetensors (sha256 differs)" in captured.out


def test_an_engine_that_cannot_run_here_is_reported_not_executed(exported, tmp_path, capsys):
    folder = copy_of(exported, tmp_path)
    (folder / "engine.plan").write_bytes(b"not run here")
    (folder / "engine.json").write_text(json.dumps({"backend": "trt-rtx", "onnx_sha256": "0" * 64}))
    assert main(["verify", str(folder), "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    engine = result["engine"]
    assert engine["executed"] is False and engine["built_from_this_onnx"] is False
    assert engine["reason"].startswith(("built, not executed: no CUDA device", "not executed: the trt-rtx runtime"))
    assert [p["reason"] for p in result["parity"] if p["passed"] is None] == [engine["reason"]]


def test_an_engine_that_runs_here_is_checked_against_pytorch(exported, tmp_path, monkeypatch, capsys):
    """Where a runtime can load engine.plan, it runs against PyTorch at the precision check's tolerance, and its
    failure fails verify. No TensorRT here: ONNX Runtime's half emulation of a damaged copy of the graph (its word
    embedding's rows reversed) stands in for the engine."""
    from skrr_export import trt
    from skrr_export import verify as verify_module
    from skrr_export.artifacts import sha256_file
    from skrr_export.checks import ParityCheck

    folder, stand_in = copy_of(exported, tmp_path), tmp_path / "engine.onnx"
    model = onnx.load(str(folder / "model.onnx"))
    table = next(i for i in model.graph.initializer if i.name.endswith("word_embeddings.weight"))
    table.raw_data = np.frombuffer(table.raw_data, np.uint16).reshape(tuple(table.dims))[::-1].tobytes()  # bf16 rows
    onnx.save(model, str(stand_in))
    (folder / "engine.plan").write_bytes(b"stand-in")
    (folder / "engine.json").write_text(json.dumps({"backend": "trt", "onnx_sha256": sha256_file(folder / "model.onnx")}))
    monkeypatch.setattr(verify_module, "_engine_blocker", lambda kind: None)
    monkeypatch.setattr(trt, "TrtRunner", lambda path, kind, budget: ParityCheck("precision", "bf16").runner(stand_in))
    assert main(["verify", str(folder), "--json", "-q"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["engine"] == result["engine"] | {"executed": True, "built_from_this_onnx": True, "backend": "trt"}
    engine = [p for p in result["parity"] if p["check"] == "engine"]
    assert len(engine) == 2 and not any(p["passed"] for p in engine) and engine[0]["tolerance_key"] == "precision-bf16"
    assert all(p["passed"] for p in result["parity"] if p["check"] != "engine")
