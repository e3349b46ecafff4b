"""Command line: parse arguments into one frozen config, make one library call, map errors to exit codes.

Exit codes: 0 success (parity holds), 1 accuracy failure, 2 bad input (one line on stderr, no traceback),
3 internal error (one line; ``--debug`` shows the traceback), 130 interrupted.
Nothing heavy is imported before a command runs, so ``--help`` and ``--version`` work without torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, NoReturn

from .config import (ENGINES, INPUT_DTYPES, PRECISIONS, RECIPE_PIPELINE_SETTINGS, RECIPE_SETTINGS, CalibrationConfig,
                     EngineOptions, ExportConfig, MeasureConfig, ShapeRange)
from .errors import ArgumentError, SkrrError, UserError
from .units import size


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so every bad argument is one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("skrr-export").strip()
        raise ArgumentError(f"{command}: {message}" if command else message)


# ----------------------------------------------------------------------------------------------- numbers


def at_least(low: int) -> Any:
    """argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def within(low: float, high: float, open_low: bool = False, open_high: bool = False) -> Any:
    """argparse type: a finite number in [low, high] (or open at either end)."""
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
        below = value <= low if open_low else value < low
        above = value >= high if open_high else value > high
        if not math.isfinite(value) or below or above:
            bound = f"lie in {interval}" if math.isfinite(high) else f"be a finite number >= {low:g}"
            raise argparse.ArgumentTypeError(f"must {bound}, got {text}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ArgumentError(f"{what} must be comma-separated integers, got '{text}'") from None
    if min(values) < 1:
        raise ArgumentError(f"{what} values must be positive integers, got '{text}'")
    return values


# ----------------------------------------------------------------------------------------------- shared flags


class VersionAction(argparse.Action):
    """``--version``: the tool's version and its main libraries', read from package metadata (nothing imported)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, help="print the versions of skrr-export and its main libraries")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> NoReturn:
        from .environment import versions

        print("\n".join(f"{name} {version}" for name, version in versions(all_backends=True).items()))
        parser.exit(0)


def _common(p: Parser) -> None:
    p.add_argument("--debug", action="store_true", help="show the traceback of an internal error")


# ----------------------------------------------------------------------------------------------- flags -> configs
# Each flag's dest is the name of the config field it sets (config.py); its default is the one the dataclass states
# (``default``), or None where a recipe may set it (merged once: recipes.merge_settings). ``given`` reads them back.


def default(cls: type, name: str) -> Any:
    """The default the config dataclass ``cls`` states for its field ``name``: the one place a default is stated."""
    found = next(f for f in fields(cls) if f.name == name)
    return found.default_factory() if found.default is MISSING else found.default  # type: ignore[misc]


def given(cls: type, values: argparse.Namespace | dict[str, Any]) -> dict[str, Any]:
    """The fields of ``cls`` that ``values`` (parsed flags, or merged settings) set; a flag left out (None) is absent,
    so the recipe's setting or the dataclass's default applies."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in (values if isinstance(values, dict) else vars(values)).items() if k in names and v is not None}


def _profile(shape: ShapeRange) -> str:
    return f"{shape.min},{shape.opt},{shape.max}"


def _model_arguments(p: Parser, allow_pickle: bool = True, tokenizer: bool = False) -> None:
    """Where the encoder comes from (config.ModelOptions): the same flags for every command that loads it (and, for
    the commands that tokenize prompts, where its tokenizer comes from)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", type=Path, help="local Hugging Face model folder (default: the embedded all-MiniLM-L6-v2)")
    g.add_argument("--subfolder", help="subfolder of a diffusers pipeline folder, e.g. text_encoder_3")
    g.add_argument("--random-weights", action="store_true",
                   help="build the model from its config with random weights (memory and time do not depend on values)")
    if tokenizer:
        g.add_argument("--tokenizer", type=Path, metavar="DIR", help="tokenizer folder (default: the model folder's, or in "
                       "a diffusers pipeline the one paired with --subfolder: text_encoder_3 -> tokenizer_3)")
        g.add_argument("--random-ids", action="store_true",
                       help="seeded random token ids instead of a tokenizer (implied by --random-weights)")
    if allow_pickle:
        g.add_argument("--allow-pickle", action="store_true",
                       help="also load .bin/.pt checkpoints (torch.load weights_only); only files you trust")


def _plan_arguments(p: Parser) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--plan", type=Path, help="plan file (skrr-plan/1 JSON)")
    which.add_argument("--recipe", help="a built-in recipe by name (or a folder with recipe.json): its plan and settings")


def _form_arguments(p: Parser, cls: type, from_recipe: tuple[str, ...]) -> None:
    """What the exported graph is (config.ExportForm): its precision, input dtype and fixed sequence; ``from_recipe``:
    the ones a recipe sets for this command when the flag is left out (then the default of ``cls``)."""
    g = p.add_argument_group("export form")

    def fallback(name: str) -> str:
        value = "dynamic" if default(cls, name) is None else default(cls, name)
        return f"default: the recipe's, else {value}" if name in from_recipe else f"default {value}"

    g.add_argument("--precision", choices=PRECISIONS,
                   help=f"the weights' dtype: {', '.join(PRECISIONS)} ({fallback('precision')})")
    g.add_argument("--input-dtype", choices=INPUT_DTYPES,
                   help=f"dtype of input_ids and attention_mask ({fallback('input_dtype')})")
    g.add_argument("--fixed-sequence", type=at_least(1), metavar="N",
                   help=f"export a fixed sequence length N; the batch stays dynamic ({fallback('fixed_sequence')})")


def _quantize_arguments(p: Parser) -> None:
    p.add_argument("--quantize", choices=("int8", "int4"), help="weight-only quantization of the kept sub-blocks' linear "
                   "weights: int8 per output channel, int4 block-wise (DequantizeLinear, opset 21)")
    p.add_argument("--quant-block", type=int, metavar="32|64|128", help="int4: input-width elements per scale (default 64)")


def _quantization(args: argparse.Namespace) -> Any:
    from .quantize import quantization

    return quantization(args.quantize, args.quant_block)


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.ERROR if quiet else logging.INFO, format="[skrr-export] %(message)s", stream=sys.stderr)
    for noisy in ("torch", "onnxscript", "onnx_ir", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _resolve_recipe(args: argparse.Namespace, command: str, config_only: bool = False) -> Any:
    """With --recipe: its plan, and the model it needs (or a one-line error saying what to pass)."""
    if args.recipe is None:
        if args.plan is None:
            raise ArgumentError(f"{command + ': ' if command else ''}give --plan PLAN or --recipe NAME")
        return None
    from .recipes import load_recipe

    recipe = load_recipe(args.recipe)
    args.plan = recipe.plan
    args.model = recipe.model_folder(args.model, config_only or args.random_weights)
    return recipe


def _model_config(args: argparse.Namespace) -> Any:
    from .model import load_config, model_source

    return load_config(model_source(args.model, args.subfolder, args.random_weights))


def _check_positions(config: Any, value: int, flag: str) -> None:
    """A sequence longer than the model's positions is refused before any work."""
    from .workload import check_shapes

    try:
        check_shapes(config, (1,), (value,))
    except UserError as exc:
        raise ArgumentError(f"{flag} {value}: {exc}") from None


def _check_file_path(path: Path, flag: str) -> None:
    """``path`` can be written as a file: it is not a folder and nothing above it is a file."""
    from .artifacts import check_writable

    if path.is_dir():
        raise ArgumentError(f"{flag} {path} is a folder; name a file")
    check_writable(path.parent, force=True)


def _positions(config: Any) -> int | None:
    from .workload import default_sequence

    limit = default_sequence(config, sys.maxsize)
    return None if limit == sys.maxsize else limit


# ----------------------------------------------------------------------------------------------- export


def _export_parser() -> Parser:
    p = Parser(
        prog="skrr-export",
        description="Apply a Skrr plan to a Hugging Face text encoder, export ONNX (and TensorRT), check parity.",
        epilog="Other commands: inspect, calibrate, measure, triton, trtexec (each with --help). Exit codes: 0 parity "
               "holds, 1 parity failed, 2 bad input, 3 internal error (--debug shows the traceback), 130 interrupted.",
    )
    p.add_argument("--version", action=VersionAction)
    _plan_arguments(p)
    p.add_argument("--from-manifest", type=Path, metavar="OUT", help="rerun the settings an artifacts folder's manifest.json "
                   "records (plan, model, recipe, flags) into --out; only --model / --tokenizer (where they are now), "
                   "--out and --force may be given")
    p.add_argument("--engine", choices=ENGINES, default=default(ExportConfig, "engine"),
                   help=f"artifact to produce (default: {default(ExportConfig, 'engine')})")
    _model_arguments(p, tokenizer=True)
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: ./out)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    _form_arguments(p, ExportConfig, EXPORT_FROM_RECIPE)
    p.add_argument("--no-attention-mask", dest="attention_mask", action="store_false", default=None,
                   help="export input_ids only, as SD3/FLUX call T5 (a recipe's pipeline block sets it); parity and the "
                   "distance to dense then score every padded position")
    p.add_argument("--external-data", action="store_true", default=None, help="store weights in model.onnx.data (automatic above 2 GiB)")
    p.add_argument("--atol", type=within(0, math.inf), help="parity: element-wise absolute tolerance (default: not checked; absolute errors depend on the model)")
    p.add_argument("--rtol", type=within(0, math.inf), help="parity: relative tolerance (default per precision)")
    p.add_argument("--min-cosine", type=within(-1, 1), help="parity: minimum per-token cosine similarity")
    p.add_argument("--max-token-error", type=within(0, math.inf),
                   help="parity: maximum per-token ||test - ref|| / ||ref|| (default per precision)")
    _quantize_arguments(p)
    p.add_argument("--no-dense-distance", dest="dense_distance", action="store_false", default=None,
                   help="skip loading the dense model to measure the plan's cost")
    p.add_argument("--skip-memory-check", action="store_true", help="run even when the printed host-memory estimate exceeds "
                   "the available memory (for users who know better)")
    p.add_argument("--no-measure", dest="measure", action="store_false", default=None,
                   help="with a CUDA device: skip measuring memory and latency (dense vs plan)")
    p.add_argument("--optimize", choices=("ort",), help="ort: fuse attention (MultiHeadAttention), norms and GELU into ONNX "
                   "Runtime's com.microsoft operators; the ONNX then runs on ONNX Runtime only (not with --engine trt/trt-rtx)")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors")
    _common(p)
    e = p.add_argument_group("engine options (--engine trt / trt-rtx; trtexec names in brackets)")
    e.add_argument("--batch", metavar="MIN,OPT,MAX", help="batch profile, or N for a fixed batch (default: the recipe's, "
                   f"else {_profile(default(EngineOptions, 'batch'))})")
    e.add_argument("--sequence", metavar="MIN,OPT,MAX", help=f"sequence profile (default: the recipe's, else "
                   f"{_profile(default(EngineOptions, 'sequence'))} capped at the model's positions; with --fixed-sequence "
                   "only that sequence)")
    e.add_argument("--workspace-mib", type=at_least(1), metavar="MIB", help="workspace memory-pool limit [--memPoolSize=workspace:N]")
    e.add_argument("--opt-level", dest="optimization_level", type=int, choices=range(6), metavar="0-5",
                   help="builder optimization level [--builderOptimizationLevel]")
    e.add_argument("--timing-cache", type=Path, metavar="FILE", help="read and update a timing cache [--timingCacheFile]")
    e.add_argument("--weight-streaming", action="store_true", help="build with weight streaming [--weightStreaming]")
    e.add_argument("--weight-streaming-budget", type=at_least(0), metavar="BYTES", help="device budget for streamed weights when running")
    e.add_argument("--refit", action="store_true", help="refittable engine (REFIT_IDENTICAL) [--refit]")
    e.add_argument("--strip-weights", action="store_true", help="weight-stripped plan, refit at deployment [--stripWeights]")
    e.add_argument("--hardware-compatibility", choices=("ampere_plus", "same_compute_capability"), help="TensorRT: run on later GPUs [--hardwareCompatibilityLevel]")
    e.add_argument("--compute-capability", dest="compute_capabilities", action="append", metavar="SMxx",
                   help="TensorRT-RTX: target GPU generation (repeatable: sm80 sm86 sm89 sm120 ...)")
    e.add_argument("--version-compatible", action="store_true", help="engine runs on later TensorRT versions [--versionCompatible]")
    return p


