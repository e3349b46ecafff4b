"""Hand-off to serving: Triton model repositories and trtexec rebuild scripts (Jetson included).

Both read the artifacts folder written by the main job: model.onnx (+ data), engine.plan + engine.json.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts import ENGINE_METADATA, read_json, staged_folder
from .errors import ArtifactError, UserError
from .ort_fusion import refuse_for_tensorrt
from .recipes import NO_MASK_NOTE
from .units import size

log = logging.getLogger("skrr_export")

# ONNX TensorProto and TensorRT DataType names -> Triton's model-config types
TRITON_TYPES = {
    "FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "HALF": "TYPE_FP16", "BFLOAT16": "TYPE_BF16", "BF16": "TYPE_BF16",
    "INT32": "TYPE_INT32", "INT64": "TYPE_INT64", "BOOL": "TYPE_BOOL",
}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton TYPE_*
    shape: tuple[int, ...]  # -1 for dynamic axes, batch axis included


@dataclass(frozen=True)
class Artifacts:
    folder: Path
    kind: str  # "tensorrt_plan" or "onnxruntime_onnx"
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    max_batch: int | None  # the engine profile's max batch (None for ONNX: unbounded)
    profile: dict[str, list[list[int]]] | None
    weight_bytes: int
    activation_bytes: int | None


ONNX_PRECISIONS = {"FLOAT": "fp32", "FLOAT16": "fp16", "BFLOAT16": "bf16"}


def read_onnx(path: Path) -> Any:
    """The ONNX model at ``path`` without its weights, once its external data files are known to be beside it."""
    import onnx
    from google.protobuf.message import DecodeError

    from .artifacts import check_onnx_files

    try:
        check_onnx_files(path)
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}); export it again") from None
    if model.ir_version == 0 or not model.graph.output:
        raise ArtifactError(f"{path} is not an ONNX model (no IR version or no outputs); export it again")
    return model


def onnx_precision(model: Any) -> str:
    """fp32, fp16 or bf16: the dtype of the model's first floating-point output (what the export ran in)."""
    import onnx

    for value in model.graph.output:
        name = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
        if name in ONNX_PRECISIONS:
            return ONNX_PRECISIONS[name]
    raise ArtifactError(f"{model.graph.name or 'the ONNX model'} has no floating-point output to read a precision from")


def _triton_type(dtype: str, where: str) -> str:
    if dtype not in TRITON_TYPES:
        raise ArtifactError(f"{where}: dtype {dtype} has no Triton type (known: {', '.join(sorted(TRITON_TYPES))})")
    return TRITON_TYPES[dtype]


def engine_metadata(folder: Path) -> dict[str, Any]:
    return read_json(folder, "engine.json", ENGINE_METADATA, "rebuild the engine")


def _engine_artifacts(folder: Path, meta: dict[str, Any]) -> Artifacts:
    def tensors(key: str) -> tuple[Tensor, ...]:
        where = f"{folder / 'engine.json'} {key}"
        return tuple(Tensor(str(t["name"]), _triton_type(t["dtype"], where), tuple(int(d) for d in t["shape"])) for t in meta[key])

    try:
        profile = meta["profiles"][0]
        weights = meta["weights"]
        return Artifacts(folder, "tensorrt_plan", tensors("inputs"), tensors("outputs"),
                         max(int(v[2][0]) for v in profile.values()), profile, int(meta["onnx_weight_bytes"]),
                         weights.get("activation_bytes") or weights.get("activation_bytes_builder"))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"{folder / 'engine.json'} is not skrr-export engine metadata ({type(exc).__name__}: "
                            f"{exc}); rebuild the engine") from None


# Triton's TensorRT backend links standard TensorRT; a TensorRT-RTX engine loads only in the TensorRT-RTX
# runtime of the release that built it.
TRITON_ENGINE_BACKENDS = ("trt",)


