"""Applying a plan: an unrolled module that runs the plan slot by slot with shared sub-block weights."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters.base import MASK, without_mask
from .counts import PlanCost
from .errors import InvariantError
from .model import Encoder, check_plan_fits, target_dtype
from .plan import Plan
from .progress import each


class SkrrEncoder(nn.Module):
    """stem -> the plan's schedule of sub-blocks -> head.

    A re-used sub-block is the *same* module object at every slot it runs in, so its parameters exist once.
    """

    def __init__(self, enc: Encoder, plan: Plan, attention_mask: bool = True):
        super().__init__()
        self.stem = enc.stem
        sources = sorted({src for _, src in plan.schedule()})
        self.kept = nn.ModuleDict({str(i): enc.sub_blocks[i] for i in sources})
        self.schedule = plan.schedule()
        self.head = enc.head
        self.penultimate_before = penultimate_boundary(slot for slot, _ in self.schedule)
        self.inputs = enc.adapter.inputs if attention_mask else without_mask(enc.adapter.inputs)
        self.input_names = tuple(i.name for i in self.inputs)
        self.output_names = enc.adapter.output_names(enc.config)
        # id of a parameter or buffer -> its names in the checkpoint, first first (weights tied in the checkpoint, as
        # T5's shared.weight and encoder.embed_tokens.weight, go by several): what a person reads (``checkpoint_name``)
        self.checkpoint_names: dict[int, tuple[str, ...]] = {}
        named = (*enc.model.named_parameters(remove_duplicate=False), *enc.model.named_buffers(remove_duplicate=False))
        for n, t in named:
            self.checkpoint_names[id(t)] = (*self.checkpoint_names.get(id(t), ()), n)

    def checkpoint_name(self, name: str) -> str:
        """A parameter's (or buffer's) name in the checkpoint (``encoder.block.3.layer.0.SelfAttention.q.weight``) for
        its name in this module (``kept.6.layer.SelfAttention.q.weight``, ``stem.…``): the file, reports, inspect and
        errors use the former; a tied weight's first."""
        return self.checkpoint_aliases(name)[0]

    def checkpoint_aliases(self, name: str) -> tuple[str, ...]:
        """Every name the checkpoint gives the parameter or buffer this module calls ``name``, first first."""
        owner, _, attr = name.rpartition(".")
        return self.checkpoint_names.get(id(getattr(self.get_submodule(owner), attr)), (name,))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *optional: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``optional``: the family's optional inputs, in the order it declares them (BERT's token_type_ids)."""
        return self.run(self.start(input_ids, attention_mask, *optional))

    def run(self, state: Running) -> tuple[torch.Tensor, ...]:
        for slot, src in self.schedule:
            self.step(state, slot, self.kept[str(src)])
        return self.finish(state)

    def start(self, *inputs: torch.Tensor | None) -> Running:
        """The stem on this module's inputs, in ``input_names`` order; an attention_mask of None (or none declared)
        means no mask: every position attends to every other, as SD3 and FLUX run T5."""
        named = dict(zip(self.input_names, inputs))
        optional = [named[i.name] for i in self.inputs if i.optional and i.name in named]
        hidden, ctx = self.stem(named["input_ids"], named.get(MASK), *optional)
        return Running(hidden, hidden, ctx)

    def args_of(self, feed: Mapping[str, Any], device: str | torch.device = "cpu") -> list[torch.Tensor]:
        """A numpy feed as this module's positional inputs."""
        return [torch.from_numpy(feed[name]).to(device) for name in self.input_names]

    def step(self, state: Running, slot: int, sub_block: nn.Module, penultimate_before: int | None = None) -> None:
        """Run ``sub_block`` at ``slot``: the one rule for how a slot updates the hidden states. ``penultimate_before``:
        the boundary of the schedule being run when it is not this module's (calibration's candidates)."""
        state.hidden = sub_block(state.hidden, state.ctx)
        if slot < (self.penultimate_before if penultimate_before is None else penultimate_before):
            state.penultimate = state.hidden

    def finish(self, state: Running) -> tuple[torch.Tensor, ...]:
        return self.head(state.hidden, state.penultimate, state.ctx)


