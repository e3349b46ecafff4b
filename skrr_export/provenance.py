"""Provenance: what made an artifacts folder, recorded in manifest.json (and, in short, in report.json / report.md).

The manifest holds, as data, everything a rerun or a verification needs: the command line, the tool's and libraries'
versions, the recipe (name, path, sha256 and its content), the plan itself, the model folder with the size and sha256
of every file the load reads (config.json, the weight files or shards and their index), the random-weights seed,
and the settings after merging recipe and flags, with the tolerance each check used. ``skrr-export verify`` reads
its settings from it; ``skrr-export --from-manifest OUT --out NEW`` reruns them into a new folder.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from .artifacts import read_json, sha256_file
from .config import EngineOptions, ExportConfig, ShapeRange
from .errors import ArtifactError, UserError
from .environment import versions

log = logging.getLogger("skrr_export")

MANIFEST_FORMAT = "skrr-export-manifest/2"
# ExportConfig fields recorded elsewhere in the manifest (plan, recipe, command) or belonging to one run (out, force)
_NOT_SETTINGS = ("plan", "out", "force", "recipe", "command")
# Settings every manifest of format 2 records, on which the exported bytes depend: missing, the manifest is refused
# (a setting added later, missing from older manifests, takes ExportConfig's default)
REQUIRED_SETTINGS = ("model", "random_weights", "precision", "input_dtype", "fixed_sequence", "external_data",
                     "attention_mask", "quantization", "optimize", "engine")
# Random weights are the same weights only with the same initializers: these libraries' versions
RANDOM_WEIGHT_LIBRARIES = ("torch", "transformers")
# What the exported bytes depend on besides the inputs: a rerun under other versions may write another model.onnx
EXPORT_LIBRARIES = ("torch", "transformers", "onnx", "onnxscript", "onnx-ir")


def manifest_record(cfg: Any, source: Any, plan: Any, report: dict[str, Any]) -> dict[str, Any]:
    """Everything of manifest.json but its artifacts list (artifacts.write_manifest adds that)."""
    from .model import RANDOM_WEIGHTS_SEED

    return {
        "format": MANIFEST_FORMAT,
        "tool": report["tool"],
        "versions": report["tool"],  # the name manifests before format 2 used
        "command": command_record(cfg.command),
        "recipe": recipe_record(cfg.recipe, content=True),
        "plan_sha256": plan.digest(),
        "plan": plan.to_json(),
        "model": {"path": str(source.path.resolve()), "subfolder": source.subfolder, "folder": str(source.folder.resolve()),
                  "random_weights": source.random_weights,
                  "random_weights_seed": RANDOM_WEIGHTS_SEED if source.random_weights else None,
                  "tokenizer": report["model"].get("tokenizer"), "files": model_files(source)},
        "settings": settings_record(cfg, source),
        "onnx": {k: report["onnx"][k] for k in ("weights", "constants", "unique_parameter_bytes") if k in report["onnx"]},
    }


def report_record(cfg: Any, source: Any) -> dict[str, Any]:
    """What report.json says about where it came from: the command, the recipe (name, path, sha256), the settings."""
    return {"command": command_record(cfg.command), "recipe": recipe_record(cfg.recipe, content=False),
            "settings": settings_record(cfg, source)}


def command_record(argv: tuple[str, ...]) -> dict[str, Any]:
    """The command line as run (argv and one shell-quoted line) and the folder it ran in (relative paths)."""
    full = ["skrr-export", *argv]
    return {"argv": full, "line": shlex.join(full), "cwd": os.getcwd()}


def recipe_record(recipe: Any, content: bool) -> dict[str, Any] | None:
    """The recipe's name, its recipe.json's path and sha256 (and, for the manifest, its content: a rerun uses the
    recipe as it was, wherever it is now)."""
    if recipe is None:
        return None
    if recipe.recorded is not None:  # a rerun: the recipe as the first job recorded it
        out = dict(recipe.recorded)
    else:
        path = (recipe.folder / "recipe.json").resolve()
        out = {"name": recipe.name, "path": str(path), "sha256": sha256_file(path), "recipe": json.loads(path.read_text())}
    return out if content else {k: v for k, v in out.items() if k != "recipe"}


def settings_record(cfg: Any, source: Any) -> dict[str, Any]:
    """The settings the job ran with, after merging recipe and flags: every ExportConfig field but the plan, the
    recipe, the command and the output folder, paths absolute; and the tolerance of each check after merging
    default, recipe and flags."""
    out = {f.name: _json(getattr(cfg, f.name)) for f in fields(cfg) if f.name not in _NOT_SETTINGS}
    out["model"] = str(source.path.resolve())  # the embedded default too: a rerun needs no other installation
    return out | {"tolerances": tolerances_record(cfg)}


def tolerances_record(cfg: Any) -> dict[str, dict[str, Any]]:
    """Each check's tolerance (wiring, precision-<p>: the engine's and the CUDA precision check's)."""
    from .checks import parity_checks
    from .compare import tolerance_for

    keys = dict.fromkeys([c.tolerance_key for c in parity_checks(cfg.precision, cuda=False)] + [f"precision-{cfg.precision}"])
    recipe = cfg.recipe.tolerances if cfg.recipe else None
    return {key: asdict(tolerance_for(key, recipe, cfg.tolerance_overrides)) for key in keys}


