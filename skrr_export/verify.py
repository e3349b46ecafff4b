"""``skrr-export verify OUT``: the checks re-run on an artifacts folder as it is, with this machine's runtimes.

The settings come from the folder's manifest.json (provenance.py: plan, model folder, precision, input dtype, fixed
sequence, mask, quantization, recipe and flags merged, with each check's tolerance); report.json stands in for
folders written before the manifest recorded them. The PyTorch reference is rebuilt from the model folder as it is now
(a weight file whose sha256 differs from the recorded one is named) and the checks run on model.onnx as found:
"weights once" on the file, then the wiring and precision checks; an engine runs where a runtime for it can
(TensorRT, or TensorRT-RTX on a GPU of its class) and is reported as not executed, with the reason, elsewhere. A file
changed after the export (the user's own optimizer) is checked, not refused; the result says that its sha256 no
longer matches the manifest's. Built on one machine, verified on another: a GPU box runs the precision check on CUDA.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .artifacts import check_onnx_files, read_json, sha256_file
from .config import ExportConfig
from .errors import AccuracyError, UserError
from .model import source_of
from .pipeline import Stages, _Job, _pytorch_reference, _tolerance, not_executed, run_checks
from .plan import Plan, parse_plan
from .provenance import (changed_files, check_random_weight_versions, has_settings, recorded_config,
                         recorded_fields)

log = logging.getLogger("skrr_export")

WEIGHTS_ONCE = {"check": "weights once", "method": "every weight stored once; no other stored tensor copies one (as "
                "stored, transposed, cast, reshaped or a block of it); other tensors within their bound (graph.weights)"}


def verify(folder: Path, model: Path | None = None, tokenizer: Path | None = None) -> dict[str, Any]:
    """Re-run the checks on ``folder`` (``model`` / ``tokenizer``: where the recorded folders are now, when they
    moved); the result (``passed``: every executed check held). ``check_passed`` turns a failed check into an
    AccuracyError."""
    manifest, report = read_json(folder, "manifest.json"), _optional(folder, "report.json")
    with recorded_fields(folder / ("manifest.json" if has_settings(manifest) else "report.json")):
        cfg, plan, recorded = _recorded(folder, manifest, report, model, tokenizer)
    check_random_weight_versions(recorded["versions"], cfg.random_weights)
    onnx_path = folder / "model.onnx"
    check_onnx_files(onnx_path)
    once = weights_once(onnx_path, recorded["weight_bytes"])
    source = source_of(cfg)
    changed = changed_files(recorded["files"], source.folder)
    if changed:
        log.warning("model files changed since the export: %s; checking against what is there now", ", ".join(changed))
    ref = _pytorch_reference(cfg, _Job(plan, source, None, {}), Stages())
    ref.drop()
    parity = run_checks(cfg, ref, onnx_path)
    digest = sha256_file(onnx_path)
    engine, engine_parity = _engine(folder, cfg, ref, digest, recorded["artifacts"])
    result = {"folder": str(folder), "model": str(source.folder), "precision": cfg.precision,
              "settings_from": recorded["from"], "onnx_sha256": digest,
              "onnx_changed_since_export": digest != recorded["artifacts"].get("model.onnx"),
              "model_files_changed": changed, "weights_once": once, "parity": parity + engine_parity, "engine": engine}
    result["passed"] = once["passed"] and all(p["passed"] is not False for p in result["parity"])
    if result["onnx_changed_since_export"]:
        log.warning("model.onnx changed since the export (sha256 differs from manifest.json); checking it as it is")
    return result


def _optional(folder: Path, name: str) -> dict[str, Any] | None:
    return read_json(folder, name) if (folder / name).is_file() else None


def _recorded(folder: Path, manifest: dict[str, Any], report: dict[str, Any] | None, model: Path | None,
              tokenizer: Path | None) -> tuple[ExportConfig, Plan, dict[str, Any]]:
    """The job's settings and plan, and what the export recorded: versions, model files, weight bytes, artifacts.
    From the manifest; from report.json for a folder written before the manifest recorded settings."""
    artifacts = {a["name"]: a["sha256"] for a in manifest.get("artifacts", [])}
    if has_settings(manifest):
        cfg = recorded_config(manifest, plan=folder / "manifest.json", out=folder, model=model, tokenizer=tokenizer)
        weights = manifest.get("onnx", {}).get("weights", {}).get("bytes")
        return cfg, parse_plan(manifest["plan"]), {"from": "manifest.json", "versions": manifest["tool"],
                                                   "files": manifest["model"]["files"], "weight_bytes": weights,
                                                   "artifacts": artifacts}
    if report is None:
        raise UserError(f"{folder} holds no report.json and its manifest.json records no settings (an older "
                        "skrr-export wrote it): verify needs either")
    plan = parse_plan({k: v for k, v in report["plan"].items() if k not in ("sha256", "skipped", "reused")})
    return _settings(folder, report, model), plan, {"from": "report.json", "versions": report["tool"], "files": [],
                                                     "weight_bytes": report["onnx"]["weights"]["bytes"],
                                                     "artifacts": artifacts}


def weights_once(onnx_path: Path, weight_bytes: int | None) -> dict[str, Any]:
    """The export's own invariant (graph.weights.check) on the file as it is: its weights named like parameters,
    their bytes against the export's (None: not compared)."""
    from .graph import weights
    from .graph.read import read_model

    model = read_model(onnx_path)
    check = weights.check(model, weights.file_expected(model, weight_bytes))
    stored = check.stored
    return WEIGHTS_ONCE | {"passed": bool(check), "violations": [str(v) for v in check.violations],
                           "weights": {"count": stored.weight_count, "bytes": stored.weight_bytes},
                           "constants": {"count": stored.constant_count, "bytes": stored.constant_bytes}}


