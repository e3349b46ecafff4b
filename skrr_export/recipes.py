"""Recipes: per-target plan and export settings (precision, profiles, input dtype, tolerances), and the
checkpoint each expects. Shared code never branches on a model name; recipes carry that knowledge as data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError, UserError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def recipe_dirs() -> list[Path]:
    """Where recipes are looked up: ./recipes, then the recipes beside the package (source checkouts)."""
    return [d for d in (Path.cwd() / "recipes", PACKAGE_ROOT / "recipes") if d.is_dir()]


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

    def check_config(self, config: Any) -> None:
        """The model's config must have the values the recipe's plan was made for."""
        config = getattr(config, "text_config", config)
        for key, expected in self.checkpoint.get("config", {}).items():
            found = getattr(config, key, None)
            if found != expected:
                raise ModelError(
                    f"recipe {self.name} expects {key}={expected!r} ({self.checkpoint.get('repository')}), "
                    f"the model has {key}={found!r}"
                )


def available_recipes() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for root in recipe_dirs():
        for folder in sorted(root.iterdir()):
            if (folder / "recipe.json").is_file():
                found.setdefault(folder.name, folder)
    return found


def load_recipe(name: str) -> Recipe:
    folder = Path(name) if (Path(name) / "recipe.json").is_file() else available_recipes().get(name)
    if folder is None:
        raise UserError(f"no recipe '{name}'; available: {', '.join(available_recipes()) or 'none (run from the repository)'}")
    try:
        data = json.loads((folder / "recipe.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{folder / 'recipe.json'} is not JSON: {exc.msg}") from None
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