# What the main job takes from a recipe where the flag is left out (recipes.merge_settings)
EXPORT_FROM_RECIPE = RECIPE_SETTINGS + RECIPE_PIPELINE_SETTINGS  # all of them


def _check_export_inputs(args: argparse.Namespace, recipe: Any, settings: dict[str, Any]) -> Any:
    """What the pipeline does not check before the output folder: the recipe's checkpoint (first, it names the
    model the recipe was made for) and sequence lengths against the model's positions; returns the config."""
    config = _model_config(args)
    if recipe is not None:
        recipe.check_config(config)
    if settings.get("fixed_sequence") is not None:
        _check_positions(config, settings["fixed_sequence"], "--fixed-sequence")
    return config


def _engine_options(settings: dict[str, Any], config: Any) -> EngineOptions:
    """The builder settings: the engine flags given; the profiles merged with the recipe's, the sequence profile
    checked against the model's positions, or against the fixed sequence it must then be (trt: one check)."""
    fixed = settings.get("fixed_sequence")
    if settings.get("sequence") is not None:
        sequence = ShapeRange.parse(settings["sequence"], "--sequence")
        if fixed is None:
            _check_positions(config, sequence.max, "--sequence")
        else:
            sequence.check_fixed(settings["sequence"], fixed, f"the export (--fixed-sequence {fixed})")
    else:  # the default profile, capped at the model's positions (CLIP: 77)
        profile = default(EngineOptions, "sequence")
        limit = _positions(config) or profile.max
        sequence = ShapeRange(*(min(v, limit) for v in (profile.min, profile.opt, profile.max)))
    if settings.get("timing_cache") is not None:
        _check_file_path(settings["timing_cache"], "--timing-cache")
    batch = ShapeRange.parse(settings["batch"], "--batch") if settings.get("batch") else default(EngineOptions, "batch")
    return EngineOptions(**given(EngineOptions, settings) | {
        "batch": batch, "sequence": sequence, "compute_capabilities": tuple(settings.get("compute_capabilities") or ())})