class UnmaskedSkrrEncoder(SkrrEncoder):
    """The plan as pipelines that run the encoder without a mask call it (SD3's and FLUX's T5): it takes input_ids
    (and the family's optional inputs) only, so the exported graph has no mask input and no mask path."""

    def __init__(self, enc: Encoder, plan: Plan):
        super().__init__(enc, plan, attention_mask=False)

    def forward(self, input_ids: torch.Tensor, *optional: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return self.run(self.start(input_ids, *optional))


def penultimate_boundary(executed: Iterable[int]) -> int:
    """The first slot of the last block that executes any slot (``executed``: the slots that run).

    The penultimate layer of a pruned model (SD3 reads CLIP's ``hidden_states[-2]``) is the hidden state entering that
    block: what Hugging Face's ``hidden_states`` tuple gives at index -2 for the model with its fully skipped blocks
    removed and its other skipped sub-blocks made identities, i.e. the output of the last-but-one block that still
    runs something (the embeddings when only one block does). Dense: the output of block N-2, as Hugging Face's."""
    return 2 * (max(executed) // 2)


@dataclass
class Running:
    """One batch on its way through the schedule: hidden states, the input of the last block that runs (the
    penultimate layer, see ``penultimate_boundary``) and what the stem computed once."""

    hidden: torch.Tensor
    penultimate: torch.Tensor
    ctx: Any


def unique_parameter_bytes(module: nn.Module) -> int:
    """Bytes of distinct parameter storages: a tensor shared by several slots counts once."""
    seen: dict[tuple[int, int], int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        seen[_storage(p)] = p.numel() * p.element_size()
    return sum(seen.values())


def stored_names(module: nn.Module) -> dict[str, str]:
    """Every name a parameter or buffer of ``module`` goes by -> the name its export stores it under: the checkpoint's
    (``SkrrEncoder.checkpoint_name``), one per storage (aliases of a re-used sub-block's weights share it). Any other
    module is its own checkpoint."""
    name = module.checkpoint_name if isinstance(module, SkrrEncoder) else str
    first: dict[tuple[int, int], str] = {}
    stored = {n: first.setdefault(_storage(p), name(n)) for n, p in module.named_parameters(remove_duplicate=False)}
    return stored | {n: name(n) for n, _ in module.named_buffers(remove_duplicate=False)}


def checkpoint_parameters(module: nn.Module) -> dict[str, tuple[str, nn.Parameter]]:
    """Every name the checkpoint gives a parameter of ``module`` -> (the name its export stores it under, the
    parameter). Weights tied in the checkpoint go by several names and are stored under the first: another of
    them in an exported file is that parameter stored twice."""
    aliases = module.checkpoint_aliases if isinstance(module, SkrrEncoder) else lambda n: (n,)
    stored = stored_names(module)
    return {alias: (stored[n], p) for n, p in module.named_parameters(remove_duplicate=False) for alias in aliases(n)}


def _storage(p: torch.Tensor) -> tuple[int, int]:
    return (p.untyped_storage().data_ptr(), int(p.storage_offset()))


def _param_ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def sub_block_parameters(enc: Encoder) -> list[list[tuple[str, nn.Parameter]]]:
    """Each sub-block's own parameters (named as in the model), excluding the always-kept stem and head."""
    always = _param_ids(enc.stem) | _param_ids(enc.head)
    names = {id(p): n for n, p in enc.model.named_parameters()}
    return [
        [(names[id(p)], p) for p in block.parameters() if id(p) not in always]
        for block in enc.sub_blocks
    ]


def plan_cost(enc: Encoder, plan: Plan) -> PlanCost:
    check_plan_fits(plan, enc)
    per_block = sub_block_parameters(enc)
    kept_slots = set(plan.kept)
    kept_ids = {id(p) for i in kept_slots for _, p in per_block[i]} | _param_ids(enc.stem) | _param_ids(enc.head)
    total: dict[str, int] = {}
    kept: dict[str, int] = {}
    total_params = kept_params = 0
    for name, p in enc.model.named_parameters():
        dtype = str(target_dtype(enc, name)).removeprefix("torch.")
        nbytes = p.numel() * torch.empty((), dtype=target_dtype(enc, name)).element_size()
        total[dtype] = total.get(dtype, 0) + nbytes
        total_params += p.numel()
        if id(p) in kept_ids:
            kept[dtype] = kept.get(dtype, 0) + nbytes
            kept_params += p.numel()
    sizes = [sum(p.numel() for _, p in block) for block in per_block]
    executed = plan.schedule()
    return PlanCost(
        total_params=total_params,
        kept_params=kept_params,
        total_bytes=total,
        kept_bytes=kept,
        executed_slots=len(executed),
        num_slots=plan.num_slots,
        compute_fraction=sum(sizes[src] for _, src in executed) / sum(sizes),
    )


def encoder_for(enc: Encoder, plan: Plan, attention_mask: bool = True) -> SkrrEncoder:
    """The module that runs ``plan`` and takes the inputs the pipeline feeds: with the mask, or without it."""
    return SkrrEncoder(enc, plan) if attention_mask else UnmaskedSkrrEncoder(enc, plan)


def apply_plan(enc: Encoder, plan: Plan, attention_mask: bool = True) -> SkrrEncoder:
    """The unrolled, weight-sharing module for ``plan``; asserts the sharing invariant. ``attention_mask=False``:
    the module (and its export) takes no mask, as SD3 and FLUX call their T5."""
    cost = plan_cost(enc, plan)
    plan.check_sparsity(cost.sparsity)
    module = encoder_for(enc, plan, attention_mask).eval()
    meta = [n for n, p in module.named_parameters() if p.is_meta]
    if meta:
        raise InvariantError(f"applied module still holds unloaded tensors, e.g. {module.checkpoint_name(meta[0])}")
    unique = unique_parameter_bytes(module)
    if unique != cost.kept_weight_bytes:
        raise InvariantError(
            f"sharing invariant broken: applied module holds {unique} unique parameter bytes, "
            f"the kept sub-blocks and always-kept parts are {cost.kept_weight_bytes}"
        )
    return module


@torch.no_grad()
def first_nonfinite(module: SkrrEncoder, *inputs: torch.Tensor) -> str | None:
    """Run the plan slot by slot on ``inputs`` (the module's) and name the first place whose output holds NaN or Inf
    (None if none does)."""
    from .plan import kind_of

    state = module.start(*inputs)
    if not torch.isfinite(state.hidden).all():
        return "the embeddings (stem)"
    for slot, src in module.schedule:
        module.step(state, slot, module.kept[str(src)])
        if not torch.isfinite(state.hidden).all():
            runs = f"sub-block {src}" + (" (re-used)" if src != slot else "")
            return f"slot {slot} (block {slot // 2} {kind_of(slot)}, running {runs})"
    for name, out in zip(module.output_names, module.finish(state)):
        if not torch.isfinite(out).all():
            return f"the head ({name})"
    return None


@contextmanager
def computed_in_fp32(module: SkrrEncoder) -> Iterator[SkrrEncoder]:
    """``module`` computing in fp32 on its own (bf16- or fp16-rounded) weights, one part at a time: the stem, each
    kept sub-block and the head have their parameters widened just before they run and restored after, so memory
    stays at the stored weights plus one part in fp32. Widening is exact, so both precisions see the same weights."""

    def widen(part: nn.Module, args: object) -> None:
        part._narrow = {n: p.data for n, p in part.named_parameters()}  # type: ignore[assignment]
        for p in part.parameters():
            p.data = p.data.float()

    def restore(part: nn.Module, args: object, output: object) -> None:
        for n, p in part.named_parameters():
            p.data = part._narrow[n]  # type: ignore[index]
        del part._narrow

    parts = [module.stem, module.head, *module.kept.values()]
    hooks = [h for part in parts for h in (part.register_forward_pre_hook(widen), part.register_forward_hook(restore))]
    try:
        yield module
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def dense_outputs_streamed(source: Any, precision: str, feeds: list[tuple[torch.Tensor, ...]],
                           attention_mask: bool = True) -> list[tuple[torch.Tensor, ...]]:
    """The dense model's outputs on every input tuple of ``feeds`` (the module's positional inputs; without the mask
    when ``attention_mask`` is False), with one sub-block in
    memory at a time besides the stem and head: each is read from the checkpoint, run on every feed's hidden
    states, and dropped with its file pages. Peak memory: stem + head + the largest sub-block + activations."""
    from .model import PartStreamer

    streamer = PartStreamer(source, precision)
    enc = streamer.enc
    dense = encoder_for(enc, Plan.dense(enc.adapter.family, enc.adapter.num_blocks(enc.config)), attention_mask)
    with streamer.part([dense.stem, dense.head]):
        states = [dense.start(*inputs) for inputs in feeds]
        for slot, src in each(dense.schedule, "sub-blocks"):
            sub_block = dense.kept[str(src)]
            with streamer.part([sub_block]):
                for state in states:
                    dense.step(state, slot, sub_block)
        return [dense.finish(state) for state in states]