def read_artifacts(folder: Path, prefer: str = "auto") -> Artifacts:
    """A TensorRT engine Triton can load when there is one (and ``prefer`` allows it), else the ONNX model."""
    if not folder.is_dir():
        raise ArtifactError(f"artifacts folder {folder} does not exist; pass the --out folder of the main job")
    has_engine = (folder / "engine.plan").is_file() and (folder / "engine.json").is_file()
    if prefer in ("auto", "tensorrt") and has_engine:
        meta = engine_metadata(folder)
        if meta.get("backend") in TRITON_ENGINE_BACKENDS:
            return _engine_artifacts(folder, meta)
        if prefer == "tensorrt":
            raise ArtifactError(
                f"{folder / 'engine.plan'} was built by {meta.get('module')} {meta.get('version')}; Triton's TensorRT "
                "backend runs standard TensorRT engines only (a TensorRT-RTX engine loads only in the TensorRT-RTX "
                "runtime of its release); serve the ONNX with --backend onnx, or build with --engine trt"
            )
        log.warning("%s is a %s engine, which Triton's TensorRT backend cannot load; serving model.onnx with "
                    "ONNX Runtime instead", folder / "engine.plan", meta.get("module"))
    elif prefer == "tensorrt":
        raise ArtifactError(f"{folder} has no engine.plan with engine.json; build one with --engine trt")
    onnx_path = folder / "model.onnx"
    import onnx

    graph = read_onnx(onnx_path).graph

    def tensors(values: Any) -> tuple[Tensor, ...]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            out.append(Tensor(v.name, _triton_type(onnx.TensorProto.DataType.Name(t.elem_type), str(onnx_path)), dims))
        return tuple(out)

    from .artifacts import onnx_weight_bytes

    return Artifacts(folder, "onnxruntime_onnx", tensors(graph.input), tensors(graph.output), None, None,
                     onnx_weight_bytes(onnx_path), None)


# ----------------------------------------------------------------------------------------------- Triton


def inputs_note(art: Artifacts) -> str | None:
    """The breaking-change note of an export without attention_mask (SD3/FLUX T5), None for one that takes it."""
    names = {t.name for t in art.inputs}
    return NO_MASK_NOTE if "input_ids" in names and "attention_mask" not in names else None


def triton_config(art: Artifacts, name: str, max_batch: int, instances: int, notes: tuple[str, ...] = ()) -> str:
    """config.pbtxt: with max_batch_size > 0 the batch axis is left out of dims (Triton adds it)."""

    def block(kind: str, t: Tensor) -> str:
        dims = t.shape[1:] if max_batch > 0 else t.shape
        return f'  {{\n    name: "{t.name}"\n    data_type: {t.dtype}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'

    lines = [f"# {line}" for line in [inputs_note(art), *notes] if line] + [
        f'name: "{name}"',
        f'platform: "{art.kind}"',
        f"max_batch_size: {max_batch}",
        "input [\n" + ",\n".join(block("input", t) for t in art.inputs) + "\n]",
        "output [\n" + ",\n".join(block("output", t) for t in art.outputs) + "\n]",
        f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_GPU\n  }}\n]",
    ]
    if max_batch > 0:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def default_model_name(artifacts: Path) -> str:
    """FAMILY_skrr (t5_skrr, clip_skrr, bert_skrr) from the main job's report.json; skrr_encoder without one."""
    try:
        family = json.loads((artifacts / "report.json").read_text())["model"]["family"]
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s has no readable report.json to take the encoder family from; naming the model skrr_encoder",
                    artifacts)
        return "skrr_encoder"
    return f"{family}_skrr"


MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class TritonRequest:
    """What ``skrr-export triton`` writes: the encoder as ``backend`` (auto / tensorrt / onnx: Triton's own backends;
    python: ONNX Runtime in a Python-backend model.py), and with ``text`` a tokenizer model and an ensemble
    NAME_text (TEXT in, the encoder's outputs out)."""

    artifacts: Path
    repo: Path
    name: str | None = None
    max_batch: int | None = None
    instances: int = 1
    backend: str = "auto"
    force: bool = False
    text: bool = False
    python_env: str | None = None
    tokenizer: Path | None = None


