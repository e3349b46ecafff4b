"""The export's own graph passes (onnx_ir, torch-free), in the order ``export.graph_passes`` runs them:
``KeepWeightsOptimize`` (the exporter's optimizer, minus the two things that break "one named weight per
parameter"), ``RmsNormAsDiv``, ``MergeEqualConstants``, ``StripDebugMetadata``."""

from __future__ import annotations

import copy
from typing import Any

import onnx_ir as ir

# The largest tensor constant folding may write into the graph (elements). Larger results stay computed:
# with a fixed sequence, T5's [S, S] position buckets stay a few nodes instead of an S*S*8-byte table
# (benchmarks/README.md, "T5 positions at a fixed sequence").
FOLDED_CONSTANT_LIMIT = 1024


class KeepWeightsOptimize(ir.passes.InPlacePass):
    """The exporter's optimizer (onnxscript's ``optimize_ir``: inline, fold constants, rewrite, lift, CSE) with
    two changes. A node that reads a weight is never folded: the weight stays one initializer under its
    parameter's name, which refit and weight-stripped engines look up (folding wrote a transposed copy per call
    site of a re-used weight, and folded T5's position table into a constant). And nothing is merged by value:
    two parameters that hold equal numbers stay two weights (onnx_ir's DeduplicateInitializersPass merged them)."""

    def __init__(self, weights: set[str]):
        super().__init__()
        self.weights = weights

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import onnx_ir.passes.common as common
        from onnxscript import optimizer, rewriter

        def should_fold(node: Any) -> bool | None:
            return False if any(v is not None and v.name in self.weights for v in node.inputs) else None

        # A private copy of the default rules: the shared ones keep the last graph they matched (their matchers'
        # _graph), which would keep every weight of the module alive for the rest of the run.
        rules = copy.deepcopy(getattr(rewriter, "_DEFAULT_REWRITE_RULES", None))
        optimizer.inline(model)
        for _ in range(2):
            optimizer.fold_constants(model, onnx_shape_inference=True, output_size_limit=FOLDED_CONSTANT_LIMIT,
                                     should_fold=should_fold)
            rewriter.rewrite(model, rules)
        common.RemoveUnusedNodesPass()(model)
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        common.CommonSubexpressionEliminationPass()(model)  # one Transpose per re-used weight, not one per slot
        common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=True)


class RmsNormAsDiv(ir.passes.InPlacePass):
    """T5's RMSNorm exports as ``x * Reciprocal(Sqrt(mean(x^2) + eps))``, which ONNX Runtime's
    SimplifiedLayerNormFusion does not match (it looks for ``x / Sqrt(...)``): every norm then runs as six or
    more nodes. Rewritten as a Div (one rounding instead of two), all of them fuse (measured on ONNX Runtime
    1.31: 7 of 7 SimplifiedLayerNormalization nodes on a 3-block T5, 0 before)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.rewriter import pattern

        def target(op: Any, x: Any, v: Any) -> Any:
            return op.Mul(x, op.Reciprocal(op.Sqrt(v)))

        def replacement(op: Any, x: Any, v: Any) -> Any:
            return op.Div(x, op.Sqrt(v))

        rules = pattern.RewriteRuleSet([pattern.RewriteRule(target, replacement, name="RMSNormAsDiv")], commute=True)
        return ir.passes.PassResult(model, modified=bool(rules.apply_to_model(model)))


class StripDebugMetadata(ir.passes.InPlacePass):
    """Drop the exporter's per-node debug metadata (Python stack traces with this machine's paths and line
    numbers, FX node dumps): two-thirds of a small graph's bytes, and the reason one plan exported from two
    checkouts, or before and after moving a line of code, gave different files."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph.all_nodes():
            modified |= bool(node.metadata_props)
            node.metadata_props.clear()
        return ir.passes.PassResult(model, modified=modified)


class MergeEqualConstants(ir.passes.InPlacePass):
    """Merge graph constants (not weights) that hold the same values: the lifted scalars and shape vectors."""

    def __init__(self, weights: set[str]):
        super().__init__()
        self.weights = weights

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import hashlib

        import numpy as np

        merged = 0
        seen: dict[tuple[Any, ...], Any] = {}
        for name, value in tuple(model.graph.initializers.items()):
            if name in self.weights or value.const_value is None or value.is_graph_output():
                continue
            tensor = value.const_value  # its declared shape: a folded tensor may hold a numpy array of another rank
            digest = hashlib.sha256(np.ascontiguousarray(tensor.numpy()).tobytes()).hexdigest()
            key = (str(tensor.dtype), tuple(tensor.shape), digest)
            if key in seen:
                value.replace_all_uses_with(seen[key])
                model.graph.initializers.pop(name)
                merged += 1
            else:
                seen[key] = value
        return ir.passes.PassResult(model, modified=bool(merged))
