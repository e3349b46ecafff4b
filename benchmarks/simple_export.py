"""The anchor to beat (issue 5): the simple way to export a Skrr plan of a T5 encoder.

from_pretrained (lazy, memory-mapped) in the export dtype, skipped sub-layers replaced by pass-throughs,
re-used ones pointed at the kept module, torch.onnx.export(dynamo=True, external_data=True) under no_grad.
It is here to be measured side by side with skrr-export, not to be used: it loses T5's position bias when
block 0's attention is skipped and stores whatever the exporter stores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn


class PassAttention(nn.Module):
    def forward(self, hidden_states, attention_mask=None, position_bias=None, **kwargs):
        return hidden_states, position_bias, None


class PassFeedForward(nn.Module):
    def forward(self, hidden_states):
        return hidden_states


def main() -> None:
    from transformers import T5EncoderModel

    p = argparse.ArgumentParser()
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    plan = json.loads(args.plan.read_text())
    model = T5EncoderModel.from_pretrained(args.model, dtype=torch.bfloat16, local_files_only=True).eval()
    blocks = model.encoder.block
    layers = {2 * b + k: blocks[b].layer[k] for b in range(len(blocks)) for k in (0, 1)}
    reuse = {int(k): v for k, v in plan.get("reuse", {}).items()}
    for slot in plan.get("skip", []):
        b, k = divmod(slot, 2)
        blocks[b].layer[k] = layers[reuse[slot]] if slot in reuse else (PassAttention() if k == 0 else PassFeedForward())
    args.out.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(2, 16, dtype=torch.long)
    with torch.no_grad():
        program = torch.onnx.export(model, (ids, torch.ones_like(ids)), dynamo=True, input_names=["input_ids", "attention_mask"],
                                    dynamic_shapes=({0: "batch", 1: "sequence"}, {0: "batch", 1: "sequence"}))
    program.save(str(args.out / "model.onnx"), external_data=True)


if __name__ == "__main__":
    main()