def _tolerance_overrides(args: argparse.Namespace) -> dict[str, float]:
    """The tolerance values given as flags; each check's default and the recipe's come first (compare.tolerance_for)."""
    given = {"atol": args.atol, "rtol": args.rtol, "min_cosine": args.min_cosine, "max_token_error": args.max_token_error}
    return {k: v for k, v in given.items() if v is not None}


def cmd_export(argv: list[str]) -> int:
    parser = _export_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.quiet)
    if args.from_manifest is not None:
        return _rerun(args, parser, argv)
    from .recipes import merge_settings

    quantization = _quantization(args)
    recipe = _resolve_recipe(args, "")
    settings = merge_settings(given(ExportConfig, args) | given(EngineOptions, args), recipe, EXPORT_FROM_RECIPE)
    config = _check_export_inputs(args, recipe, settings)
    engine_options = _engine_options(settings, config)
    from .pipeline import run_export

    cfg = ExportConfig(**given(ExportConfig, settings) | {
        "recipe": recipe, "quantization": quantization, "tolerance_overrides": _tolerance_overrides(args),
        "engine_options": engine_options, "command": tuple(argv)})
    _print_job(run_export(cfg), args.out)
    return 0


RERUN_FLAGS = ("from_manifest", "out", "force", "model", "tokenizer", "quiet", "debug")


