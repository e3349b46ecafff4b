"""The wheel: it carries the calibration prompts and every recipe, and runs from outside the repository.

(.ci/run also installs it into a clean virtual environment and runs the main job and a calibration.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built offline from a copy of the sources (the checkout's build/ folder is left alone)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("skrr_export", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (path,) = dist.glob("skrr_export-*.whl")
    return path


def test_the_wheel_carries_the_prompts_and_every_recipe_byte_for_byte(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert z.read("skrr_export/data/calibration_prompts.txt") == (ROOT / "skrr_export/data/calibration_prompts.txt").read_bytes()
        assert z.read("skrr_export/plan.schema.json") == (ROOT / "skrr_export/plan.schema.json").read_bytes()
        shipped = sorted(p.relative_to(ROOT / "recipes").as_posix() for p in (ROOT / "recipes").rglob("*")
                         if p.is_file() and p.suffix in (".json", ".md"))
        assert "t5-v1_1-xxl/config.json" in shipped and "minilm/recipe.json" in shipped
        for name in shipped:
            assert z.read(f"skrr_export/recipe_data/{name}") == (ROOT / "recipes" / name).read_bytes(), name
        assert not any(n.startswith(("recipes/", "tests/")) for n in names)


def test_the_unpacked_wheel_reads_its_own_recipes_and_prompts_from_any_folder(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = os.environ | {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    code = ("import skrr_export, json\n"
            "from skrr_export.recipes import recipe_root, load_recipe\n"
            "from skrr_export.calibrate import read_prompts\n"
            "print(json.dumps({'package': skrr_export.__file__, 'root': str(recipe_root()),\n"
            "  'config': str(load_recipe('pixart-sigma-41.9').config_folder), 'prompts': len(read_prompts(None, None))}))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    where = json.loads(done.stdout)
    assert Path(where["package"]).is_relative_to(site)
    assert where["root"] == str(site / "skrr_export" / "recipe_data")
    assert where["config"] == str(site / "skrr_export" / "recipe_data" / "t5-v1_1-xxl")
    assert where["prompts"] == 512
    done = subprocess.run([sys.executable, "-m", "skrr_export.cli", "inspect", "--recipe", "pixart-sigma-41.9", "--json"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert round(json.loads(done.stdout)["sparsity"] * 100, 2) == 41.92