def repo_max_batch(art: Artifacts, req: TritonRequest) -> int:
    """--max-batch, else the engine profile's max batch, else the batch the export was made for, else 8; never more
    than the engine allows."""
    from .triton_repo import DEFAULT_MAX_BATCH, recorded_max_batch

    batch = req.max_batch if req.max_batch is not None else art.max_batch or recorded_max_batch(req.artifacts) or DEFAULT_MAX_BATCH
    if batch < 0 or (art.max_batch is not None and batch > art.max_batch):
        raise UserError(f"--max-batch {batch}: the engine's profile allows batches up to {art.max_batch}")
    if req.text and batch == 0:
        raise UserError("--text needs a batched encoder (--max-batch 1 or more): the ensemble sends TEXT as a batch")
    for t in art.inputs + art.outputs:
        if batch > 0 and (not t.shape or t.shape[0] not in (-1, batch) and art.kind == "onnxruntime_onnx"):
            raise UserError(f"{t.name} has a fixed batch axis {t.shape[:1]}; export with a dynamic batch or use --max-batch 0")
    return batch


def write_triton_repo(req: TritonRequest) -> list[Path]:
    """Write ``repo/NAME`` (config.pbtxt and 1/model.plan, 1/model.onnx + its data file, or 1/model.py beside the ONNX),
    and with ``text`` also ``repo/NAME_tokenizer`` and ``repo/NAME_text``; every folder appears whole or not at all."""
    from contextlib import ExitStack

    from . import triton_repo as tr

    python = req.backend == "python"
    art = read_artifacts(req.artifacts, "onnx" if python else req.backend)
    name = req.name or default_model_name(req.artifacts)
    if not MODEL_NAME.fullmatch(name):
        raise UserError(f"--name '{name}': a Triton model name is a folder name: letters, digits, '_', '.', '-'")
    batch = repo_max_batch(art, req)
    python_env = tr.check_python_env(req.python_env)
    if req.python_env and not (python or req.text):
        raise UserError("--python-env is for Python-backend models: use it with --backend python or --text")
    text = tr.text_pipeline(req.artifacts, art, req.tokenizer) if req.text else None
    note = tr.bf16_note(art, "python" if python else "triton")
    for line in filter(None, [inputs_note(art), note]):
        log.warning("%s: %s", name, line)
    names = [name] + ([f"{name}_tokenizer", f"{name}_text"] if text else [])
    with ExitStack() as stack:
        stages = [stack.enter_context(staged_folder(req.repo / n, req.force)) for n in names]
        _write_encoder(stages[0], art, req, name, batch, python_env, note)
        if text:
            _write_text_models(stages[1], stages[2], art, names, batch, text, python_env, note if python else None)
    return [req.repo / n for n in names]


def _write_encoder(stage: Path, art: Artifacts, req: TritonRequest, name: str, batch: int, python_env: str | None,
                   note: str | None) -> None:
    from . import triton_repo as tr

    version = stage / "1"
    version.mkdir()
    if art.kind == "tensorrt_plan":
        shutil.copy2(req.artifacts / "engine.plan", version / "model.plan")
    else:
        for f in [req.artifacts / "model.onnx", *req.artifacts.glob("model.onnx.data")]:
            shutil.copy2(f, version / f.name)
    if req.backend == "python":
        (version / "model.py").write_text(tr.model_file("onnx_runtime.py"))
        precision = onnx_precision(read_onnx(req.artifacts / "model.onnx"))
        notes = [n for n in (inputs_note(art), note) if n]
        config = tr.python_encoder_config(art, name, batch, req.instances, python_env, precision, notes)
    else:
        config = triton_config(art, name, batch, req.instances, (note,) if note else ())
    (stage / "config.pbtxt").write_text(config)