def _settings(folder: Path, report: dict[str, Any], model: Path | None) -> ExportConfig:
    from .quantize import quantization

    options = report["onnx"]["export_options"]
    q = report.get("quantization")
    recorded = Path(report["model"]["path"])
    if model is None and not recorded.exists():
        raise UserError(f"the model the export read, {recorded}, is not here: pass --model with its folder")
    # plan: not read (verify takes the plan from report.json); out: the folder is only read
    return ExportConfig(plan=folder / "report.json", out=folder, model=model or recorded,
                        random_weights=report["model"]["random_weights"],
                        random_ids=report["model"].get("tokenizer") is None, precision=report["precision"],
                        input_dtype=options["input_dtype"], fixed_sequence=options["fixed_sequence"],
                        attention_mask=report.get("pipeline", {}).get("attention_mask", True),
                        quantization=quantization(q["scheme"], q["block"]) if q else None)


def _engine(folder: Path, cfg: ExportConfig, ref: Any, onnx_sha256: str,
            artifacts: dict[str, str]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """engine.plan against PyTorch where a runtime for it can load it here; else one row saying why it was not run."""
    path = folder / "engine.plan"
    if not path.is_file():
        return None, []
    meta = _optional(folder, "engine.json") or {}
    kind = str(meta.get("backend") or cfg.engine)
    digest = sha256_file(path)
    note = {"backend": kind, "sha256": digest, "changed_since_export": digest != artifacts.get("engine.plan"),
            "built_from_this_onnx": meta.get("onnx_sha256") == onnx_sha256 if meta else None}
    if note["built_from_this_onnx"] is False:
        log.warning("engine.plan was built from another model.onnx (engine.json's onnx_sha256 differs)")
    reason = _engine_blocker(kind)
    if reason is not None:
        return note | {"executed": False, "reason": reason}, [not_executed(kind, reason)]
    from .compare import runner_parity
    from .trt import TrtRunner

    key = f"precision-{cfg.precision}"  # the main job's engine parity (pipeline._engine)
    runner = TrtRunner(path, kind, cfg.weight_streaming_budget)
    rows = runner_parity(ref.plan_outputs, runner, ref.batches, {"*": _tolerance(cfg, key)})
    described = {"check": "engine", "method": f"engine.plan on this machine's {kind} runtime against PyTorch in "
                 f"{cfg.precision}", "tolerance_key": key}
    return note | {"executed": True}, [row | described for row in rows]


def _engine_blocker(kind: str) -> str | None:
    """Why this machine cannot run an engine of ``kind`` (trt.execution_blocker, after the runtime's presence)."""
    from .trt import BACKENDS, available, execution_blocker

    if kind not in BACKENDS:
        return f"not executed: engine.json names no TensorRT backend ('{kind}')"
    if not available(kind):
        return f"not executed: the {kind} runtime (Python package '{BACKENDS[kind][1]}') is not installed here"
    return execution_blocker(kind)


def check_passed(result: dict[str, Any]) -> None:
    """An AccuracyError naming every failed check (the first failure's detail) and the model files that changed."""
    failed = []
    once = result["weights_once"]
    if not once["passed"]:
        more = f" (and {len(once['violations']) - 1} more)" if len(once["violations"]) > 1 else ""
        failed.append(f"check \"weights once\" failed: {once['violations'][0]}{more}")
    parity = [p for p in result["parity"] if p["passed"] is False]
    if parity:
        p = parity[0]
        failed.append(f"the {p.get('check', p['test'])} check failed ({p['test']} vs {p['reference']} on the {p['batch']})")
    if failed:
        changed = result["model_files_changed"]
        raise AccuracyError("verify: " + "; ".join(failed) + (f"; model files changed since the export: "
                                                                f"{', '.join(changed)}" if changed else ""))