def _rerun(args: argparse.Namespace, parser: Parser, argv: list[str]) -> int:
    """--from-manifest OUT: the recorded settings (merged recipe and flags) into --out; then whether model.onnx came
    out byte-identical. A setting given as a flag would make it another job, so it is refused."""
    flags = [k for k, v in vars(args).items() if k not in RERUN_FLAGS and v != parser.get_default(k)]
    if flags:
        flag = next(a.option_strings[-1] for a in parser._actions if a.dest == flags[0])
        raise ArgumentError(f"--from-manifest reruns the recorded settings, so {flag} cannot be given with it (only "
                            "--out, --force, and --model / --tokenizer where they are now)")
    from .pipeline import run_export
    from .artifacts import read_json
    from .provenance import compare_reruns, rerun

    with rerun(args.from_manifest, args.out, args.model, args.tokenizer, args.force, tuple(argv)) as cfg:
        report = run_export(cfg)
    _print_job(report, args.out)
    for line in compare_reruns(read_json(args.from_manifest, "manifest.json"), read_json(args.out, "manifest.json")):
        print(line)
    return 0


def _print_job(report: dict[str, Any], out: Path) -> None:
    for check in report["parity"]:
        print(_parity_line(check))
    policy = next(c for c in report["checks"] if c["check"] == "policy")
    print(f"policy check: {policy['method']} ({report['precision']}): PASSED")
    print(f"wrote {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")


def _parity_line(check: dict[str, Any]) -> str:
    where = f" on the {check['batch']}" if "batch" in check else ""
    if check.get("passed") is None:
        return f"{check['test']} vs {check['reference']}{where}: {check['reason']}"
    from .compare import Tolerance, deciding

    worst = max(check["outputs"], key=lambda o: o["max_token_error"])
    tol = Tolerance(**worst["tolerance"])
    decided = ", ".join(_decided(s, worst, tol) for s in deciding(tol))
    name = f"{check['check']} check: " if "check" in check else ""
    return (f"{name}{check['test']} vs {check['reference']}{where}: {'PASSED' if check['passed'] else 'FAILED'} "
            f"(decided by {decided} in {worst['name']}; max abs/rel: information only, in report.md)")


def _decided(statistic: str, stats: dict[str, Any], tol: Any) -> str:
    """One statistic that decides pass/fail against its bound: ``token error 2.1e-06 <= 3e-05``."""
    value = stats[statistic]
    if statistic == "min_cosine":
        return f"min cosine {value:.6g} {'>=' if value >= tol.min_cosine else '<'} {tol.min_cosine:g}"
    if statistic == "max_abs":  # element-wise |test - ref| <= atol + rtol |ref|: the atol that passes, against atol
        value, bound, label = stats["needed_atol"], tol.atol, f"atol needed at rtol {tol.rtol:g}"
    else:
        bound, label = tol.max_token_error, "token error"
    return f"{label} {value:.3g} {'<=' if value <= bound else '>'} {bound:g}"


# ----------------------------------------------------------------------------------------------- inspect


# inspect's accounting without an ONNX or a recipe: the precision the pipelines' encoders ship and run in
INSPECT_PRECISION = "bf16"


