"""Every graph rewrite of the package, by name: each an onnx_ir pass (``onnx_ir.passes.PassBase``: called on a model,
it returns ``PassResult(model, modified)``), with one line on what it does. Callers construct a pass by its name
(``PASSES[name].cls(...)``, with the arguments its class takes) or run one that takes none (``run``)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from . import arithmetic, export_passes, fusion, names, quantized


@dataclass(frozen=True)
class Registered:
    cls: type[ir.passes.PassBase]
    description: str


PASSES: dict[str, Registered] = {
    "keep-weights-optimize": Registered(export_passes.KeepWeightsOptimize, "the exporter's optimizer (inline, fold, "
                                        "rewrite, lift, CSE) that never folds a weight's reader nor merges weights"),
    "rms-norm-as-div": Registered(export_passes.RmsNormAsDiv, "T5's x * Reciprocal(Sqrt(...)) as x / Sqrt(...), which "
                                  "ONNX Runtime fuses into SimplifiedLayerNormalization"),
    "merge-equal-constants": Registered(export_passes.MergeEqualConstants, "graph constants (never weights) holding "
                                        "equal values become one"),
    "strip-debug-metadata": Registered(export_passes.StripDebugMetadata, "drop the exporter's per-node stack traces "
                                       "and FX dumps (files identical across checkouts)"),
    "checkpoint-names": Registered(names.CheckpointNames, "every weight named as the checkpoint names it, not by the "
                                   "applied module's path (kept.6.…), in place and in order"),
    "store-quantized": Registered(quantized.StoreQuantized, "each quantized weight stored as int8/int4 integers and "
                                  "scales feeding one DequantizeLinear, q/k/v and gate/up joined"),
    "dequantize-per-reader": Registered(arithmetic.DequantizePerReader, "each stored DequantizeLinear becomes one per "
                                        "reader, in fp32, waiting for that reader's activation"),
    "fp32-arithmetic": Registered(arithmetic.Fp32Arithmetic, "a half-precision graph computes in fp32 on its own "
                                  "weights, each widened just before the node that reads it"),
    "half-emulation": Registered(arithmetic.HalfEmulation, "fp32 arithmetic, each half-precision node output rounded "
                                 "back to its precision: a runtime with half kernels, emulated"),
    "ort-fuse-attention": Registered(fusion.FuseAttention, "each attention the families export becomes one "
                                     "com.microsoft MultiHeadAttention (Q, K, V unpacked)"),
    "ort-fuse-half-norms": Registered(fusion.FuseHalfNorms, "T5's fp32-computed RMSNorm in a half graph becomes one "
                                      "SimplifiedLayerNormalization between Casts"),
    "ort-fuse-tanh-gelus": Registered(fusion.FuseTanhGelus, "T5's tanh GELU becomes com.microsoft FastGelu (exact "
                                      "constants)"),
    "ort-transformer-fusions": Registered(fusion.OrtTransformerFusions, "ONNX Runtime's transformer optimizer (skip "
                                          "and layer norms, GELU), without its attention fusion and constant folding"),
}


def run(model: ir.Model, name: str) -> ir.passes.PassResult:
    """The registered pass ``name`` (one that takes no arguments) applied to ``model``."""
    return PASSES[name].cls()(model)
