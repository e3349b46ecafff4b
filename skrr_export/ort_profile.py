"""ort_profile: what an ONNX Runtime profile says about a run: which provider ran each node, and which nodes left the
CUDA provider or copied between host and device on the hot path."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_profile(profile: Path | None) -> list[dict[str, Any]]:
    """The events of an ONNX Runtime profile (none without one); the file is removed once read."""
    if profile is None or not profile.is_file():
        return []
    events = json.loads(profile.read_text())
    profile.unlink()
    return events


def node_placement(profile: Path | None) -> dict[str, Any]:
    """From an ONNX Runtime profile: nodes per execution provider, nodes per op type (fused norms, the casts of
    fp32 islands), the op types left off CUDA, memcpy nodes."""
    events = read_profile(profile)
    return placement(events) if events else {}


def _kernels(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each node a profile saw run -> its arguments (provider, op_name, output_type_shape, ...); a node runs once
    per profiled run, so several runs count it once."""
    return {e["name"]: e.get("args") or {} for e in events
            if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")}


def placement(events: list[dict[str, Any]]) -> dict[str, Any]:
    placed = {name: (a.get("provider", "?"), a.get("op_name", "?")) for name, a in _kernels(events).items()}
    providers: dict[str, int] = {}
    ops: dict[str, int] = {}
    off_cuda: dict[str, int] = {}
    for provider, op in placed.values():
        providers[provider] = providers.get(provider, 0) + 1
        ops[op] = ops.get(op, 0) + 1
        if provider != "CUDAExecutionProvider":
            off_cuda[op] = off_cuda.get(op, 0) + 1
    memcpy = sum(op.startswith("Memcpy") for _, op in placed.values())
    return {"nodes_per_provider": providers, "ops": ops, "ops_not_on_cuda": off_cuda, "memcpy_nodes": memcpy}


# A node on the hot path computes on the batch's data every forward: its outputs hold more elements than a shape
# vector (what ONNX Runtime rightly leaves on the CPU: Shape, Gather of a dimension, Concat of a few sizes).
SHAPE_VECTOR_ELEMENTS = 8


def hot_path(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The nodes of a profiled run that left the CUDA provider or copy between host and device (Memcpy*), and whose
    outputs hold more than ``SHAPE_VECTOR_ELEMENTS`` elements: each costs a CPU kernel or a transfer every forward.
    One entry per op and provider: how many such nodes, the largest output, one node's name."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for name, a in _kernels(events).items():
        op, provider = a.get("op_name", "?"), a.get("provider", "?")
        if provider == "CUDAExecutionProvider" and not op.startswith("Memcpy"):
            continue
        elements = sum(math.prod(dims) for entry in a.get("output_type_shape") or [] for dims in entry.values())
        if elements > SHAPE_VECTOR_ELEMENTS:
            entry = found.setdefault((op, provider), {"op": op, "provider": provider, "nodes": 0,
                                                      "max_output_elements": 0, "example": name.removesuffix("_kernel_time")})
            entry["nodes"] += 1
            entry["max_output_elements"] = max(entry["max_output_elements"], elements)
    return sorted(found.values(), key=lambda e: -e["nodes"])