def _write_text_models(tokenizer: Path, ensemble: Path, art: Artifacts, names: list[str], batch: int, text: Any,
                       python_env: str | None, note: str | None) -> None:
    from . import triton_repo as tr

    (tokenizer / "1").mkdir()
    tr.copy_tokenizer(text, tokenizer / "1" / "tokenizer")
    (tokenizer / "1" / "model.py").write_text(tr.model_file("tokenizer.py"))
    (tokenizer / "config.pbtxt").write_text(tr.tokenizer_config(art, names[1], batch, text, python_env))
    (ensemble / "1").mkdir()  # an ensemble's version folder is empty, but must exist
    types = ["TYPE_FP32" if note and t.dtype == "TYPE_BF16" else t.dtype for t in art.outputs]
    notes = [n for n in (text.describe(), note or tr.bf16_note(art, "triton")) if n]
    (ensemble / "config.pbtxt").write_text(tr.ensemble_config(art, names[2], names[0], names[1], batch, types, notes))


# ----------------------------------------------------------------------------------------------- trtexec and Jetson

GIB = 1 << 30
# Jetson Orin modules: unified memory shared with the OS; what an engine may use is the total minus
# what the OS, CUDA context and TensorRT runtime keep (1.5 GiB assumed, measured numbers welcome).
TARGETS = {"orin-8gb": 8 * GIB, "orin-16gb": 16 * GIB, "orin-32gb": 32 * GIB, "orin-64gb": 64 * GIB}
SYSTEM_RESERVE = int(1.5 * GIB)
ACTIVATION_FACTOR = 16  # activation estimate without a build: 16 x batch x seq x hidden x element size


def activation_estimate(art: Artifacts, profile: dict[str, list[list[int]]]) -> int:
    if art.activation_bytes is not None:
        return int(art.activation_bytes)
    batch, seq = profile[art.inputs[0].name][2]
    out = art.outputs[0]
    itemsize = {"TYPE_FP32": 4, "TYPE_FP16": 2, "TYPE_BF16": 2}.get(out.dtype, 4)
    return ACTIVATION_FACTOR * batch * seq * out.shape[-1] * itemsize


def fits(weights: int, activations: int, target: str) -> tuple[bool, int]:
    """(fits, bytes needed) to run on a Jetson target: weights + activations + the system reserve."""
    need = weights + activations + SYSTEM_RESERVE
    return need <= TARGETS[target], need


# Building on the Orin, where the GPU and the host share one memory. Documented (TensorRT developer guide): the ONNX
# parser holds the network's weights in host memory until the build ends, the builder times tactics on the GPU with
# the weights there, trtexec's --saveEngine writes the plan from one host buffer, and --stripWeights leaves the
# refittable weights out of that plan. Counted from it (an assumption, not measured on an Orin): three copies of the
# weights for a full build, two for a weight-stripped one. Measured on the build host (benchmarks/engine_memory.py,
# TensorRT-RTX 1.7.1, no GPU; a 24-block T5 at d_model 1536, bf16, 0.81 GiB of weights): the same parse-from-file +
# one-buffer build held 2.86 GiB above the import baseline, about three copies of the weights plus 0.45 GiB.
BUILD_COPIES = {"full": 3, "stripped": 2}
MIN_WORKSPACE = 256 << 20


def build_fits(weights: int, activations: int, target: str, kind: str = "full") -> tuple[bool, int]:
    """(fits, bytes needed) to build on the target with trtexec: the weight copies of ``kind`` (BUILD_COPIES),
    activations for timing, the smallest workspace worth building with and the system reserve."""
    need = BUILD_COPIES[kind] * weights + activations + MIN_WORKSPACE + SYSTEM_RESERVE
    return need <= TARGETS[target], need


def largest_batch(weights: int, activations: int, max_batch: int, target: str, kind: str) -> int:
    """The largest max batch (activations scaled from ``max_batch``) that runs and builds (``kind``) on the target;
    0 when not even batch 1 does."""
    for batch in range(max_batch, 0, -1):
        scaled = activations * batch // max_batch
        if fits(weights, scaled, target)[0] and build_fits(weights, scaled, target, kind)[0]:
            return batch
    return 0


