"""Session fixtures: tiny checkpoints of every family written to disk; the real MiniLM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .helpers import FAMILIES, build_reference_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one thread per worker, N workers share the cores
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    """family -> (reference HF model, folder with config.json + model.safetensors)."""
    out = {}
    for family in FAMILIES:
        model = build_reference_model(family)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        out[family] = (model, folder)
    return out


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    from skrr_export.model import default_model_path

    return default_model_path()
