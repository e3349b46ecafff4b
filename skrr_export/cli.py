"""Command line: parse arguments into one frozen config, make one library call, map errors to exit codes.

Exit codes: 0 success, 1 accuracy failure, 2 bad input (one line on stderr, no traceback), 130 interrupted.
Nothing heavy is imported before a command runs, so ``--help`` works without torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .errors import SkrrError

PRECISIONS = ("fp32", "fp16", "bf16")


class ArgumentError(SkrrError):
    exit_code = 2


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so every bad argument is one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ArgumentError(f"{self.prog}: {message}")


def _model_arguments(p: Parser, allow_pickle: bool = True) -> None:
    """Where the encoder comes from: the same flags for every command that loads it."""
    p.add_argument("--model", type=Path, help="local Hugging Face model folder (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--subfolder", help="subfolder of a diffusers pipeline folder, e.g. text_encoder_3")
    p.add_argument("--random-weights", action="store_true",
                   help="build the model from its config with random weights (memory and time do not depend on values)")
    if allow_pickle:
        p.add_argument("--allow-pickle", action="store_true",
                       help="also load .bin/.pt checkpoints (torch.load weights_only); only files you trust")


def _export_parser() -> Parser:
    p = Parser(
        prog="skrr-export",
        description="Apply a Skrr plan to a Hugging Face text encoder, export ONNX (and TensorRT), check parity.",
        epilog="Other commands: inspect, calibrate, measure, triton, trtexec (each with --help).",
    )
    p.add_argument("--plan", type=Path, help="plan file (skrr-plan/1 JSON)")
    p.add_argument("--recipe", help="a recipe (recipes/NAME): its plan and export settings; flags given override them")
    p.add_argument("--engine", choices=("onnx", "trt", "trt-rtx"), default="onnx", help="artifact to produce (default: onnx)")
    _model_arguments(p)
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: ./out)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--precision", choices=PRECISIONS, help="fp32 (default), fp16 or bf16")
    p.add_argument("--input-dtype", choices=("int64", "int32"), help="dtype of input_ids and attention_mask (default int64)")
    p.add_argument("--fixed-sequence", type=int, metavar="N", help="export a fixed sequence length N (batch stays dynamic)")
    p.add_argument("--external-data", action="store_true", default=None, help="store weights in model.onnx.data (automatic above 2 GB)")
    p.add_argument("--atol", type=float, help="parity: absolute tolerance (default per precision)")
    p.add_argument("--rtol", type=float, help="parity: relative tolerance (default per precision)")
    p.add_argument("--min-cosine", type=float, help="parity: minimum per-token cosine similarity")
    p.add_argument("--no-dense-distance", action="store_true", help="skip loading the dense model to measure the plan's cost")
    p.add_argument("--no-measure", action="store_true", help="with a CUDA device: skip measuring memory and latency (dense vs plan)")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors")
    e = p.add_argument_group("engine options (--engine trt / trt-rtx; trtexec names in brackets)")
    e.add_argument("--batch", metavar="MIN,OPT,MAX", help="batch profile, or N for a fixed batch (default 1,1,8)")
    e.add_argument("--sequence", metavar="MIN,OPT,MAX", help="sequence profile (default 1,128,512; --fixed-sequence overrides)")
    e.add_argument("--workspace-mib", type=int, metavar="MIB", help="workspace memory-pool limit [--memPoolSize=workspace:N]")
    e.add_argument("--opt-level", type=int, choices=range(6), metavar="0-5", help="builder optimization level [--builderOptimizationLevel]")
    e.add_argument("--timing-cache", type=Path, metavar="FILE", help="read and update a timing cache [--timingCacheFile]")
    e.add_argument("--weight-streaming", action="store_true", help="build with weight streaming [--weightStreaming]")
    e.add_argument("--weight-streaming-budget", type=int, metavar="BYTES", help="device budget for streamed weights when running")
    e.add_argument("--refit", action="store_true", help="refittable engine (REFIT_IDENTICAL) [--refit]")
    e.add_argument("--strip-weights", action="store_true", help="weight-stripped plan, refit at deployment [--stripWeights]")
    e.add_argument("--hardware-compatibility", choices=("ampere_plus", "same_compute_capability"), help="TensorRT: run on later GPUs [--hardwareCompatibilityLevel]")
    e.add_argument("--compute-capability", action="append", default=[], metavar="SMxx", help="TensorRT-RTX: target GPU generation (repeatable: sm80 sm86 sm89 sm120 ...)")
    e.add_argument("--version-compatible", action="store_true", help="engine runs on later TensorRT versions [--versionCompatible]")
    return p


EXPORT_DEFAULTS = {"precision": "fp32", "input_dtype": "int64", "fixed_sequence": None, "batch": "1,1,8",
                   "sequence": "1,128,512"}


def _apply_recipe(args: argparse.Namespace) -> Any:
    """Fill unset flags from the recipe (if any), then from the defaults; returns the recipe or None."""
    recipe = None
    if args.recipe:
        from .recipes import load_recipe

        recipe = load_recipe(args.recipe)
        args.plan = args.plan or recipe.plan
    if args.plan is None:
        raise ArgumentError("skrr-export: give --plan PLAN or --recipe NAME")
    for key, default in EXPORT_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, (recipe.export.get(key) if recipe else None) or default)
    return recipe


def _engine_options(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .trt import EngineOptions, ShapeRange

    return EngineOptions(
        batch=ShapeRange.parse(args.batch, "--batch"),
        sequence=ShapeRange.parse(args.sequence, "--sequence"),
        workspace_mib=args.workspace_mib,
        optimization_level=args.opt_level,
        timing_cache=args.timing_cache,
        weight_streaming=args.weight_streaming,
        refit=args.refit,
        strip_weights=args.strip_weights,
        hardware_compatibility=args.hardware_compatibility,
        compute_capabilities=tuple(args.compute_capability),
        version_compatible=args.version_compatible,
    )


def _inspect_parser() -> Parser:
    p = Parser(prog="skrr-export inspect", description="What a plan keeps, skips and re-uses, from the config alone; "
               "with --onnx, the exported model's weight bytes (and whether they agree with the plan's).")
    p.add_argument("--plan", type=Path)
    p.add_argument("--onnx", type=Path, help="an exported model.onnx to account for")
    p.add_argument("--model", type=Path, help="model folder or config.json (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--subfolder")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16")
    p.add_argument("--shape", metavar="BATCHxSEQ", help="shape for the executed-FLOP count (default 1x256, or the model's maximum)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.ERROR if quiet else logging.INFO, format="[skrr-export] %(message)s", stream=sys.stderr)
    for noisy in ("torch", "onnxscript", "onnx_ir", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _tolerance(args: argparse.Namespace, recipe: Any):  # type: ignore[no-untyped-def]
    """The precision's default, then the recipe's, then each flag given."""
    from dataclasses import replace

    from .compare import DEFAULT_TOLERANCES, Tolerance

    base = DEFAULT_TOLERANCES[args.precision]
    if recipe and args.precision in recipe.tolerances:
        base = Tolerance(**recipe.tolerances[args.precision])
    given = {"atol": args.atol, "rtol": args.rtol, "min_cosine": args.min_cosine}
    return replace(base, **{k: v for k, v in given.items() if v is not None})


def cmd_export(argv: list[str]) -> int:
    args = _export_parser().parse_args(argv)
    _setup_logging(args.quiet)
    recipe = _apply_recipe(args)
    if args.fixed_sequence is not None and args.fixed_sequence < 1:
        raise ArgumentError("skrr-export: --fixed-sequence must be a positive integer")
    engine_options = _engine_options(args)
    from .pipeline import ExportConfig, run_export

    cfg = ExportConfig(
        plan=args.plan,
        out=args.out,
        model=args.model,
        subfolder=args.subfolder,
        random_weights=args.random_weights,
        allow_pickle=args.allow_pickle,
        engine=args.engine,
        precision=args.precision,
        input_dtype=args.input_dtype,
        fixed_sequence=args.fixed_sequence,
        external_data=args.external_data,
        tolerance=_tolerance(args, recipe),
        recipe=recipe,
        dense_distance=not args.no_dense_distance,
        measure=not args.no_measure,
        force=args.force,
        engine_options=engine_options,
        weight_streaming_budget=args.weight_streaming_budget,
    )
    run_export(cfg)
    print(f"wrote {args.out}/ ({', '.join(sorted(p.name for p in args.out.iterdir()))})")
    return 0


def _shape(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        batch, seq = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ArgumentError(f"skrr-export inspect: --shape must be BATCHxSEQ, e.g. 1x256, got '{text}'") from None
    return batch, seq


def cmd_inspect(argv: list[str]) -> int:
    args = _inspect_parser().parse_args(argv)
    _setup_logging(True)
    from .inspect_plan import inspect_plan, render
    from .model import default_model_path
    from .plan import load_plan

    if args.plan is None and args.onnx is None:
        raise ArgumentError("skrr-export inspect: give --plan (with --model) and/or --onnx")
    info: dict[str, Any] = {}
    if args.plan is not None:
        info = inspect_plan(load_plan(args.plan), args.model or default_model_path(), args.subfolder, args.precision,
                            _shape(args.shape))
    if args.onnx is not None:
        from .inspect_plan import agreement, inspect_onnx

        info["exported"] = inspect_onnx(args.onnx)
        if args.plan is not None:
            info["exported"] |= agreement(info, info["exported"])
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        if args.plan is not None:
            print(render(info))
        if args.onnx is not None:
            e = info["exported"]
            print(f"{e['onnx']}: {e['initializers']} initializers, " + ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in e["bytes"].items()))
            if "agrees" in e:
                print(f"agrees with the plan: {'yes' if e['agrees'] else 'NO'} (difference {e['difference']:+,} bytes)")
    return 0


def _calibrate_parser() -> Parser:
    p = Parser(prog="skrr-export calibrate",
               description="Find Skrr plans: beam-search Skip, then greedy Re-use, against the dense model.")
    _model_arguments(p, allow_pickle=False)
    p.add_argument("--out", type=Path, required=True, help="plan file; with several --sparsity values, NAME-<pct>.json each")
    p.add_argument("--sparsity", type=float, nargs="+", required=True, metavar="S", help="target sparsities in (0, 1)")
    p.add_argument("--beam", type=int, default=3, help="beam width k (default 3, as the paper)")
    p.add_argument("--prompts", type=Path, help="calibration prompts: one per line, or JSONL (default: the built-in set)")
    p.add_argument("--num-prompts", type=int, help="use only the first N prompts")
    p.add_argument("--max-length", type=int, default=256, help="tokens per prompt at most (default 256)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward (default 16)")
    p.add_argument("--projection", type=Path, help="denoiser caption projection (safetensors): PixArt caption_projection, SD3/FLUX context_embedder")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="dtype the model runs in during calibration")
    p.add_argument("--naive", action="store_true", help="the reference method: every candidate runs the whole encoder")
    p.add_argument("--force", action="store_true", help="replace existing plan files")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def cmd_calibrate(argv: list[str]) -> int:
    args = _calibrate_parser().parse_args(argv)
    _setup_logging(args.quiet)
    from .calibrate import CalibrationConfig, calibrate

    cfg = CalibrationConfig(
        out=args.out, sparsities=tuple(args.sparsity), model=args.model, subfolder=args.subfolder,
        random_weights=args.random_weights, beam=args.beam, prompts=args.prompts, num_prompts=args.num_prompts,
        max_length=args.max_length, batch_size=args.batch_size, projection=args.projection, device=args.device,
        precision=args.precision, naive=args.naive, force=args.force,
    )
    for target, plan in calibrate(cfg).items():
        p = plan.provenance
        print(f"sparsity {target:g}: {len(plan.skip)} skipped, {len(plan.reuse)} re-used, D {p['score']:.5g} "
              f"({p['subblock_evaluations']:,} sub-block evaluations; naive {p['naive_subblock_evaluations']:,})")
    return 0


def _triton_parser() -> Parser:
    p = Parser(prog="skrr-export triton", description="Write a Triton model repository for the exported engine or ONNX.")
    p.add_argument("--artifacts", type=Path, required=True, help="output folder of the main job")
    p.add_argument("--repo", type=Path, required=True, help="Triton model repository to write into")
    p.add_argument("--name", default="t5_skrr", help="model name (default t5_skrr)")
    p.add_argument("--max-batch", type=int, help="max_batch_size (default: the engine profile's max batch, 8 for ONNX)")
    p.add_argument("--instances", type=int, default=1, help="instances per GPU (default 1)")
    p.add_argument("--backend", choices=("auto", "tensorrt", "onnx"), default="auto", help="auto: the engine when there is one")
    p.add_argument("--force", action="store_true", help="replace an existing model folder")
    return p


def cmd_triton(argv: list[str]) -> int:
    args = _triton_parser().parse_args(argv)
    from .serving import write_triton_repo

    out = write_triton_repo(args.artifacts, args.repo, args.name, args.max_batch, args.instances, args.backend, args.force)
    print(f"wrote {out}/ (config.pbtxt, 1/{', 1/'.join(sorted(p.name for p in (out / '1').iterdir()))})")
    return 0


def _trtexec_parser() -> Parser:
    p = Parser(prog="skrr-export trtexec", description="Write a script that rebuilds the engine with trtexec on the target device.")
    p.add_argument("--artifacts", type=Path, required=True, help="output folder of the main job")
    p.add_argument("--target", choices=("orin-8gb", "orin-16gb", "orin-32gb", "orin-64gb"), help="check that it fits this Jetson")
    p.add_argument("--batch", metavar="MIN,OPT,MAX", help="batch profile (default: engine.json's)")
    p.add_argument("--sequence", metavar="MIN,OPT,MAX", help="sequence profile (default: engine.json's)")
    p.add_argument("--workspace-mib", type=int, help="workspace limit (default for Jetson: half the free memory)")
    p.add_argument("--script", type=Path, help="where to write it (default: ARTIFACTS/build_engine.sh)")
    return p


def cmd_trtexec(argv: list[str]) -> int:
    args = _trtexec_parser().parse_args(argv)
    from .serving import read_artifacts, trtexec_script

    profile = None
    if args.batch or args.sequence:
        from .trt import EngineOptions, ShapeRange, profile_shapes

        options = EngineOptions(batch=ShapeRange.parse(args.batch or "1,1,8", "--batch"),
                                sequence=ShapeRange.parse(args.sequence or "1,128,512", "--sequence"))
        art = read_artifacts(args.artifacts, prefer="onnx")
        profile = profile_shapes([{"name": t.name, "shape": list(t.shape)} for t in art.inputs], options)
    text = trtexec_script(args.artifacts, args.target, profile, args.workspace_mib)
    script = args.script or args.artifacts / "build_engine.sh"
    from .artifacts import write_atomic

    write_atomic(script, text, mode=0o755)
    print(f"wrote {script}")
    return 0


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ArgumentError(f"skrr-export measure: {what} must be comma-separated integers, got '{text}'") from None
    return values


def _measure_parser() -> Parser:
    p = Parser(prog="skrr-export measure", description="Device memory and latency of the dense model and the plan on "
               "CUDA, per backend (PyTorch, ONNX Runtime CUDA, TensorRT), with parity against PyTorch. Needs a CUDA device.")
    p.add_argument("--plan", type=Path, help="plan file (skrr-plan/1 JSON)")
    p.add_argument("--recipe", help="a recipe (recipes/NAME): its plan")
    _model_arguments(p)
    p.add_argument("--backends", default="", help="comma-separated: torch, ort-cuda, trt, trt-rtx (default: all that can run here); "
                   "on request: torch-compile, ort-cuda-stock (ONNX Runtime's default CUDA settings, to compare with ours)")
    p.add_argument("--batch", default="1,4", help="batch sizes (default 1,4)")
    p.add_argument("--seq", default="256,512", help="sequence lengths (default 256,512; CLIP: 77)")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16", help="default bf16")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per shape (default 3)")
    p.add_argument("--iterations", type=int, default=20, help="timed runs per shape (default 20)")
    p.add_argument("--out", type=Path, default=Path("measure"), help="output folder (default ./measure)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def cmd_measure(argv: list[str]) -> int:
    args = _measure_parser().parse_args(argv)
    _setup_logging(args.quiet)
    if args.recipe:
        from .recipes import load_recipe

        args.plan = args.plan or load_recipe(args.recipe).plan
    if args.plan is None:
        raise ArgumentError("skrr-export measure: give --plan PLAN or --recipe NAME")
    if args.warmup < 0 or args.iterations < 1:
        raise ArgumentError("skrr-export measure: --warmup must be >= 0 and --iterations >= 1")
    from .measure import MeasureConfig, measure

    cfg = MeasureConfig(
        plan=args.plan, out=args.out, model=args.model, subfolder=args.subfolder, random_weights=args.random_weights,
        allow_pickle=args.allow_pickle, backends=tuple(b for b in args.backends.split(",") if b),
        batches=_int_list(args.batch, "--batch"), sequences=_int_list(args.seq, "--seq"), precision=args.precision,
        warmup=args.warmup, iterations=args.iterations, force=args.force,
    )
    results = measure(cfg)
    for s in results["summary"]:
        print(f"{s['backend']:>8} {s['batch']}x{s['seq']}: dense {s['dense_ms']:.2f} ms, plan {s['plan_ms']:.2f} ms "
              f"(x{s['latency_ratio']:.3f}; executed FLOPs x{s['flop_fraction']:.3f})")
    print(f"wrote {args.out}/ (results.json, results.md, memory.png)")
    return 0


COMMANDS = {"measure": cmd_measure, "inspect": cmd_inspect, "calibrate": cmd_calibrate, "triton": cmd_triton, "trtexec": cmd_trtexec}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS.get(argv[0], cmd_export) if argv else cmd_export
    if command is not cmd_export:
        argv = argv[1:]
    try:
        return command(argv)
    except SkrrError as exc:
        one_line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(exc))
        print(f"skrr-export: error: {one_line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("skrr-export: interrupted; the output folder was not created (partial files removed)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `skrr-export inspect ... | head`: the reader left; not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - replaces the closed stream for the interpreter's exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