def _inspect_parser() -> Parser:
    p = Parser(prog="skrr-export inspect", description="What a plan keeps, skips and re-uses, from the config alone; "
               "with --onnx, the exported model's weight bytes (and whether they agree with the plan's).")
    _plan_arguments(p)
    p.add_argument("--onnx", type=Path, help="an exported model.onnx to account for")
    p.add_argument("--model", type=Path, help="model folder or config.json (default: the recipe's config, or the "
                   "embedded all-MiniLM-L6-v2)")
    p.add_argument("--subfolder")
    p.add_argument("--precision", choices=PRECISIONS,
                   help=f"dtype of the weights (default: the ONNX's with --onnx, else the recipe's, else {INSPECT_PRECISION})")
    _quantize_arguments(p)
    p.add_argument("--shape", metavar="BATCHxSEQ", help="shape for the executed-FLOP count (default 1x256, or the model's maximum)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    _common(p)
    return p


def _shape(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        batch, seq = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ArgumentError(f"inspect: --shape must be BATCHxSEQ, e.g. 1x256, got '{text}'") from None
    if batch < 1 or seq < 1:
        raise ArgumentError(f"inspect: --shape {text}: batch and sequence must be positive")
    return batch, seq


def _inspect_precision(args: argparse.Namespace, recipe: Any, exported: dict[str, Any] | None) -> str:
    """The ONNX's own precision when there is one (a flag that contradicts it is refused)."""
    if exported is None:
        return args.precision or (recipe.export.get("precision") if recipe else None) or INSPECT_PRECISION
    if args.precision and args.precision != exported["precision"]:
        raise ArgumentError(f"inspect: --precision {args.precision}, but {exported['onnx']} holds "
                            f"{exported['precision']} weights; leave --precision out to use the ONNX's")
    return str(exported["precision"])


def _inspect_quantization(args: argparse.Namespace, exported: dict[str, Any] | None = None) -> Any:
    """--quantize / --quant-block, or the ONNX's own quantization (a flag that contradicts it is refused), read by
    ``quantize`` only when there is one: its accounting builds the model on the meta device, so it needs torch, and
    says so in one line where torch is missing."""
    from .inspect_plan import quantization_name

    stored = (exported or {}).get("quantization")
    if stored:
        if args.quantize not in (None, stored["scheme"]) or args.quant_block not in (None, stored["block"]):
            given = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in (("quantize", args.quantize),
                                                                         ("quant_block", args.quant_block)) if v)
            raise ArgumentError(f"inspect: {given}, but {exported['onnx']} holds {quantization_name(stored)} weights; leave "
                                "--quantize out to use the ONNX's")
        args = argparse.Namespace(**vars(args) | {"quantize": stored["scheme"], "quant_block": stored["block"]})
    if args.quantize is None and args.quant_block is None:
        return None
    try:
        return _quantization(args)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "torch":
            raise
        raise UserError("inspect --quantize needs torch (the quantized bytes are counted on the model built on the "
                        "meta device), which is not installed; install torch, or leave --quantize out") from None


def _recipe_shape(recipe: Any) -> tuple[int, int] | None:
    """The shape a recipe ships: its fixed sequence at its profile's opt batch (None: the recipe fixes no sequence)."""
    export = recipe.export if recipe is not None else {}
    if not export.get("fixed_sequence"):
        return None
    batch = ShapeRange.parse(export["batch"], "batch") if export.get("batch") else default(EngineOptions, "batch")
    return batch.opt, int(export["fixed_sequence"])


def cmd_inspect(argv: list[str]) -> int:
    """Without --quantize (and --onnx) torch is never imported: the counts come from the config (``counts``)."""
    args = _inspect_parser().parse_args(argv)
    _setup_logging(True)
    if args.plan is None and args.recipe is None and args.onnx is None:
        raise ArgumentError("inspect: give --plan or --recipe (with --model) and/or --onnx")
    from .inspect_plan import agreement, check_weights_once, inspect_onnx, inspect_plan, render, render_onnx

    exported = inspect_onnx(args.onnx) if args.onnx is not None else None
    quantization = _inspect_quantization(args, exported if args.plan is not None or args.recipe is not None else None)
    info: dict[str, Any] = {}
    if args.plan is not None or args.recipe is not None:
        from .plan import load_plan
        from .recipes import default_model_path

        recipe = _resolve_recipe(args, "inspect", config_only=True)
        shape = _shape(args.shape) or _recipe_shape(recipe)
        info = inspect_plan(load_plan(args.plan), args.model or default_model_path(), args.subfolder,
                            _inspect_precision(args, recipe, exported), shape, quantization)
        info["flops"]["shape_from"] = "--shape" if args.shape else "the recipe" if shape else "default"
    if exported is not None:
        info["exported"] = exported | (agreement(info, exported) if "bytes_after" in info else {})
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        if "slots" in info:
            print(render(info))
        if exported is not None:
            print(render_onnx(info["exported"]))
    check_weights_once(info)  # a file that breaks "weights once": exit 1 after the report
    return 0


# ----------------------------------------------------------------------------------------------- calibrate


def _calibrate_parser() -> Parser:
    p = Parser(prog="skrr-export calibrate",
               description="Find Skrr plans: beam-search Skip, then greedy Re-use, against the dense model.")
    _model_arguments(p, allow_pickle=False, tokenizer=True)
    p.add_argument("--out", type=Path, required=True, help="plan file; with several --sparsity values, NAME-<pct>.json each")
    p.add_argument("--sparsity", type=within(0, 1, open_low=True, open_high=True), nargs="+", required=True, metavar="S",
                   help="target sparsities in (0, 1)")
    p.add_argument("--beam", type=at_least(1), default=default(CalibrationConfig, "beam"),
                   help=f"beam width k (default {default(CalibrationConfig, 'beam')}, as the paper)")
    p.add_argument("--prompts", type=Path, help="calibration prompts: one per line, or JSONL (default: the built-in set)")
    p.add_argument("--num-prompts", type=at_least(1), help="use only the first N prompts")
    p.add_argument("--max-length", type=at_least(1), help="tokens per prompt at most (default "
                   f"{default(CalibrationConfig, 'max_length')}, or the model's positions)")
    p.add_argument("--batch-size", type=at_least(1), default=default(CalibrationConfig, "batch_size"),
                   help=f"prompts per forward (default {default(CalibrationConfig, 'batch_size')})")
    p.add_argument("--projection", type=Path, help="denoiser caption projection (safetensors): PixArt caption_projection, SD3/FLUX context_embedder")
    p.add_argument("--device", default=default(CalibrationConfig, "device"),
                   help=f"cpu or cuda (default {default(CalibrationConfig, 'device')})")
    p.add_argument("--precision", choices=PRECISIONS, default=default(CalibrationConfig, "precision"),
                   help=f"dtype the model runs in during calibration (default {default(CalibrationConfig, 'precision')})")
    p.add_argument("--max-memory", metavar="SIZE", help="memory the calibration may use on --device, e.g. 24GiB "
                   "(default: what the device has free minus max(1 GiB, 10 %%)); fewer prompts run at once to stay within it")
    p.add_argument("--naive", action="store_true", help="the reference method: every candidate runs the whole encoder")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--recipe", help="calibrate for a recipe's pipeline (its pipeline block: mask or not, padded length; "
                       "its checkpoint config is checked)")
    which.add_argument("--pipeline", choices=("sd3", "flux", "pixart-sigma"), help="calibrate for this pipeline's call of "
                       "the model: T5: sd3/flux run it unmasked at 256/512 (D over every position), pixart-sigma masked at "
                       "300; CLIP: unmasked at 77, sd3 reads the penultimate layer and text_embeds, flux pooler_output")
    p.add_argument("--negative-prompt", metavar="TEXT", help="the prompt of D's second term, tokenized and padded as the "
                   "pipeline pads it (default: the recipe's negative prompt, else \"\", classifier-free guidance's empty prompt)")
    p.add_argument("--force", action="store_true", help="replace existing plan files")
    p.add_argument("-q", "--quiet", action="store_true")
    _common(p)
    return p