def recipes_that_fit(target: str, precision: str, activations: int, build: str | None = None) -> list[str]:
    """Recipes whose kept weights (from their config and plan, no weights loaded) run on ``target`` (and, with
    ``build``, "full" or "stripped", build there)."""
    from .apply import plan_cost
    from .model import DTYPES, ModelSource, build_meta, load_config
    from .plan import load_plan
    from .recipes import available_recipes, load_recipe

    out = []
    for name in available_recipes():
        recipe = load_recipe(name)
        config_dir = recipe.config_folder
        if config_dir is None or not (config_dir / "config.json").is_file():
            continue
        meta = build_meta(load_config(ModelSource(config_dir)))
        meta.dtype = DTYPES[precision]
        weights = plan_cost(meta, load_plan(recipe.plan)).kept_weight_bytes
        if fits(weights, activations, target)[0] and (build is None or build_fits(weights, activations, target, build)[0]):
            out.append(f"{name} ({size(weights, 'GiB')})")
    return out


def trtexec_script(artifacts: Path, target: str | None, profile: dict[str, list[list[int]]] | None,
                   workspace_mib: int | None, script_dir: Path | None = None) -> str:
    """A shell script that rebuilds the engine on the target from model.onnx with trtexec. It changes into the
    artifacts folder, found relative to where the script is written (``script_dir``, default the artifacts
    folder itself), so it runs from any working folder; its first argument overrides that folder."""
    art = read_artifacts(artifacts, prefer="onnx")
    refuse_for_tensorrt(artifacts / "model.onnx")
    if profile is None and (artifacts / "engine.json").is_file():
        profile = _engine_profile(artifacts)
    if profile is None:
        profile = trtexec_profile(artifacts, None, None)
    activations = activation_estimate(art, profile)
    build = "full"
    if target is not None:
        left, build = _workspace_on(target, art, activations, profile[art.inputs[0].name][2][0])  # refuses what won't fit
        workspace_mib = workspace_mib or left

    def shapes(i: int) -> str:
        return ",".join(f"{n}:{'x'.join(map(str, s[i]))}" for n, s in profile.items())

    args = ["trtexec", "--onnx=model.onnx", "--saveEngine=engine.plan", "--stronglyTyped",
            f"--minShapes={shapes(0)}", f"--optShapes={shapes(1)}", f"--maxShapes={shapes(2)}",
            "--timingCacheFile=timing.cache"]
    if workspace_mib:
        args.append(f"--memPoolSize=workspace:{workspace_mib}M")
    if build == "stripped":
        args += ["--stripWeights", "--refit"]
    relative = os.path.relpath(artifacts.resolve(), (script_dir or artifacts).resolve())
    header = [
        "#!/usr/bin/env bash",
        "# Rebuild the TensorRT engine on this device from the portable ONNX (engines are specific to a GPU",
        "# generation and a TensorRT version). Written by skrr-export. Usage: build_engine.sh [FOLDER]",
        "# FOLDER holds model.onnx (default: the artifacts folder it was written for, found relative to this script);",
        "# engine.plan is written there, as the main job names it.",
        f"# Target: {target or 'any'}; weights {size(art.weight_bytes, 'GiB')}, activations ~{size(activations, 'GiB')}.",
        *([f"# Weight-stripped build (a full build does not fit {target}): refit engine.plan from model.onnx's weights "
           "at load (skrr_export.trt.load_refitted, or TensorRT's OnnxParserRefitter)."] if build == "stripped" else []),
        *[f"# Inputs: {', '.join(t.name for t in art.inputs)}; {note}" for note in [inputs_note(art)] if note],
        "set -euo pipefail",
        f'cd "${{1:-$(dirname "$0")/{_bash_quoted(relative)}}}"',
        "test -f model.onnx || { echo \"model.onnx not found in $PWD\" >&2; exit 2; }",
    ]
    return "\n".join(header + [" \\\n  ".join(shlex.quote(a) for a in args)]) + "\n"


