"""The parts of a Triton repository beyond the encoder's own config: the Python-backend encoder (ONNX Runtime in
model.py), the tokenizer model and the ``NAME_text`` ensemble (text in, embeddings out), and what the artifacts
folder says about batch size, padding and precision.

The tokenizer pads and truncates as the recipe's pipeline does (report.json's pipeline block and the export's
fixed sequence); the batch size comes from the engine profile or the batch the export was made for.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ArtifactError, ModelError, UserError

log = logging.getLogger("skrr_export")

DEFAULT_MAX_BATCH = 8  # an ONNX export made without a batch profile: its dynamic batch axis has no bound
DEFAULT_TEXT_LENGTH = 512  # truncation for a pipeline that pads to the longest prompt, when nothing gives a limit
ENV_PARAMETER = "EXECUTION_ENV_PATH"
# Files a Hugging Face tokenizer folder may need (a model folder also holds weights, which are not copied)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
                   "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


def read_report(artifacts: Path) -> dict[str, Any]:
    try:
        report = json.loads((artifacts / "report.json").read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _dig(data: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def recorded_max_batch(artifacts: Path) -> int | None:
    """The largest batch the export was made for (the recipe's or --batch's MIN,OPT,MAX), as report.json's or
    manifest.json's recorded settings hold it; None when neither records one."""
    for name, keys in (("report.json", ("provenance", "settings", "engine_options", "batch")),
                       ("manifest.json", ("settings", "engine_options", "batch"))):
        try:
            value = _dig(json.loads((artifacts / name).read_text()), keys)
        except (OSError, ValueError):
            continue
        if isinstance(value, dict):
            value = value.get("max")
        elif isinstance(value, str):
            value = value.split(",")[-1]
        elif isinstance(value, list) and value:
            value = value[-1]
        try:
            return int(value) if value is not None else None
        except (TypeError, ValueError):
            continue
    return None


def check_python_env(value: str | None) -> str | None:
    """--python-env: where the Triton server finds the models' Python environment (a folder or a packed .tar.gz).
    A path on the serving machine, so it is not required to exist here; it must be absolute (Triton resolves nothing
    against the directory it was started in), or start with $$TRITON_MODEL_DIRECTORY."""
    if value is None:
        return None
    if not (value.startswith("/") or value.startswith("$$TRITON_MODEL_DIRECTORY")) or '"' in value or "\n" in value:
        raise UserError(f"--python-env '{value}': give an absolute path (or one starting with $$TRITON_MODEL_DIRECTORY) "
                        "to the environment on the serving machine")
    return value


# ----------------------------------------------------------------------------------------------- precision


def bf16_outputs(art: Any) -> list[str]:
    return [t.name for t in art.outputs if t.dtype == "TYPE_BF16"]


def bf16_note(art: Any, backend: str) -> str | None:
    """What a client receives from a bf16 export: said in config.pbtxt and on the console."""
    names = ", ".join(bf16_outputs(art))
    if not names:
        return None
    if backend == "python":
        return (f"{names}: bf16 in model.onnx; this Python-backend model returns them as FP32 (widened exactly, each "
                "value a bf16 value: 2x the bytes on the wire); it runs on GPU instances only (ONNX Runtime's CPU "
                "provider has no bf16 kernels)")
    return (f"{names}: bf16; Triton returns TYPE_BF16 (2 bytes a value); tritonclient 2.73 gives numpy arrays of "
            "ml_dtypes.bfloat16 (.astype(numpy.float32) widens them exactly); raw HTTP/JSON clients get the 16-bit words")


# ----------------------------------------------------------------------------------------------- configs


def _dims(shape: tuple[int, ...], max_batch: int) -> str:
    return ", ".join(map(str, shape[1:] if max_batch > 0 else shape))


def tensor_block(name: str, dtype: str, shape: tuple[int, ...], max_batch: int) -> str:
    return f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: [ {_dims(shape, max_batch)} ]\n  }}'


