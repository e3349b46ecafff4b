"""Calibration memory: the plan's working set bounds what the search really holds (live tensor bytes, measured
op by op), the batch shrinks to fit --max-memory, and T5-v1.1-XXL at the paper's scale fits one 80 GB GPU."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from skrr_export.apply import plan_cost
from skrr_export.calibrate import Scorer, plan_memory, schedule_of, shapes_of, working_set
from skrr_export.errors import UserError
from skrr_export.model import DTYPES, ModelSource, build_meta, load_config, load_encoder
from skrr_export.plan import Plan

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created under the mode and still referenced (views share their storage)."""

    def __init__(self, resident: set[int]):
        super().__init__()
        self.resident = resident  # storages made before (weights, references): not counted
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors referencing it]
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.resident:
            return
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        self.live[key][1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]


@pytest.mark.parametrize("family, width, precision", [("t5", 1, "fp32"), ("t5", 8, "bf16"), ("bert", 1, "fp32")])
def test_working_set_bounds_the_measured_peak(family, width, precision, tmp_path):
    """One scoring pass over a batch of 4 x 64 tokens: the tensors alive at the peak are within the plan's cached
    states + activations, and the plan is not loose by more than 3x."""
    from transformers import BertConfig, BertModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    if family == "t5":
        model = T5EncoderModel(T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=256, num_layers=3, num_heads=4,
                                        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False))
    else:
        model = BertModel(BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=256, max_position_embeddings=64), add_pooling_layer=False)
    model.save_pretrained(tmp_path)
    enc = load_encoder(ModelSource(tmp_path), Plan.dense(family, 3), precision)
    batch, seq = 4, 64
    ids = torch.randint(5, 64, (batch, seq))
    scorer = Scorer(enc, [(ids, torch.ones_like(ids))], (ids[:1, :1], torch.ones(1, 1, dtype=torch.long)), None, "cpu", width)
    resident = {t.untyped_storage().data_ptr() for t in [*enc.model.parameters(), *enc.model.buffers()]}
    resident |= {r.untyped_storage().data_ptr() for f in scorer.feeds for r in f.reference}
    n = scorer.num_slots
    with torch.no_grad(), LiveTensorBytes(resident) as live:
        scorer.score(schedule_of(n, ()), [(j, None) for j in range(n)])
    states, activations = working_set(shapes_of(enc), batch, seq, width)
    assert live.peak <= states + activations, (live.peak, states, activations)
    assert states + activations <= 3 * live.peak, (live.peak, states, activations)


def xxl_meta():
    meta = build_meta(load_config(ModelSource(RECIPES / "t5-v1_1-xxl" / "config.json")))
    meta.dtype = DTYPES["bf16"]
    return meta


def test_t5_xxl_at_the_papers_scale_fits_one_80gb_gpu():
    """1,000 prompts of 256 tokens, beam 3, bf16, candidates stacked by 8 as on CUDA: the plan's arithmetic on the
    meta device, against the numbers worked out by hand from the T5-v1.1-XXL config (DESIGN.md section 1)."""
    meta = xxl_meta()
    weights = plan_cost(meta, Plan.dense("t5", 24)).kept_weight_bytes
    assert weights == 4_762_310_656 * 2
    shapes = shapes_of(meta)
    assert (shapes.num_slots, shapes.hidden, shapes.heads, shapes.ffn, shapes.element) == (48, 4096, 64, 10240, 2)
    tokens = 1000 * 256 + 1  # and the empty prompt's one token
    budget = 80 * 10**9
    plan = plan_memory(shapes, weights, tokens, 256, 16, 8, budget, "cuda")
    assert plan.batch == 16 and plan.total <= budget
    assert plan.references == tokens * 4096 * 4  # fp32 reference outputs at every real token: 4.2 GB
    state = 16 * 256 * 4096 * 2  # one batch's hidden state in bf16: 33.6 MB
    assert plan.states == (48 + 1) * state + 3 * 8 * state  # one beam's states at every slot + stacked candidates
    scores = 8 * 16 * 64 * 256 * 256  # attention scores of 8 stacked candidates (elements)
    assert plan.activations >= scores * (2 + 2 + 4 + 2), "bf16 scores, bias + mask, fp32 softmax, bf16 probabilities"
    assert plan.total < 30 * 10**9, "weights, references and one batch in flight: far below 80 GB"
    # What caching every slot's state of every beam for all prompts would need (the old design): ~290 GB.
    assert 3 * (48 + 1) * 1000 * 256 * 4096 * 2 > 300 * 10**9


def test_the_batch_shrinks_to_fit_and_a_budget_below_the_model_is_refused():
    meta = xxl_meta()
    shapes = shapes_of(meta)
    weights = plan_cost(meta, Plan.dense("t5", 24)).kept_weight_bytes
    tokens = 1000 * 256 + 1
    roomy = plan_memory(shapes, weights, tokens, 256, 16, 8, 80 * 10**9, "cuda")
    budget = roomy.weights + roomy.references + (roomy.states + roomy.activations) // 3
    tight = plan_memory(shapes, weights, tokens, 256, 16, 8, budget, "cuda")
    assert 1 <= tight.batch < 16 and tight.total <= budget
    assert roomy.weights + roomy.references + sum(working_set(shapes, tight.batch + 1, 256, 8)) > budget, "the largest batch that fits"
    with pytest.raises(UserError, match=r"needs at least .* GiB on cuda .* budget is 9\.00 GiB"):
        plan_memory(shapes, weights, tokens, 256, 16, 8, 9 * 2**30, "cuda")
