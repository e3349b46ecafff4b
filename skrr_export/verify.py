"""``skrr-export verify OUT``: the parity checks re-run on an artifacts folder as it is, with this machine's runtimes.

The settings come from the folder's report.json (plan, precision, input dtype, fixed sequence, mask, quantization,
model folder, random weights and their seed); the PyTorch reference is rebuilt from the model and the checks run on
model.onnx as found there. A file changed after the export (the user's own optimizer) is checked, not refused; the
result says that its sha256 no longer matches the manifest's. Built on one machine, verified on another: a GPU box
runs the precision check on CUDA.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .artifacts import check_onnx_files, sha256_file
from .errors import AccuracyError, ArtifactError, UserError
from .model import model_source
from .pipeline import ExportConfig, Stages, _Job, _pytorch_reference, run_checks
from .plan import parse_plan
from .report import versions

log = logging.getLogger("skrr_export")


def verify(folder: Path, model: Path | None = None) -> dict[str, Any]:
    """Re-run the checks on ``folder``; the result (``passed``: every executed check held). Raises AccuracyError
    after logging when a check fails."""
    report, manifest = _read(folder, "report.json"), _read(folder, "manifest.json")
    cfg = _settings(folder, report, model)
    _check_versions(report, cfg)
    onnx_path = folder / "model.onnx"
    check_onnx_files(onnx_path)
    recorded = {a["name"]: a["sha256"] for a in manifest.get("artifacts", [])}.get("model.onnx")
    plan = parse_plan({k: v for k, v in report["plan"].items() if k not in ("sha256", "skipped", "reused")})
    source = model_source(cfg.model, None, cfg.random_weights, random_ids=cfg.random_ids)
    ref = _pytorch_reference(cfg, _Job(plan, source, None, {}), Stages())
    ref.drop()
    parity = run_checks(cfg, ref, onnx_path)
    digest = sha256_file(onnx_path)
    result = {"folder": str(folder), "model": str(source.folder), "precision": cfg.precision,
              "onnx_sha256": digest, "onnx_changed_since_export": digest != recorded,
              "parity": parity, "engine": _engine_note(folder), "passed": all(p["passed"] for p in parity)}
    if result["onnx_changed_since_export"]:
        log.warning("model.onnx changed since the export (sha256 differs from manifest.json); checking it as it is")
    return result


def _read(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    if not path.is_file():
        raise UserError(f"{folder} holds no {name}: verify needs an artifacts folder written by skrr-export")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not JSON: {exc.msg} (line {exc.lineno})") from None


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


def _check_versions(report: dict[str, Any], cfg: ExportConfig) -> None:
    """Random weights are only the same weights with the same torch and transformers (their initializers)."""
    if not cfg.random_weights:
        return
    here = versions()
    differ = [f"{k} {report['tool'].get(k)} (export) vs {here.get(k)} (here)" for k in ("torch", "transformers")
              if report["tool"].get(k) != here.get(k)]
    if differ:
        raise UserError(f"the export drew random weights with other library versions ({'; '.join(differ)}): "
                        "the same seed gives other weights; verify on a machine with the export's versions")


def _engine_note(folder: Path) -> dict[str, Any] | None:
    if not (folder / "engine.plan").is_file():
        return None
    return {"executed": False, "reason": "verify checks the ONNX graph; engines are checked where built (--engine)"}


def check_passed(result: dict[str, Any]) -> None:
    failed = [p for p in result["parity"] if p["passed"] is False]
    if failed:
        raise AccuracyError(f"verify: the {failed[0]['check']} check failed ({failed[0]['test']} vs "
                            f"{failed[0]['reference']} on the {failed[0]['batch']})")