def parameter_lines(values: dict[str, str | None]) -> list[str]:
    return [f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in values.items() if v is not None]


def python_encoder_config(art: Any, name: str, max_batch: int, instances: int, python_env: str | None,
                          precision: str, notes: list[str]) -> str:
    """The encoder as a Python-backend model (ONNX Runtime in model.py): bf16 outputs are declared FP32 (model.py
    widens them); the instance kind is Triton's choice (a GPU where there is one, else the CPU)."""
    outputs = [tensor_block(t.name, "TYPE_FP32" if t.dtype == "TYPE_BF16" else t.dtype, t.shape, max_batch) for t in art.outputs]
    lines = [f"# {n}" for n in notes] + [
        f'name: "{name}"', 'backend: "python"', f"max_batch_size: {max_batch}",
        "input [\n" + ",\n".join(tensor_block(t.name, t.dtype, t.shape, max_batch) for t in art.inputs) + "\n]",
        "output [\n" + ",\n".join(outputs) + "\n]",
        f"instance_group [\n  {{\n    count: {instances}\n  }}\n]",
    ] + (["dynamic_batching { }"] if max_batch > 0 else [])
    return "\n".join(lines + parameter_lines({"precision": precision, ENV_PARAMETER: python_env})) + "\n"


@dataclass(frozen=True)
class TextPipeline:
    """How the pipeline tokenizes: padded to ``max_length`` ("max_length"), or to the longest prompt of a request
    ("longest") and truncated at ``max_length``."""

    tokenizer: Path
    padding: str
    max_length: int
    attention_mask: bool

    def describe(self) -> str:
        pad = f"padded to {self.max_length}" if self.padding == "max_length" else \
            f"padded to the longest prompt of a request, truncated at {self.max_length}"
        return f"{pad}, {'with' if self.attention_mask else 'without'} attention_mask"


def tokenizer_config(art: Any, name: str, max_batch: int, text: TextPipeline, python_env: str | None) -> str:
    outputs = [tensor_block(t.name, t.dtype, t.shape, max_batch) for t in art.inputs]
    lines = [f"# prompts -> the inputs of the encoder: {text.describe()} (as the pipeline tokenizes them)",
             f'name: "{name}"', 'backend: "python"', f"max_batch_size: {max_batch}",
             "input [\n" + tensor_block("TEXT", "TYPE_STRING", (-1, 1), max_batch) + "\n]",
             "output [\n" + ",\n".join(outputs) + "\n]",
             "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]",
             "dynamic_batching { }"]  # requests still tokenized one by one (each padded alone), in one call
    values = {"padding": text.padding, "max_length": str(text.max_length), ENV_PARAMETER: python_env}
    return "\n".join(lines + parameter_lines(values)) + "\n"


