"""The package's layers, read from its source: no import cycle, and no module imports from a layer above its own,
whether the import sits at the top of the module or inside a function (a function-level import is for a heavy or
optional dependency such as torch, never to hide a cycle). Every module has a layer: a new one is placed here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import skrr_export

ROOT = Path(skrr_export.__file__).parent
# lowest first; a module may import from its own layer and the ones before it
LAYERS = {
    "core (torch-free)": ["skrr_export", "errors", "environment", "units", "progress", "plan", "counts", "compare",
                          "recipes", "artifacts", "config"],
    "ONNX layer": ["graph", "graph.wire", "graph.read", "graph.save", "graph.weights", "graph.half_scalars",
                   "graph.arithmetic", "graph.export_passes", "graph.fusion",
                   "graph.quantized", "graph.names", "graph.passes"],
    "torch side": ["adapters", "adapters.base", "adapters.bert", "adapters.clip", "adapters.t5", "checkpoint", "model",
                   "apply", "quantize"],
    "runtimes": ["runners", "checks", "inputs", "workload", "export", "ort_fusion", "fused_copy", "ort_profile",
                 "device_memory", "polygraphy_io", "trt", "triton_models.onnx_runtime", "triton_models.tokenizer"],
    "jobs": ["stages", "backends", "pipeline", "provenance", "verify", "calibrate", "measure", "measure_report", "inspect_plan",
             "serving", "jetson", "triton_repo", "triton_server", "report"],
    "cli": ["cli"],
}


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "skrr_export"
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules ``name`` imports, anywhere in its source."""
    package = name.split(".") if path.name == "__init__.py" and name != "skrr_export" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1] if node.level > 1 else package
            target = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                full = f"{target}.{alias.name}" if target else alias.name
                found.add(full if full in known else (target or "skrr_export"))
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found |= {n.removeprefix("skrr_export.") for n in names if n.startswith("skrr_export.")}
    return (found & known) - {name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def layer_of() -> dict[str, int]:
    return {m: i for i, members in enumerate(LAYERS.values()) for m in members}


def test_every_module_has_a_layer():
    assert sorted(set(modules()) - set(layer_of())) == []


def test_no_module_imports_from_a_layer_above_its_own():
    layer, names = layer_of(), list(LAYERS)
    upward = [f"{m} ({names[layer[m]]}) imports {t} ({names[layer[t]]})"
              for m, targets in graph().items() for t in sorted(targets) if m in layer and t in layer and layer[t] > layer[m]]
    assert upward == []


def test_no_import_cycle():
    edges = graph()
    cycles = []

    def visit(node: str, path: list[str], on_path: set[str], done: set[str]) -> None:
        for nxt in sorted(edges[node]):
            if nxt in on_path:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in done:
                visit(nxt, path + [nxt], on_path | {nxt}, done)
        done.add(node)

    done: set[str] = set()
    for start in sorted(edges):
        if start not in done:
            visit(start, [start], {start}, done)
    assert cycles == []


@pytest.mark.parametrize("planted", ["counts imports workload", "quantize imports export"])
def test_a_planted_upward_import_or_cycle_is_found(planted, monkeypatch):
    """The checks above fail on the two shapes they guard against (edges added to the graph they read)."""
    source, target = planted.split(" imports ")
    real = graph()
    monkeypatch.setattr(__import__(__name__, fromlist=["graph"]), "graph", lambda: real | {source: real[source] | {target}})
    with pytest.raises(AssertionError):
        test_no_module_imports_from_a_layer_above_its_own()
    if planted == "quantize imports export":  # export imports quantize: a cycle
        with pytest.raises(AssertionError):
            test_no_import_cycle()
