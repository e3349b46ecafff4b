"""Checkpoint names in the exported file: what a person reads in Netron, and what TensorRT's refit looks weights up by.

The exporter names each initializer after the applied module's path to it (``kept.6.layer.SelfAttention.q.weight``,
``stem.embed.weight``), names no checkpoint holds. ``CheckpointNames`` renames them; the convention of a file:

- a parameter (or buffer) is named as in the checkpoint: ``encoder.block.3.layer.0.SelfAttention.q.weight``; a weight
  tied in the checkpoint (T5's ``shared.weight`` and ``encoder.embed_tokens.weight``) by its first name there;
- a quantized weight (``graph.quantized.StoreQuantized``, which runs after this pass) is two tensors,
  ``<name>.quantized`` (its integers) and ``<name>.scale`` (its scales); weights stored joined along the output width
  (q, k and v; T5's wi_0 and wi_1) join their names with '+', in the order they are joined:
  ``<q name>+<k name>+<v name>.quantized``;
- everything else is the exporter's (``val_17``) or named after the weight it serves
  (``<name>.0.widths``, the split widths of a joined weight's first slot).
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx_ir as ir

from ..errors import InvariantError


class CheckpointNames(ir.passes.InPlacePass):
    """Rename the main graph's initializers by ``names`` (the module's name -> the checkpoint's), in place and in
    order; an initializer not in ``names`` keeps its name. Two initializers that would share a name are one
    parameter stored twice: an InvariantError (a bug of this tool), and nothing is renamed."""

    def __init__(self, names: Mapping[str, str]):
        super().__init__()
        self.names = names

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        initializers = model.graph.initializers
        values = list(initializers.values())
        renamed = [self.names.get(v.name, v.name) for v in values if v.name is not None]
        seen: dict[str, str] = {}
        for value, new in zip(values, renamed):
            if new in seen:
                raise InvariantError(f"the exported graph stores {new} twice (as {seen[new]} and {value.name})")
            seen[new] = str(value.name)
        modified = any(v.name != new for v, new in zip(values, renamed))
        if modified:  # out and back in the same order: renaming in place would move each renamed one to the end
            for value in values:
                initializers.pop(str(value.name))
            for value, new in zip(values, renamed):
                value.name = new
                initializers.add(value)
        return ir.passes.PassResult(model, modified=modified)