def cmd_calibrate(argv: list[str]) -> int:
    args = _calibrate_parser().parse_args(argv)
    _setup_logging(args.quiet)
    call = _calibration_pipeline(args)
    config = _model_config(args)
    if args.recipe is not None:
        from .recipes import load_recipe

        load_recipe(args.recipe).check_config(config)
    if args.pipeline is not None:
        call = _pipeline_length(args, _named_pipeline(args.pipeline, config, args.subfolder))
    if args.max_length is None:
        length = default(CalibrationConfig, "max_length")
        args.max_length = min(length, _positions(config) or length)
    else:
        _check_positions(config, args.max_length, "--max-length")
    from .calibrate import calibrate, parse_size

    cfg = CalibrationConfig(**given(CalibrationConfig, args) | {
        "sparsities": tuple(args.sparsity), "pipeline": call,
        "max_memory": parse_size(args.max_memory) if args.max_memory is not None else None})
    for target, plan in calibrate(cfg).items():
        p = plan.provenance
        print(f"sparsity {target:g}: {len(plan.skip)} skipped, {len(plan.reuse)} re-used, D {p['score']:.5g} "
              f"({p['subblock_evaluations']:,} sub-block evaluations; naive {p['naive_subblock_evaluations']:,})")
    return 0


def _calibration_pipeline(args: argparse.Namespace) -> Any:
    """--recipe / --pipeline: how the pipeline calls the encoder (None: with the mask, D over real tokens); its padded
    length is the default --max-length, and the only one for an unmasked call (D covers every padded position)."""
    from .recipes import load_recipe

    if args.recipe is None:
        return None
    recipe = load_recipe(args.recipe)
    args.model = recipe.model_folder(args.model, args.random_weights)
    return _pipeline_length(args, recipe.pipeline)


def _named_pipeline(name: str, config: Any, subfolder: str | None) -> Any:
    """--pipeline NAME: that pipeline's call of this model's family (its T5 or its CLIP call), naming --subfolder as
    the encoder when given (SD3's CLIP-G: text_encoder_2)."""
    from dataclasses import replace

    from .adapters import adapter_for
    from .recipes import pipeline_for

    adapter = adapter_for(config)
    call = pipeline_for(name, adapter.family, adapter.output_names(config))
    return replace(call, encoder=subfolder) if subfolder else call


def _pipeline_length(args: argparse.Namespace, call: Any) -> Any:
    """The call's padded length is the default --max-length, and the only one for an unmasked call."""
    if call is None or call.max_length is None:
        return call
    if args.max_length is None:
        args.max_length = call.max_length
    elif args.max_length != call.max_length and not call.attention_mask:
        raise ArgumentError(f"--max-length {args.max_length}: the {call.name} pipeline pads its prompts to "
                            f"{call.max_length} and runs the encoder unmasked, so D covers all {call.max_length} positions")
    return call


# ----------------------------------------------------------------------------------------------- serving


def _triton_parser() -> Parser:
    p = Parser(prog="skrr-export triton", description="Write a Triton model repository for the exported engine or ONNX; "
               "with --text also a tokenizer model and an ensemble NAME_text: text in, embeddings out.")
    p.add_argument("--artifacts", type=Path, required=True, help="output folder of the main job")
    p.add_argument("--repo", type=Path, required=True, help="Triton model repository to write into")
    p.add_argument("--name", help="model name (default: FAMILY_skrr, e.g. t5_skrr)")
    p.add_argument("--max-batch", type=at_least(0), help="max_batch_size (default: the engine profile's max batch, else "
                   "the batch the export was made for, else 8)")
    p.add_argument("--instances", type=at_least(1), default=1, help="instances per GPU (default 1)")
    p.add_argument("--backend", choices=("auto", "tensorrt", "onnx", "python"), default="auto",
                   help="auto: a TensorRT engine when there is one, else the ONNX with ONNX Runtime; python: the ONNX "
                   "with ONNX Runtime in a Python-backend model (CUDA provider on GPU instances, else CPU)")
    p.add_argument("--text", action="store_true", help="also NAME_tokenizer (Python backend, the tokenizer's files copied "
                   "in) and the ensemble NAME_text: TEXT (BYTES) in, the encoder's outputs out, padded as the pipeline pads")
    p.add_argument("--tokenizer", type=Path, metavar="DIR", help="--text: tokenizer folder (default: the one the export used)")
    p.add_argument("--python-env", metavar="PATH", help="the Python-backend models' environment on the serving machine "
                   "(EXECUTION_ENV_PATH: a folder or a packed .tar.gz, absolute path)")
    p.add_argument("--force", action="store_true", help="replace an existing model folder")
    p.add_argument("-q", "--quiet", action="store_true")
    _common(p)
    return p


