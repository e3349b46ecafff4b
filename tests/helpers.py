"""Tiny encoders of every family built from configs, and padded batches for them."""

from __future__ import annotations

import re

import torch

NUM_BLOCKS = 3


def tiny_config(family: str):
    from transformers import BertConfig, CLIPTextConfig, T5Config, UMT5Config

    t5 = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=NUM_BLOCKS, num_heads=4,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
              relative_attention_num_buckets=8, relative_attention_max_distance=16)
    configs = {
        "t5": lambda: T5Config(**t5),
        "umt5": lambda: UMT5Config(**t5),
        "bert": lambda: BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=NUM_BLOCKS, num_attention_heads=4,
                                   intermediate_size=48, max_position_embeddings=64),
        "clip": lambda: CLIPTextConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=NUM_BLOCKS,
                                       num_attention_heads=4, max_position_embeddings=64, bos_token_id=3, eos_token_id=4,
                                       pad_token_id=1),
        "clip-projection": lambda: CLIPTextConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                                                  num_hidden_layers=NUM_BLOCKS, num_attention_heads=4,
                                                  max_position_embeddings=64, bos_token_id=3, eos_token_id=4,
                                                  pad_token_id=1, projection_dim=16,
                                                  architectures=["CLIPTextModelWithProjection"]),
    }
    config = configs[family]()
    config._attn_implementation = "eager"
    return config


def build_reference_model(family: str, seed: int = 0):
    """The Hugging Face model itself, fully in memory (the independent reference)."""
    from transformers import BertModel, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel, UMT5EncoderModel

    torch.manual_seed(seed)
    config = tiny_config(family)
    cls = {
        "t5": T5EncoderModel,
        "umt5": UMT5EncoderModel,
        "bert": lambda c: BertModel(c, add_pooling_layer=False),
        "clip": CLIPTextModel,
        "clip-projection": CLIPTextModelWithProjection,
    }[family]
    model = cls(config).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0; perturb so that every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


FAMILIES = ("t5", "umt5", "bert", "clip", "clip-projection")


def plan_family(family: str) -> str:
    return family.split("-")[0]


def ids_and_mask(vocab: int = 96, eos: int = 4, seed: int = 0):
    """A padded batch: lengths 9, 6, 3, every real sequence ending in eos."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 9), generator=g)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, n in enumerate((9, 6, 3)):
        mask[row, :n] = 1
        ids[row, n - 1] = eos
        ids[row, n:] = eos
    return ids, mask


def plant_wiring_error(path, every: bool = False) -> str:
    """Rewire an exported graph as a wrong re-use would: the last MatMul that reads a re-used weight reads the same
    weight of another sub-block instead (a re-used slot pointing at the wrong sub-block). ``every``: do so for every
    re-used weight (the slot's query, key, value, output and FFN projections), not only the first found (tiny
    random models barely notice a swapped query: their attention is near uniform). Returns what was changed."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    transposed = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in weights}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in transposed:
            readers.setdefault(node.input[1], []).append(node)
    changed = []
    for value, nodes in readers.items():
        if len(nodes) < 2:
            continue
        weight = transposed[value]
        role = re.sub(r"\.\d+\.", ".*.", weight, count=1)  # encoder.block.<b>.<role>: the same role elsewhere first
        same_shape = [v for v, w in transposed.items() if w != weight and weights[w] == weights[weight]]
        other = next((v for v in same_shape if re.sub(r"\.\d+\.", ".*.", transposed[v], count=1) == role), None)
        other = other or next(iter(same_shape), None)
        if other is not None:
            nodes[-1].input[1] = other
            changed.append(f"{nodes[-1].name} reads {transposed[other]} instead of {weight}")
            if not every:
                break
    assert changed, "no re-used weight with a same-shape sibling to rewire"
    onnx.save(model, str(path))
    return "; ".join(changed)