def _json(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value.resolve())
    if hasattr(value, "to_json"):  # EngineOptions: its timing cache absolute as well
        out = value.to_json()
        return out | {"timing_cache": _json(value.timing_cache)} if getattr(value, "timing_cache", None) else out
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, tuple):
        return list(value)
    return value


# ----------------------------------------------------------------------------------------------- model files


def model_files(source: Any) -> list[dict[str, Any]]:
    """config.json and, unless the weights are random, every weight file the load reads (the safetensors files,
    or the shards and their index, or the one pickle --allow-pickle reads), each with its size and sha256."""
    folder = source.folder
    names = ["config.json"] + ([] if source.random_weights else weight_files(folder, source.allow_pickle))
    out = []
    for name in names:
        path = folder / name
        if path.is_file():
            log.info("sha256 of %s (%.1f MiB)", name, path.stat().st_size / 2**20)
            out.append({"name": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    return out


def weight_files(folder: Path, allow_pickle: bool) -> list[str]:
    """The files checkpoint.Checkpoint.open reads from ``folder``, in its order of preference."""
    from .checkpoint import INDEX, PICKLES

    index = folder / INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except (OSError, json.JSONDecodeError, AttributeError):
            shards = []
        return [INDEX, *shards]
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    pickles = [p for p in PICKLES if (folder / p).is_file()]
    return found or (pickles[:1] if allow_pickle else [])


def changed_files(recorded: list[dict[str, Any]], folder: Path) -> list[str]:
    """Each recorded model file whose sha256 differs now, or that is gone: 'NAME (sha256 differs)', 'NAME (missing)'."""
    out = []
    for entry in recorded:
        path = folder / entry["name"]
        if not path.is_file():
            out.append(f"{entry['name']} (missing)")
        elif path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            out.append(f"{entry['name']} (sha256 differs)")
    return out


# ----------------------------------------------------------------------------------------------- reading back


@contextmanager
def recorded_fields(path: Path) -> Iterator[None]:
    """Reading what ``path`` records: a field that is missing or of the wrong type (a hand-edited or truncated file)
    is the folder's problem, one line and exit 2, not a bug."""
    try:
        yield
    except (KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{path} is not what skrr-export writes: missing or malformed field {exc}") from None


def has_settings(manifest: dict[str, Any]) -> bool:
    """Manifests of format 2 and later record the settings; older ones only the artifacts, the plan hash, versions."""
    return isinstance(manifest.get("settings"), dict) and "plan" in manifest


def version_differences(recorded: dict[str, Any], libraries: tuple[str, ...]) -> list[str]:
    here = versions()
    return [f"{k} {recorded.get(k)} (export) vs {here.get(k)} (here)" for k in libraries if recorded.get(k) != here.get(k)]


def check_random_weight_versions(recorded: dict[str, Any], random_weights: bool) -> None:
    """Random weights are only the same weights with the same torch and transformers (their initializers)."""
    differ = version_differences(recorded, RANDOM_WEIGHT_LIBRARIES) if random_weights else []
    if differ:
        raise UserError(f"the export drew random weights with other library versions ({'; '.join(differ)}): "
                        "the same seed gives other weights; use a machine with the export's versions")


def recorded_recipe(record: dict[str, Any] | None) -> Any:
    """The recipe as the manifest recorded it (its content, not the file as it is now); a recipe file that changed
    since, or is gone, is said to be."""
    if record is None:
        return None
    from .recipes import parse_recipe

    path = Path(record["path"])
    if not path.is_file():
        log.warning("the recipe the export used, %s, no longer exists: using the copy recorded in the manifest", path)
    elif sha256_file(path) != record["sha256"]:
        log.warning("the recipe %s changed since the export (sha256 differs): using the copy recorded in the manifest",
                    path)
    return replace(parse_recipe(record["recipe"], path.parent), recorded=record)


def recorded_config(manifest: dict[str, Any], plan: Path, out: Path, model: Path | None = None,
                    tokenizer: Path | None = None, force: bool = False, command: tuple[str, ...] = ()) -> Any:
    """The ExportConfig the manifest's job ran with (``model`` / ``tokenizer``: where they are now, when they moved).
    A recorded model or tokenizer folder that no longer exists is one line naming it (exit 2)."""
    s = manifest["settings"]
    missing = [k for k in REQUIRED_SETTINGS if k not in s]
    if missing:
        raise KeyError(missing[0])  # recorded_fields: one line naming it, exit 2
    known = {f.name for f in fields(ExportConfig)} - set(_NOT_SETTINGS)
    unknown = sorted(set(s) - known - {"tolerances"})
    if unknown:
        log.warning("settings this version does not know, left out: %s (a newer skrr-export wrote the manifest)",
                    ", ".join(unknown))
    recorded = {k: v for k, v in s.items() if k in known}
    model = model or _existing(s["model"], "model folder", "--model")
    tokenizer = tokenizer or (_existing(s["tokenizer"], "tokenizer folder", "--tokenizer") if s.get("tokenizer") else None)
    return ExportConfig(**recorded | {
        "plan": plan, "out": out, "force": force, "command": command, "model": model, "tokenizer": tokenizer,
        "tolerance_overrides": dict(s.get("tolerance_overrides") or {}),
        "engine_options": _engine_options(s.get("engine_options")), "quantization": _quantization(s.get("quantization")),
        "recipe": recorded_recipe(manifest.get("recipe")),
    })


def _existing(recorded: str, what: str, flag: str) -> Path:
    path = Path(recorded)
    if not path.exists():
        raise UserError(f"the {what} the export read, {path}, no longer exists: pass {flag} with where it is now")
    return path


def _engine_options(data: dict[str, Any] | None) -> Any:
    if data is None:
        return None

    cache = data.get("timing_cache")
    if cache and not Path(cache).exists():
        log.warning("the timing cache the export used, %s, no longer exists: the engine build starts without one", cache)
    return EngineOptions(**data | {"batch": ShapeRange(**data["batch"]), "sequence": ShapeRange(**data["sequence"]),
                                   "timing_cache": Path(cache) if cache else None,
                                   "compute_capabilities": tuple(data.get("compute_capabilities", ()))})


def _quantization(data: dict[str, Any] | None) -> Any:
    if data is None:
        return None
    from .quantize import quantization

    return quantization(data["scheme"], data.get("block"))


@contextmanager
def rerun(folder: Path, out: Path, model: Path | None, tokenizer: Path | None, force: bool,
          command: tuple[str, ...]) -> Iterator[Any]:
    """The ExportConfig that reruns ``folder``'s recorded settings into ``out`` (its plan in a temporary file while
    the job runs). Random weights under other torch / transformers are refused (other weights); other export
    libraries are said to be (model.onnx may differ in bytes)."""
    manifest = read_json(folder, "manifest.json")
    if not has_settings(manifest):
        raise UserError(f"{folder / 'manifest.json'} records no settings (written before manifest format 2): "
                        "rerun the original command instead")
    if out.resolve() == folder.resolve():
        raise UserError(f"--from-manifest {folder} --out {out}: the rerun needs a new folder (it reads the old one)")
    with recorded_fields(folder / "manifest.json"):
        check_random_weight_versions(manifest["tool"], manifest["settings"]["random_weights"])
        differ = version_differences(manifest["tool"], EXPORT_LIBRARIES)
    if differ:
        log.warning("other library versions than the export's (%s): model.onnx may differ in bytes", "; ".join(differ))
    with tempfile.TemporaryDirectory(prefix="skrr-export-rerun-") as tmp:
        plan = Path(tmp) / "plan.json"
        with recorded_fields(folder / "manifest.json"):
            plan.write_text(json.dumps(manifest["plan"]))
            cfg = recorded_config(manifest, plan, out, model, tokenizer, force, command)
        yield cfg


def compare_reruns(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One line per file the rerun reproduces (model.onnx and its data file; an engine, whose builder may pick other
    tactics on another machine), and the model's own files that changed."""
    lines = []
    before = {a["name"]: a["sha256"] for a in old.get("artifacts", [])}
    for a in new.get("artifacts", []):
        if a["name"].startswith("model.onnx") or a["name"] == "engine.plan":
            same = before.get(a["name"]) == a["sha256"]
            lines.append(f"{a['name']}: {'byte-identical to the original' if same else 'DIFFERS from the original'} "
                         f"(sha256 {a['sha256'][:16]})")
    recorded = {f["name"]: f["sha256"] for f in old["model"]["files"]}
    changed = [f["name"] for f in new["model"]["files"] if recorded.get(f["name"]) not in (None, f["sha256"])]
    if changed:
        lines.append(f"model files changed since the original export (sha256 differs): {', '.join(changed)}")
    return lines