def ensemble_config(art: Any, name: str, encoder: str, tokenizer: str, max_batch: int, output_types: list[str],
                    notes: list[str]) -> str:
    """TEXT -> tokenizer -> encoder -> the encoder's outputs, under ``name``."""

    def mapping(kind: str, names: list[str]) -> str:
        return "\n".join(f'      {kind} {{ key: "{n}" value: "{n}" }}' for n in names)

    inputs = [t.name for t in art.inputs]
    outputs = [t.name for t in art.outputs]
    steps = [f'    {{\n      model_name: "{tokenizer}"\n      model_version: -1\n{mapping("input_map", ["TEXT"])}\n'
             f'{mapping("output_map", inputs)}\n    }}',
             f'    {{\n      model_name: "{encoder}"\n      model_version: -1\n{mapping("input_map", inputs)}\n'
             f'{mapping("output_map", outputs)}\n    }}']
    lines = [f"# text in, embeddings out: {tokenizer} then {encoder}"] + [f"# {n}" for n in notes] + [
        f'name: "{name}"', 'platform: "ensemble"', f"max_batch_size: {max_batch}",
        "input [\n" + tensor_block("TEXT", "TYPE_STRING", (-1, 1), max_batch) + "\n]",
        "output [\n" + ",\n".join(tensor_block(t.name, d, t.shape, max_batch) for t, d in zip(art.outputs, output_types)) + "\n]",
        "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- text


def text_pipeline(artifacts: Path, art: Any, tokenizer: Path | None) -> TextPipeline:
    """The tokenizer and the padding of the export's pipeline: a fixed sequence (the export's, or the pipeline's
    max_length) pads every prompt to it; otherwise to the longest prompt, truncated at the model's limit."""
    report = read_report(artifacts)
    if not report:
        raise ArtifactError(f"{artifacts} has no readable report.json: --text needs the export's pipeline (padding, "
                            "mask, tokenizer); use the --out folder of the main job")
    folder = tokenizer or (Path(report["model"]["tokenizer"]) if _dig(report, ("model", "tokenizer")) else None)
    if folder is None:
        raise UserError(f"the export in {artifacts} ran on random token ids (no tokenizer): pass --tokenizer DIR, the "
                        "tokenizer of the model")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...) in {folder}; pass --tokenizer DIR")
    ids = next((t for t in art.inputs if t.name == "input_ids"), None)
    if ids is None:
        raise ArtifactError(f"{artifacts}: the encoder has no input_ids input, so text cannot be fed to it")
    fixed = ids.shape[-1] if len(ids.shape) > 1 and ids.shape[-1] > 0 else None
    length = fixed or _dig(report, ("onnx", "export_options", "fixed_sequence")) or _dig(report, ("pipeline", "call", "max_length"))
    mask = any(t.name == "attention_mask" for t in art.inputs)
    if length:
        return TextPipeline(folder, "max_length", int(length), mask)
    return TextPipeline(folder, "longest", truncation_limit(folder, art), mask)


def truncation_limit(folder: Path, art: Any) -> int:
    """Where a pipeline that pads to the longest prompt truncates: sentence-transformers' max_seq_length where the
    folder has its config, else the tokenizer's model_max_length, capped by the engine profile's longest sequence."""
    limits = []
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        try:
            value = json.loads((folder / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, (int, float)) and 0 < value < 1_000_000:
            limits.append(int(value))
            break
    if art.profile and "input_ids" in art.profile:
        limits.append(int(art.profile["input_ids"][2][-1]))
    return min(limits) if limits else DEFAULT_TEXT_LENGTH


def copy_tokenizer(text: TextPipeline, dest: Path) -> None:
    """The tokenizer's files (not the model's weights) into ``dest``, checked: the copy loads offline and gives the
    same ids as the original on a prompt and the empty prompt."""
    dest.mkdir()
    for name in TOKENIZER_FILES:
        if (text.tokenizer / name).is_file():
            shutil.copy2(text.tokenizer / name, dest / name)
    try:
        from transformers import AutoTokenizer

        original, copy = (AutoTokenizer.from_pretrained(str(f), local_files_only=True) for f in (text.tokenizer, dest))
    except Exception as exc:  # a broken file, or a tokenizer needing a missing package (sentencepiece)
        raise ModelError(f"cannot load the tokenizer in {text.tokenizer}: {type(exc).__name__}: {exc}; pass --tokenizer DIR") from None
    prompts = ["A red fox curled up asleep in fresh snow.", ""]
    if original(prompts)["input_ids"] != copy(prompts)["input_ids"]:
        raise ModelError(f"the tokenizer in {text.tokenizer} needs files besides {', '.join(TOKENIZER_FILES)}: its copy "
                         "tokenizes differently; pass --tokenizer DIR with a self-contained tokenizer folder")


def model_file(name: str) -> str:
    """The model.py of a Python-backend model, as shipped in skrr_export/triton_models."""
    return (resources.files("skrr_export") / "triton_models" / name).read_text()