def cmd_triton(argv: list[str]) -> int:
    args = _triton_parser().parse_args(argv)
    _setup_logging(args.quiet)
    from .serving import TritonRequest, write_triton_repo

    if args.tokenizer is not None and not args.text:
        raise ArgumentError("triton: --tokenizer is for --text (the tokenizer model)")
    written = write_triton_repo(TritonRequest(
        artifacts=args.artifacts, repo=args.repo, name=args.name, max_batch=args.max_batch, instances=args.instances,
        backend=args.backend, force=args.force, text=args.text, python_env=args.python_env, tokenizer=args.tokenizer))
    for out in written:
        files = sorted(p.name for p in (out / "1").iterdir())
        print(f"wrote {out}/ (config.pbtxt{''.join(f', 1/{f}' for f in files)})")
    return 0


def _serve_parser() -> Parser:
    p = Parser(prog="skrr-export serve", description="Start a local Triton Inference Server (the tritonserver of "
               "nvidia-pytriton: Python backend only) on a model repository, on 127.0.0.1; Ctrl-C stops it.")
    p.add_argument("repo", type=Path, nargs="?", help="the model repository (skrr-export triton --backend python [--text])")
    p.add_argument("--http-port", type=at_least(1), default=8000, help="default 8000")
    p.add_argument("--grpc-port", type=at_least(1), default=8001, help="default 8001")
    p.add_argument("--work", type=Path, help="folder for the server's log and backend links (default: a temporary one)")
    p.add_argument("--ready-timeout", type=at_least(1), default=300, help="seconds to wait for every model to load")
    p.add_argument("--make-env", type=Path, metavar="DIR", help="only make DIR a Python environment the server's "
                   "models can use (numpy 1.x for the Triton 2.51 stub, this Python's other packages), print it, exit")
    _common(p)
    return p


def cmd_serve(argv: list[str]) -> int:
    args = _serve_parser().parse_args(argv)
    _setup_logging(False)
    import tempfile

    from .triton_server import python_env, serve

    if args.make_env is not None:
        print(python_env(args.make_env.resolve()))
        return 0
    if args.repo is None:
        raise ArgumentError("serve: give the model repository (or --make-env DIR)")
    if args.work is not None:
        return serve(args.repo, args.work, args.http_port, args.grpc_port, args.ready_timeout)
    with tempfile.TemporaryDirectory(prefix="skrr-serve-") as work:
        return serve(args.repo, Path(work), args.http_port, args.grpc_port, args.ready_timeout)


def _trtexec_parser() -> Parser:
    p = Parser(prog="skrr-export trtexec", description="Write a script that rebuilds the engine with trtexec on the target device.")
    p.add_argument("--artifacts", type=Path, required=True, help="output folder of the main job")
    p.add_argument("--target", choices=("orin-8gb", "orin-16gb", "orin-32gb", "orin-64gb"), help="check that it fits this Jetson")
    p.add_argument("--batch", metavar="MIN,OPT,MAX", help="batch profile (default: engine.json's)")
    p.add_argument("--sequence", metavar="MIN,OPT,MAX", help="sequence profile (default: engine.json's)")
    p.add_argument("--workspace-mib", type=at_least(1), help="workspace limit (default for Jetson: half the free memory)")
    p.add_argument("--script", type=Path, help="where to write it (default: ARTIFACTS/build_engine.sh); it finds "
                   "model.onnx in ARTIFACTS from wherever it is run")
    _common(p)
    return p


def cmd_trtexec(argv: list[str]) -> int:
    args = _trtexec_parser().parse_args(argv)
    from .artifacts import write_atomic
    from .serving import trtexec_profile, trtexec_script

    profile = trtexec_profile(args.artifacts, args.batch, args.sequence)
    script = args.script or args.artifacts / "build_engine.sh"
    _check_file_path(script, "--script")
    text = trtexec_script(args.artifacts, args.target, profile, args.workspace_mib, script.parent)
    script.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(script, text, mode=0o755)
    print(f"wrote {script}")
    return 0


# ----------------------------------------------------------------------------------------------- measure


# What measure takes from a recipe (what the recipe ships: its inputs and its pipeline's call; not its precision)
MEASURE_FROM_RECIPE = ("input_dtype", "fixed_sequence", "attention_mask")


