"""Independent references: plain loops over the Hugging Face submodules, written apart from the package."""

from __future__ import annotations

import torch


def _source(skip, reuse, slot):
    if slot in reuse:
        return reuse[slot]
    return None if slot in skip else slot


def _additive(keep: torch.Tensor, dtype) -> torch.Tensor:
    return (1.0 - keep.to(dtype)) * torch.finfo(dtype).min


def reference_forward(family: str, model, num_blocks: int, skip, reuse, ids, mask) -> dict[str, torch.Tensor]:
    skip, reuse = set(skip), dict(reuse)
    slots = [(s, _source(skip, reuse, s)) for s in range(2 * num_blocks)]
    slots = [(s, src) for s, src in slots if src is not None]
    with torch.no_grad():
        if family in ("t5", "umt5"):
            return _t5(family, model, slots, ids, mask)
        if family == "bert":
            return _bert(model, slots, ids, mask)
        return _clip(model, slots, ids, mask, num_blocks)


def _t5(family, model, slots, ids, mask):
    h = model.shared(ids)
    ext = _additive(mask[:, None, None, :], h.dtype)
    blocks = model.encoder.block
    bias = blocks[0].layer[0].SelfAttention.compute_bias(ids.shape[1], ids.shape[1]) if family == "t5" else None
    for _, src in slots:
        layer = blocks[src // 2].layer[0 if src % 2 == 0 else -1]
        if src % 2:
            h = layer(h)
        elif family == "t5":
            h = layer(h, attention_mask=ext, position_bias=bias)[0]
        else:
            h = layer(h, attention_mask=ext)[0]
    return {"last_hidden_state": model.encoder.final_layer_norm(h)}


def _bert(model, slots, ids, mask):
    h = model.embeddings(input_ids=ids)
    ext = _additive(mask[:, None, None, :], h.dtype)
    for _, src in slots:
        layer = model.encoder.layer[src // 2]
        if src % 2 == 0:
            h = layer.attention(h, attention_mask=ext)[0]
        else:
            h = layer.output(layer.intermediate(h), h)
    return {"last_hidden_state": h}


def _clip(model, slots, ids, mask, num_blocks):
    tm = getattr(model, "text_model", model)
    h = tm.embeddings(input_ids=ids)
    seq = ids.shape[1]
    causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    ext = _additive(causal[None, None] & mask.bool()[:, None, None, :], h.dtype)
    penultimate = h
    for slot, src in slots:
        layer = tm.encoder.layers[src // 2]
        if src % 2 == 0:
            h = h + layer.self_attn(hidden_states=layer.layer_norm1(h), attention_mask=ext)[0]
        else:
            h = h + layer.mlp(layer.layer_norm2(h))
        if slot < 2 * (num_blocks - 1):
            penultimate = h
    last = tm.final_layer_norm(h)
    eos = (ids == tm.config.eos_token_id).int().argmax(-1)
    pooled = last[torch.arange(ids.shape[0]), eos]
    out = {"last_hidden_state": last, "penultimate_hidden_state": penultimate}
    if hasattr(model, "text_projection"):
        out["text_embeds"] = model.text_projection(pooled)
    else:
        out["pooler_output"] = pooled
    return out