def _workspace_on(target: str, art: Any, activations: int, max_batch: int) -> tuple[int, str]:
    """The builder workspace (MiB) the target has left beside the build, and which build fits ("full", or
    "stripped": weight-stripped, refit at load); refused with the recipes and the largest batch that fit."""
    w = art.weight_bytes
    ok, need = fits(w, activations, target)
    if not ok:
        raise UserError(f"does not fit {target}: needs {size(need, 'GiB')} (weights {size(w, 'GiB')} + activations "
                        f"{size(activations, 'GiB')} + system {size(SYSTEM_RESERVE, 'GiB', 1)}) of "
                        f"{size(TARGETS[target], 'GiB', 0)}, {size(need - TARGETS[target], 'GiB')} too much; "
                        f"{_alternatives(target, art, activations, max_batch)}")
    for kind in BUILD_COPIES:
        ok, need = build_fits(w, activations, target, kind)
        if ok:
            if kind != "full":
                log.warning("a full build does not fit %s (needs %s: %d copies of the weights); the script builds "
                            "a weight-stripped engine and refits it from model.onnx's weights at load",
                            target, size(build_fits(w, activations, target)[1], "GiB"), BUILD_COPIES["full"])
            return max(MIN_WORKSPACE >> 20, (TARGETS[target] - need + MIN_WORKSPACE) // (2 << 20)), kind  # MiB: half
    raise UserError(f"runs on {target} but cannot be built there: even a weight-stripped build needs {size(need, 'GiB')} "
                    f"({BUILD_COPIES['stripped']} copies of {size(w, 'GiB')} of weights + activations "
                    f"{size(activations, 'GiB')} + workspace + system) of {size(TARGETS[target], 'GiB', 0)}; "
                    f"{_alternatives(target, art, activations, max_batch)}")


def _alternatives(target: str, art: Any, activations: int, max_batch: int) -> str:
    """What would fit instead: a smaller max batch of this export, and the recipes whose weights fit."""
    precision = {"TYPE_FP16": "fp16", "TYPE_BF16": "bf16"}.get(art.outputs[0].dtype, "fp32")
    batch = largest_batch(art.weight_bytes, activations, max_batch, target, "stripped") if max_batch > 1 else 0
    smaller = f"max batch {batch} fits (--batch 1,1,{batch}); " if 0 < batch < max_batch else ""
    others = recipes_that_fit(target, precision, activations, build="stripped")
    return f"{smaller}in {precision}, recipes that fit: {', '.join(others) or 'none'} (running and building there)"


def _bash_quoted(text: str) -> str:
    """``text`` safe inside a double-quoted bash string."""
    return re.sub(r'(["\\$`])', r"\\\1", text)


def _engine_profile(artifacts: Path) -> dict[str, list[list[int]]]:
    meta = engine_metadata(artifacts)
    try:
        profile = meta["profiles"][0]
        return {str(k): [[int(d) for d in s] for s in v] for k, v in profile.items()}
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"{artifacts / 'engine.json'} has no usable profile ({type(exc).__name__}: {exc}); "
                            "pass --batch and --sequence") from None


def trtexec_profile(artifacts: Path, batch: str | None, sequence: str | None) -> dict[str, list[list[int]]]:
    """min/opt/max per input for trtexec: from --batch/--sequence, else engine.json's profile, else the export's fixed
    sequence (model.onnx's input shape, report.json's --fixed-sequence) with batch 1,1,8 or --batch. A --sequence
    that contradicts a fixed sequence is refused, not replaced."""
    from .config import EngineOptions, ShapeRange
    from .trt import profile_shapes

    art = read_artifacts(artifacts, prefer="onnx")
    fixed = {t.shape[1] for t in art.inputs if len(t.shape) > 1 and t.shape[1] > 0}
    if sequence is not None and fixed:
        ShapeRange.parse(sequence, "--sequence").check_fixed(sequence, min(fixed), "model.onnx")
    if batch is None and sequence is None and (artifacts / "engine.json").is_file():
        return _engine_profile(artifacts)
    if batch is None and sequence is None and not fixed:
        raise UserError(f"model.onnx in {artifacts} has a dynamic sequence and no engine.json to take profiles from; "
                        "pass --sequence MIN,OPT,MAX (and --batch)")
    options = EngineOptions(batch=ShapeRange.parse(batch or "1,1,8", "--batch"),
                            sequence=ShapeRange.parse(sequence or (str(min(fixed)) if fixed else "1,128,512"), "--sequence"))
    return profile_shapes([{"name": t.name, "shape": list(t.shape)} for t in art.inputs], options)