def _measure_parser() -> Parser:
    p = Parser(prog="skrr-export measure", description="Device memory and latency of the dense model and the plan on "
               "CUDA, per backend (PyTorch, ONNX Runtime CUDA, TensorRT), with parity against PyTorch. Needs a CUDA device.")
    _plan_arguments(p)
    _model_arguments(p)
    p.add_argument("--backends", default="", help="comma-separated: torch, ort-cuda, trt, trt-rtx (default: all that can run here); "
                   "on request: torch-compile, ort-cuda-stock (ONNX Runtime's default CUDA settings, to compare with ours), "
                   "ort-cuda-fused (the --optimize ort graph), hf (dense only)")
    batches, sequences = (",".join(map(str, default(MeasureConfig, k))) for k in ("batches", "sequences"))
    p.add_argument("--batch", default=batches, help=f"batch sizes (default {batches})")
    p.add_argument("--seq", help=f"sequence lengths (default: the fixed sequence, else {sequences}; CLIP: 77)")
    _form_arguments(p, MeasureConfig, MEASURE_FROM_RECIPE)
    _quantize_arguments(p)
    p.add_argument("--warmup", type=at_least(0), default=default(MeasureConfig, "warmup"),
                   help=f"untimed runs per shape (default {default(MeasureConfig, 'warmup')})")
    p.add_argument("--iterations", type=at_least(1), default=default(MeasureConfig, "iterations"),
                   help=f"timed runs per shape (default {default(MeasureConfig, 'iterations')})")
    p.add_argument("--out", type=Path, default=Path("measure"), help="output folder (default ./measure)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("-q", "--quiet", action="store_true")
    _common(p)
    return p


def cmd_measure(argv: list[str]) -> int:
    args = _measure_parser().parse_args(argv)
    _setup_logging(args.quiet)
    recipe = _resolve_recipe(args, "measure")
    from .recipes import merge_settings

    settings = merge_settings(given(MeasureConfig, args), recipe, MEASURE_FROM_RECIPE)
    fixed = settings.get("fixed_sequence")
    sequences = args.seq or (str(fixed) if fixed else ",".join(map(str, default(MeasureConfig, "sequences"))))
    batches, sequences = _int_list(args.batch, "--batch"), _int_list(sequences, "--seq")
    config = _model_config(args)
    for value, flag in ((max(sequences), "--seq"), (fixed, "--fixed-sequence")):
        if value:
            _check_positions(config, value, flag)
    from .measure import measure

    cfg = MeasureConfig(**settings | {"backends": tuple(b for b in args.backends.split(",") if b), "batches": batches,
                                      "sequences": sequences, "quantization": _quantization(args)})
    results = measure(cfg)
    for s in results["summary"]:
        print(f"{s['backend']:>8} {s['batch']}x{s['seq']}: dense {s['dense_ms']:.2f} ms, plan {s['plan_ms']:.2f} ms "
              f"(x{s['latency_ratio']:.3f}; executed FLOPs x{s['flop_fraction']:.3f})")
    print(f"wrote {args.out}/ (results.json, results.md, memory.png)")
    return 0


# ----------------------------------------------------------------------------------------------- verify


def _verify_parser() -> Parser:
    p = Parser(prog="skrr-export verify", description="Re-run the checks (weights once, wiring, precision; the engine "
               "where a runtime for it can load it) on an artifacts folder as it is, with the settings its manifest.json "
               "records and this machine's runtimes: build on one machine, verify on another.")
    p.add_argument("out", type=Path, help="an artifacts folder the main job wrote")
    p.add_argument("--model", type=Path, help="the model folder (default: the one manifest.json records)")
    p.add_argument("--tokenizer", type=Path, metavar="DIR", help="the tokenizer folder, where the export was given one "
                   "(default: the one manifest.json records)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    _common(p)
    return p


def cmd_verify(argv: list[str]) -> int:
    args = _verify_parser().parse_args(argv)
    _setup_logging(args.quiet or args.json)
    from .verify import check_passed, verify

    result = verify(args.out, args.model, args.tokenizer)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        once = result["weights_once"]
        print(f"weights once: {'PASSED' if once['passed'] else 'FAILED'} ({once['weights']['count']} weights, "
              f"{once['constants']['count']} other tensors of {size(once['constants']['bytes'])})")
        for violation in once["violations"]:
            print(f"  {violation}")
        for check in result["parity"]:
            print(_parity_line(check))
        if result["onnx_changed_since_export"]:
            print("model.onnx changed since the export (its sha256 differs from manifest.json): checked as it is")
        if result["model_files_changed"]:
            print(f"model files changed since the export: {', '.join(result['model_files_changed'])}; the reference "
                  "is built from what is there now")
    check_passed(result)
    return 0


# ----------------------------------------------------------------------------------------------- main

COMMANDS = {"measure": cmd_measure, "inspect": cmd_inspect, "calibrate": cmd_calibrate, "triton": cmd_triton,
            "trtexec": cmd_trtexec, "verify": cmd_verify, "serve": cmd_serve}


def _one_line(text: str) -> str:
    return " ".join("".join(c if c.isprintable() else repr(c)[1:-1] for c in line) for line in text.splitlines() if line.strip())


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exc()
    print(f"skrr-export: error: {_one_line(message)}", file=sys.stderr)
    return code


def _os_error(exc: OSError) -> str:
    """'cannot write out/x: No space left on device': what failed on which path, without a traceback."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    return f"{exc.strerror or exc}{f': {paths}' if paths else ''}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS.get(argv[0], cmd_export) if argv else cmd_export
    if command is not cmd_export:
        argv = argv[1:]
    debug = "--debug" in argv
    try:
        return command(argv)
    except SkrrError as exc:
        hint = "; this is a bug: rerun with --debug for the traceback and report it" if exc.exit_code == 3 else ""
        return _fail(f"{exc}{hint}", exc.exit_code, debug)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing half-written was left (an output folder appears only when complete)", 130, debug)
    except BrokenPipeError:  # `skrr-export inspect ... | head`: the reader left; not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - replaces the closed stream for the interpreter's exit
        return 0
    except OSError as exc:  # the machine, not the tool: a full disk, a permission, a path that vanished
        return _fail(_os_error(exc), 2, debug)
    except MemoryError:
        return _fail("ran out of host memory; free memory, use a smaller plan, or use a bigger machine", 2, debug)
    except Exception as exc:  # anything else is a bug: one line, the traceback with --debug
        return _fail(f"internal error: {type(exc).__name__}: {exc}; this is a bug: rerun with --debug for the "
                     "traceback and report it", 3, debug)


if __name__ == "__main__":
    sys.exit(main())
