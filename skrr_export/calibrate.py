"""Finding Skrr plans: beam-search Skip, then greedy Re-use (Seo et al., ICML 2025; DESIGN.md section 1).

D(pruned) = MSE(f(dense(C)), f(pruned(C))) + MSE(f(dense("")), f(pruned(""))): f is the denoiser's caption
projection (or the identity), C the calibration prompts, "" the empty (or the declared negative) prompt, tokenized and
padded as the pipeline does; each MSE runs over every real (unpadded) token of its term, or over every position where
the pipeline runs the encoder unmasked, accumulated as sums and counts batch by batch and divided once, so the batching
does not change it. Where the pipeline reads several outputs (SD3's CLIP: the penultimate layer and the projected
pooled text_embeds), D is the unweighted sum of both terms over each output it reads: a per-token output's MSE runs
over the scored positions, a pooled one's over the prompts (one row each). ``penultimate_hidden_state`` of a candidate
is its own: the input of its last block that runs something (``apply.penultimate_boundary``).

The naive method runs the whole pruned encoder for every candidate (every beam x every slot it still keeps).
This one gives the same answer with fewer sub-block evaluations: batch by batch, each beam runs once up to its
last candidate slot, keeping its state entering every slot, and a candidate that additionally skips slot j
starts from that state and runs only the slots after it; a skip set that several beams reach is scored once,
from the beam that leaves the fewest slots to run; and the candidates of one beam can run together, stacked
along the batch axis. Only the batch in flight holds cached states, so memory does not grow with the prompts
(see ``MemoryPlan``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import Context, sizes_of
from .apply import Running, SkrrEncoder, penultimate_boundary
from .artifacts import need, sha256_file, write_atomic
from .config import CalibrationConfig
from .errors import AccuracyError, ArtifactError, Interrupted, UserError
from .inputs import load_tokenizer, tokenizer_used
from .plan import Plan, slot_sources
from .stages import load_source
from .units import size

log = logging.getLogger("skrr_export")

Schedule = tuple[int | None, ...]  # per slot: the sub-block that runs there, or None
schedule_of = slot_sources  # a candidate's schedule: the plans' own rule


# ----------------------------------------------------------------------------------------------- inputs


def read_prompts(path: Path | None, limit: int | None) -> list[str]:
    """One prompt per line, or JSONL (a string, or an object with 'prompt', 'caption' or 'text')."""
    if path is None:
        from importlib import resources

        text = resources.files("skrr_export").joinpath("data/calibration_prompts.txt").read_text()
        where = "the built-in calibration set"
    else:
        try:
            text = path.read_text()
        except OSError as exc:
            raise UserError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None
        where = str(path)
    prompts = [_prompt(line, where, n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not prompts:
        raise UserError(f"{where} holds no prompts (one per line, or JSONL with a 'prompt' field)")
    return prompts[:limit] if limit else prompts


def _prompt(line: str, where: str, n: int) -> str:
    line = line.strip()
    if not line.startswith(("{", '"')):
        return line
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return line
    if isinstance(value, str):
        return value
    for key in ("prompt", "caption", "text"):
        if isinstance(value, dict) and isinstance(value.get(key), str):
            return value[key]
    raise UserError(f"{where}:{n}: JSON line has no 'prompt', 'caption' or 'text' string")


def load_projection(path: Path, hidden: int) -> nn.Module:
    """A denoiser's caption projection from safetensors: PixArt (linear, tanh-GELU, linear) or SD3/FLUX (linear)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise UserError(f"cannot read projection {path}: {exc}") from None
    for prefix in ("caption_projection.", "context_embedder.", "y_embedder.y_proj."):
        tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
    if {"linear_1.weight", "linear_2.weight"} <= set(tensors):
        layers = [_linear(tensors, "linear_1."), nn.GELU(approximate="tanh"), _linear(tensors, "linear_2.")]
    elif "weight" in tensors:
        layers = [_linear(tensors, "")]
    else:
        raise UserError(f"{path}: expected 'linear_1.*'/'linear_2.*' (PixArt) or 'weight'/'bias' (SD3, FLUX); found {sorted(tensors)[:4]}")
    first = layers[0]
    assert isinstance(first, nn.Linear)
    if first.in_features != hidden:
        raise UserError(f"{path}: projection takes {first.in_features} features but the encoder outputs {hidden}")
    return nn.Sequential(*layers).eval()


def _linear(tensors: dict[str, torch.Tensor], prefix: str) -> nn.Linear:
    weight = tensors[prefix + "weight"]
    bias = tensors.get(prefix + "bias")
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


# ----------------------------------------------------------------------------------------------- scoring

PROMPTS, EMPTY = 0, 1  # the two terms of D


@dataclass
class Feed:
    """One forward batch: calibration prompts, or the empty prompt."""

    ids: torch.Tensor  # (b, s) on the host
    mask: torch.Tensor  # (b, s) 1 for real tokens, on the host
    term: int  # PROMPTS or EMPTY
    # f(dense) of every output read, fp32: a per-token one at the scored positions (tokens, width), a pooled one (rows, width)
    reference: list[torch.Tensor] = field(default_factory=list)


def _expand(ctx: Context, n: int) -> Context:
    """The context of ``n`` candidates stacked along the batch axis. A mask without a batch axis of its own (none:
    SD3/FLUX's unmasked T5; CLIP's causal mask without padding, one row) broadcasts as it is."""
    if n == 1:
        return ctx
    mask = ctx.mask
    if mask is not None and mask.shape[0] > 1:
        mask = mask.repeat(n, *[1] * (mask.dim() - 1))
    return Context(input_ids=ctx.input_ids.repeat(n, 1), mask=mask, position_bias=ctx.position_bias)


Branch = tuple[int, int | None]  # (slot, what runs there instead of the base schedule's sub-block); later slots follow the base


def boundary(schedule: Schedule) -> int:
    """Where ``schedule``'s penultimate layer is taken: the first slot of its last block that runs anything."""
    return penultimate_boundary(t for t, src in enumerate(schedule) if src is not None)


def branched(base: Schedule, branch: Branch) -> Schedule:
    slot, src = branch
    return (*base[:slot], src, *base[slot + 1:])


def read_outputs(names: tuple[str, ...], outputs: tuple[str, ...] | None) -> list[int]:
    """The positions in the encoder's ``names`` of the ``outputs`` the pipeline reads (None: the first output)."""
    if outputs is None:
        return [0]
    missing = [o for o in outputs if o not in names]
    if missing:
        raise UserError(f"the pipeline reads {missing[0]}, which this encoder does not output (it outputs "
                        f"{', '.join(names)}); declare the outputs its pipeline reads")
    return [names.index(o) for o in outputs]


class Scorer:
    """Scores schedules of sub-blocks against the dense model.

    D = sum over the two terms (the prompts, the empty prompt) and the outputs read of the squared error summed over
    the term's scored positions (a pooled output: its rows), divided once by their count x the output's width: the
    same number whatever the batching. Only the batch in flight has cached states; the dense reference is kept at
    the scored positions only. Every slot runs through the dense SkrrEncoder's ``step`` (the exported module's own
    rule, given the candidate's penultimate boundary); the scorer adds caching and stacking on top.
    """

    def __init__(self, enc: Any, batches: list[tuple[torch.Tensor, torch.Tensor]], empty: tuple[torch.Tensor, torch.Tensor],
                 projection: nn.Module | None, device: str, width: int = 1, masked: bool = True,
                 outputs: tuple[str, ...] | None = None):
        self.model = SkrrEncoder(enc, Plan.dense(enc.adapter.family, enc.adapter.num_blocks(enc.config)))
        self.masked = masked  # False: the encoder runs without a mask, as SD3/FLUX call T5 (the feeds' masks are all ones)
        names = enc.adapter.output_names(enc.config)
        self.reads = read_outputs(names, outputs)  # the outputs D scores (the pipeline's), by position
        self.tokenwise = [names[i] in enc.adapter.token_outputs(enc.config) for i in self.reads]
        # Only where the penultimate layer is read does a candidate's own boundary matter (it moves when a candidate
        # empties the last block that runs): then such candidates are scored from the stem.
        self.reads_penultimate = "penultimate_hidden_state" in (names[i] for i in self.reads)
        self.blocks = [self.model.kept[str(i)] for i in range(len(enc.sub_blocks))]
        self.num_slots = len(self.blocks)
        self.projection = projection.to(device=device, dtype=torch.float32) if projection is not None else None
        self.device, self.width = device, width
        self.feeds = [Feed(ids, mask, PROMPTS) for ids, mask in batches] + [Feed(*empty, EMPTY)]
        self.tokens = [int(sum(f.mask.sum() for f in self.feeds if f.term == t)) for t in (PROMPTS, EMPTY)]
        self.rows = [sum(f.ids.shape[0] for f in self.feeds if f.term == t) for t in (PROMPTS, EMPTY)]
        if min(self.tokens) == 0:
            raise UserError("calibration needs at least one real token in the prompts and in the empty prompt")
        dense = schedule_of(self.num_slots, ())
        with torch.no_grad():
            for f in self.feeds:
                state, keep = self._begin(f)
                f.reference = self._outputs(self._walk(dense, state, 0, False), keep)
        _check_reference(self.feeds, enc.dtype)
        self.widths = [r.shape[-1] for r in self.feeds[0].reference]
        self.evaluations = 0  # one = one sub-block of one candidate over the whole calibration set

    def _begin(self, feed: Feed) -> tuple[Running, torch.Tensor]:
        ids, mask = feed.ids.to(self.device), feed.mask.to(self.device)
        return self.model.start(ids, mask if self.masked else None), mask.bool()

    def _outputs(self, state: Running, keep: torch.Tensor) -> list[torch.Tensor]:
        """f(output) of every output read, fp32: a per-token one at the scored positions (the projection applies
        to these), a pooled one per row."""
        outs = self.model.finish(state)
        found = []
        for i, tokenwise in zip(self.reads, self.tokenwise):
            out = outs[i].float()
            if tokenwise:
                out = (self.projection(out) if self.projection is not None else out)[keep]
            found.append(out)
        return found

    def _error(self, feed: Feed, state: Running, keep: torch.Tensor) -> list[float]:
        """Per output read, the squared error summed over the feed's scored positions or rows (not yet divided)."""
        return [float((o - r).pow(2).sum(dtype=torch.float64)) for o, r in zip(self._outputs(state, keep), feed.reference)]

    def _sums(self) -> list[list[float]]:
        return [[0.0] * len(self.reads) for _ in (PROMPTS, EMPTY)]

    def _d(self, sums: list[list[float]]) -> float:
        counts = [[n if tokenwise else rows for tokenwise in self.tokenwise] for n, rows in zip(self.tokens, self.rows)]
        return sum(s / (n * w) for term, per in enumerate(sums) for s, n, w in zip(per, counts[term], self.widths))

    def _run(self, slot: int, src: int | None, state: Running, n: int, count: bool, before: int) -> Running:
        """Sub-block ``src`` at ``slot`` for ``n`` stacked candidates whose penultimate boundary is ``before`` (only
        the first feed counts evaluations); a new state, so that cached ones stay as they were."""
        if src is None:
            return state
        if count:
            self.evaluations += n
        stepped = Running(state.hidden, state.penultimate, _expand(state.ctx, n))
        self.model.step(stepped, slot, self.blocks[src], before)
        return Running(stepped.hidden, stepped.penultimate, state.ctx)

    def _walk(self, schedule: Schedule, state: Running, start: int, count: bool) -> Running:
        before = boundary(schedule)
        for t in range(start, self.num_slots):
            state = self._run(t, schedule[t], state, 1, count, before)
        return state

    @torch.no_grad()
    def score_full(self, schedules: list[Schedule]) -> list[float]:
        """D of each schedule, every one run from the stem (the naive method)."""
        sums = [self._sums() for _ in schedules]
        for i, feed in enumerate(self.feeds):
            state, keep = self._begin(feed)
            for k, schedule in enumerate(schedules):
                _add(sums[k][feed.term], self._error(feed, self._walk(schedule, state, 0, i == 0), keep))
        return [self._d(s) for s in sums]

    def discrepancy(self, schedule: Schedule) -> float:
        return self.score_full([schedule])[0]

    @torch.no_grad()
    def score(self, base: Schedule, branches: list[Branch]) -> list[float]:
        """D of ``base`` changed at one slot per branch: each branch runs from ``base``'s state at its slot, and
        ``width`` branches run together, stacked on the batch axis. ``base`` runs once per batch, up to the last
        branch; its states are cached for the batch in flight only. Where the penultimate layer is read, a branch
        that moves the schedule's penultimate boundary (it empties the last block that runs, or fills a later one)
        runs from the stem instead."""
        before = boundary(base)
        moved = [k for k, b in enumerate(branches) if self.reads_penultimate and boundary(branched(base, b)) != before]
        same = [k for k in range(len(branches)) if k not in moved]
        scores = dict(zip(moved, self.score_full([branched(base, branches[k]) for k in moved])))
        scores |= dict(zip(same, self._score_branches(base, [branches[k] for k in same], before)))
        return [scores[k] for k in range(len(branches))]

    def _score_branches(self, base: Schedule, branches: list[Branch], before: int) -> list[float]:
        if not branches:
            return []
        sums = [self._sums() for _ in branches]
        order = sorted(range(len(branches)), key=lambda k: branches[k][0])
        last = branches[order[-1]][0]
        for i, feed in enumerate(self.feeds):
            state, keep = self._begin(feed)
            states = [state]
            for t in range(last):
                states.append(self._run(t, base[t], states[-1], 1, i == 0, before))
            for g in range(0, len(order), self.width):
                group = order[g:g + self.width]
                finals = self._branches(base, states, [branches[k] for k in group], i == 0, before)
                for k, final in zip(group, finals):
                    _add(sums[k][feed.term], self._error(feed, final, keep))
            del states
        return [self._d(s) for s in sums]

    def _branches(self, base: Schedule, states: list[Running], group: list[Branch], count: bool,
                  before: int) -> list[Running]:
        """Branches (sorted by slot) join at their slot and then run every later slot of ``base`` together."""
        active: Running | None = None
        n = 0
        for t in range(group[0][0], self.num_slots):
            if active is not None:
                active = self._run(t, base[t], active, n, count, before)
            for slot, src in group:
                if slot == t:
                    joined = self._run(t, src, states[t], 1, count, before)
                    active = joined if active is None else _stacked(active, joined)
                    n += 1
        assert active is not None
        rows = states[0].hidden.shape[0]
        return [Running(h, p, active.ctx) for h, p in zip(active.hidden.split(rows), active.penultimate.split(rows))]


def _add(into: list[float], errors: list[float]) -> None:
    for k, e in enumerate(errors):
        into[k] += e


def _check_reference(feeds: list[Feed], dtype: torch.dtype) -> None:
    """D against a non-finite dense output would rank candidates by NaN: refused."""
    bad = [name for term, name in ((PROMPTS, "the prompts"), (EMPTY, "the empty prompt"))
           if any(f.term == term and not all(torch.isfinite(r).all() for r in f.reference) for f in feeds)]
    if bad:
        raise AccuracyError(f"the dense model's output on {' and '.join(bad)} is not finite (NaN or Inf) in {dtype}, "
                            "so no discrepancy to it means anything; calibrate in fp32 (or bf16), or check the checkpoint")


def _stacked(a: Running, b: Running) -> Running:
    """Two states on the batch axis (the penultimate output is the hidden state itself until the last block)."""
    hidden = torch.cat([a.hidden, b.hidden])
    both_current = a.penultimate is a.hidden and b.penultimate is b.hidden
    return Running(hidden, hidden if both_current else torch.cat([a.penultimate, b.penultimate]), a.ctx)


# ----------------------------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class Shapes:
    """What the calibration's memory depends on, from the config (no weights)."""

    num_slots: int
    hidden: int
    heads: int
    ffn: int
    out_width: int  # after the projection (or the hidden size without one)
    element: int  # bytes per element of the model's dtype


def shapes_of(enc: Any, out_width: int | None = None) -> Shapes:
    sizes = enc.adapter.sizes(enc.config)
    return Shapes(len(enc.sub_blocks), sizes.hidden, sizes.heads, sizes.ffn, out_width or sizes.hidden,
                  torch.empty((), dtype=enc.dtype).element_size())


def working_set(shapes: Shapes, batch: int, seq: int, width: int) -> tuple[int, int]:
    """Bytes of (cached states, activations) while ``batch`` prompts of ``seq`` tokens are in flight.

    States: the base schedule's state entering every slot, plus the stacked candidates (current, next, joining).
    Activations: the larger of one attention (q, k, v, context; scores, position bias plus mask, the softmax in
    fp32, probabilities) and one feed-forward (two gate inputs and their product) over ``width`` stacked
    candidates, the norms' fp32 temporaries, and the fp32 outputs scored (head output, projection, difference,
    square).
    """
    e, rows = shapes.element, width * batch
    state = batch * seq * shapes.hidden * e
    states = (shapes.num_slots + 1) * state + 3 * width * state
    attention = rows * seq * (4 * shapes.hidden * e + shapes.heads * seq * (3 * e + 4))
    feed_forward = rows * seq * 3 * shapes.ffn * e
    norms = 3 * rows * seq * shapes.hidden * 4
    outputs = batch * seq * (shapes.hidden + 3 * shapes.out_width) * 4
    return states, max(attention, feed_forward) + norms + outputs


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    budget: int
    weights: int  # dense weights and projection, resident all along
    references: int  # f(dense) at every real token (prompts and empty prompt), fp32, resident all along
    batch: int  # prompts in flight
    seq: int  # their padded length at most
    states: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.references + self.states + self.activations

    def describe(self) -> str:
        return (f"memory plan on {self.device}: weights {_gib(self.weights)} + reference outputs {_gib(self.references)} "
                f"+ {self.batch} prompts in flight (cached states {_gib(self.states)}, activations "
                f"{_gib(self.activations)}) = {_gib(self.total)} of {_gib(self.budget)}")

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "budget": self.budget, "weights": self.weights, "references": self.references,
                "batch": self.batch, "seq": self.seq, "states": self.states, "activations": self.activations,
                "total": self.total}


def _gib(n: int) -> str:
    """Every figure of the memory plan in one unit, so its terms add up on the page."""
    return size(n, "GiB")


def plan_memory(shapes: Shapes, weights: int, tokens: int, seq: int, batch: int, width: int, budget: int,
                device: str) -> MemoryPlan:
    """The largest batch up to ``batch`` whose working set fits ``budget`` next to the resident weights and the
    reference outputs of all ``tokens``; UserError when not even one prompt fits."""
    references = tokens * shapes.out_width * 4
    for b in range(batch, 0, -1):
        states, activations = working_set(shapes, b, seq, width)
        plan = MemoryPlan(device, budget, weights, references, b, seq, states, activations)
        if plan.total <= budget:
            return plan
    one = MemoryPlan(device, budget, weights, references, 1, seq, *working_set(shapes, 1, seq, width))
    raise UserError(f"calibration needs at least {_gib(one.total)} on {device} (weights {_gib(weights)}, "
                    f"reference outputs {_gib(references)}, one prompt in flight "
                    f"{_gib(one.states + one.activations)}) but the budget is {_gib(budget)}; raise "
                    "--max-memory, or use --precision bf16, fewer --num-prompts or a smaller --max-length")


def default_budget(device: str) -> int | None:
    """What the device has free, minus a margin (max(1 GiB, 10 %)); None where unknown."""
    from .artifacts import available_memory

    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return free - max(1 << 30, total // 10)
    host = available_memory()
    return None if host is None else host - max(1 << 30, host // 10)


def parse_size(text: str) -> int:
    """'24GiB', '800MiB', '80GB' (decimal), or bytes."""
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
             "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in units:
        raise UserError(f"--max-memory {text}: expected a size such as 24GiB, 800MiB or 80GB")
    n = int(float(match.group(1)) * units[unit])
    if n <= 0:
        raise UserError(f"--max-memory {text}: the budget must be more than zero bytes")
    return n


# ----------------------------------------------------------------------------------------------- search


@dataclass
class Beam:
    order: tuple[int, ...]  # skipped slots, in the order they were chosen
    score: float


NEAR_TIE = 1e-6  # relative difference in D within which float rounding (the batching, the device) may swap two candidates


def near_tie(a: float, b: float) -> bool:
    return abs(a - b) <= NEAR_TIE * max(abs(a), abs(b))


@dataclass
class SearchState:
    step: int = 0
    beams: list[Beam] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)  # best beam after every step
    evaluations: int = 0
    naive_evaluations: int = 0
    seconds: float = 0.0
    non_finite: int = 0  # candidates dropped because their D was NaN or infinite

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "beams": [{"order": list(b.order), "score": b.score} for b in self.beams],
            "history": self.history,
            "evaluations": self.evaluations,
            "naive_evaluations": self.naive_evaluations,
            "seconds": self.seconds,
            "non_finite": self.non_finite,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SearchState:
        beams = [Beam(tuple(b["order"]), b["score"]) for b in data["beams"]]
        return cls(data["step"], beams, data["history"], data["evaluations"], data["naive_evaluations"], data["seconds"],
                   data.get("non_finite", 0))


def naive_cost(num_slots: int, skipped: int) -> int:
    """Sub-block evaluations of running a model with ``skipped`` empty slots from the start."""
    return num_slots - skipped


def skip_search(scorer: Scorer, sizes: list[int], total: int, target: float, beam: int, naive: bool = False,
                state: SearchState | None = None, on_step: Any = None) -> SearchState:
    """Beam search until the best beam removes at least ``target`` of the parameters (or one slot is left)."""
    n = scorer.num_slots
    state = state or SearchState(beams=[Beam((), 0.0)])

    def sparsity(order: tuple[int, ...]) -> float:
        return sum(sizes[i] for i in order) / total

    while sparsity(state.beams[0].order) < target and len(state.beams[0].order) < n - 1:
        start = time.perf_counter()
        before = scorer.evaluations
        candidates = _candidates(state.beams, n)
        _score_candidates(scorer, state, candidates, naive)
        ranked, dropped = _ranked([c.beam for c in candidates.values()], state.step + 1)
        state.beams = ranked[:beam]
        state.step += 1
        state.non_finite += dropped
        state.evaluations += scorer.evaluations - before
        state.seconds += time.perf_counter() - start
        best = state.beams[0]
        margin = ranked[beam].score - ranked[beam - 1].score if len(ranked) > beam else None
        state.history.append({"step": state.step, "order": list(best.order), "score": best.score,
                              "sparsity": sparsity(best.order), "evaluations": state.evaluations,
                              "beam_scores": [b.score for b in state.beams], "margin": margin, "non_finite": dropped,
                              "near_ties": _near_ties(ranked[:beam + 1], state.step)})
        if on_step:
            on_step(state)
    return state


def _score_candidates(scorer: Scorer, state: SearchState, candidates: dict[frozenset[int], Candidate],
                      naive: bool) -> None:
    """Each candidate's D into its beam's score, every parent's candidates together (and the naive count)."""
    n = scorer.num_slots
    for rank, parent in enumerate(state.beams):
        mine = [c for c in candidates.values() if c.parent == rank]
        every = [j for j in range(n) if j not in parent.order]  # the naive method runs them all, repeats included
        state.naive_evaluations += len(every) * naive_cost(n, len(parent.order) + 1)
        if naive:
            all_scores = dict(zip(every, scorer.score_full([schedule_of(n, (*parent.order, j)) for j in every])))
            scores = [all_scores[c.slot] for c in mine]
        else:
            scores = scorer.score(schedule_of(n, parent.order), [(c.slot, None) for c in mine]) if mine else []
        for c, score in zip(mine, scores):
            c.beam.score = score


def _ranked(beams: list[Beam], step: int) -> tuple[list[Beam], int]:
    """The candidates by D (then by order), and how many were dropped for a non-finite D: never chosen."""
    finite = [b for b in beams if math.isfinite(b.score)]
    dropped = len(beams) - len(finite)
    if dropped:
        first = next(b for b in beams if not math.isfinite(b.score))
        log.warning("skip step %d: %d of %d candidates have a non-finite D (e.g. skipping %s: %s) and were dropped",
                    step, dropped, len(beams), list(first.order), first.score)
    if not finite:
        raise AccuracyError(f"skip step {step}: the D of every candidate is NaN or infinite (the pruned model overflows); "
                            "calibrate in fp32 or bf16")
    return sorted(finite, key=lambda b: (b.score, b.order)), dropped


def _near_ties(ranked: list[Beam], step: int) -> list[list[list[int]]]:
    """Neighbours in the ranking (the kept beams and the first left out) whose D differ by float rounding only:
    another batching may rank them the other way. Logged, and recorded in the step's history."""
    ties = [[list(a.order), list(b.order)] for a, b in zip(ranked, ranked[1:]) if near_tie(a.score, b.score)]
    for a, b in ties:
        log.info("near-tie at skip step %d: skipping %s and %s differ by less than %g relative in D", step, a, b, NEAR_TIE)
    return ties


@dataclass
class Candidate:
    beam: Beam  # its skip order comes from the best-ranked parent that reaches its set
    parent: int  # the parent that evaluates it: the one whose added slot is latest (shortest suffix to run)
    slot: int


def _candidates(beams: list[Beam], n: int) -> dict[frozenset[int], Candidate]:
    """Every distinct skip set one step away from the beams. A set reached from several parents is scored once,
    from the parent that leaves the fewest slots to run; the result does not depend on which parent scores it."""
    out: dict[frozenset[int], Candidate] = {}
    for rank, parent in enumerate(beams):
        for j in range(n):
            if j in parent.order:
                continue
            key = frozenset((*parent.order, j))
            if key not in out:
                out[key] = Candidate(Beam((*parent.order, j), float("nan")), rank, j)
            elif j > out[key].slot:
                out[key].parent, out[key].slot = rank, j
    return out


def reuse_search(scorer: Scorer, skip: tuple[int, ...], naive: bool = False) -> tuple[dict[int, int], float, float, list[dict[str, Any]], int]:
    """One greedy pass over ``skip`` in order: try the nearest kept sub-block of the same kind on each side.

    Also returns the naive method's sub-block evaluations for the same pass (every trial a full run)."""
    n = scorer.num_slots
    skipped = set(skip)
    reuse: dict[int, int] = {}
    current = initial = scorer.discrepancy(schedule_of(n, skip))
    if not math.isfinite(initial):
        raise AccuracyError(f"D of skipping {list(skip)} is {initial} (the pruned model overflows); calibrate in fp32 or bf16")
    naive_count = naive_cost(n, len(skip))
    steps = []
    for slot in skip:
        sources = [s for s in (_nearest(slot, skipped, -2, n), _nearest(slot, skipped, 2, n)) if s is not None]
        if not sources:
            continue
        trials = [schedule_of(n, skip, reuse | {slot: s}) for s in sources]
        naive_count += sum(sum(src is not None for src in t) for t in trials)
        if naive:
            scores = scorer.score_full(trials)
        else:
            scores = scorer.score(schedule_of(n, skip, reuse), [(slot, s) for s in sources])
        step = _reuse_step(slot, current, dict(zip(sources, scores)))
        steps.append(step)
        if step["accepted"] is not None:
            reuse[slot], current = step["accepted"], scores[sources.index(step["accepted"])]
    return reuse, initial, current, steps, naive_count


def _reuse_step(slot: int, current: float, tried: dict[int, float]) -> dict[str, Any]:
    """One slot's record: the source with the lowest finite D is accepted when it lowers ``current``; a non-finite
    D is never taken (recorded as null, counted, logged); a near-tie among the choices is logged."""
    finite = {src: d for src, d in tried.items() if math.isfinite(d)}
    non_finite = [src for src in tried if src not in finite]
    if non_finite:
        log.warning("re-use at slot %d: D of re-using %s there is non-finite; not taken", slot, non_finite)
    best = min(finite, key=lambda src: (finite[src], src), default=None)
    accepted = best if best is not None and finite[best] < current else None
    values = sorted([current, *finite.values()])
    tie = any(near_tie(a, b) for a, b in zip(values, values[1:]))
    if tie:
        log.info("near-tie at re-use of slot %d: D without re-use %s, with %s", slot, current, finite)
    return {"slot": slot, "before": current, "tried": {str(src): finite.get(src) for src in tried},
            "accepted": accepted, "non_finite": non_finite, "near_tie": tie}


def _nearest(slot: int, skipped: set[int], step: int, n: int) -> int | None:
    s = slot + step
    while 0 <= s < n:
        if s not in skipped:
            return s
        s += step
    return None


def skip_for(state: SearchState, sizes: list[int], total: int, target: float) -> tuple[int, ...]:
    """The search's answer for ``target``: the best beam of the deepest step whose sparsity stays within it
    (a prefix of the final order can be a worse set), else the longest such prefix of the final order."""
    within = [h for h in state.history if h["sparsity"] <= target + 1e-12]
    if within:
        return tuple(within[-1]["order"])
    skip = prefix_for(state.beams[0].order, sizes, total, target)
    if not skip:
        raise UserError(f"--sparsity {target}: every sub-block the search chose first removes more than that")
    return skip


def prefix_for(order: tuple[int, ...], sizes: list[int], total: int, target: float) -> tuple[int, ...]:
    """The longest prefix of the skip order whose sparsity stays within ``target``."""
    removed, n = 0, 0
    for slot in order:
        if (removed + sizes[slot]) / total > target + 1e-12:
            break
        removed += sizes[slot]
        n += 1
    return order[:n]


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- the command


def check_config(cfg: CalibrationConfig) -> None:
    if not cfg.sparsities:
        raise UserError("--sparsity: give at least one target, e.g. --sparsity 0.3 0.4")
    for s in cfg.sparsities:
        if not 0 < s < 1:
            raise UserError(f"--sparsity {s}: a target sparsity must lie in (0, 1)")
    for flag, value in (("--beam", cfg.beam), ("--num-prompts", cfg.num_prompts), ("--max-length", cfg.max_length),
                        ("--batch-size", cfg.batch_size), ("--max-memory", cfg.max_memory)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device}: no CUDA device on this machine; use --device cpu")
    if cfg.out.suffix != ".json":
        raise UserError(f"--out {cfg.out}: plan files end in .json")
    blocker = next((p for p in cfg.out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"--out {cfg.out} cannot be written: {blocker} is a file, not a folder")
    existing = [p for p in output_paths(cfg).values() if p.exists()]
    if existing and not cfg.force:
        raise UserError(f"{existing[0]} exists; pass --force to replace it")


def output_paths(cfg: CalibrationConfig) -> dict[float, Path]:
    if len(cfg.sparsities) == 1:
        return {cfg.sparsities[0]: cfg.out}
    return {s: cfg.out.with_name(f"{cfg.out.stem}-{s * 100:g}{cfg.out.suffix}") for s in sorted(set(cfg.sparsities))}


def calibrate(cfg: CalibrationConfig) -> dict[float, Plan]:
    """Run the calibration and write one plan file per target sparsity."""
    start = time.perf_counter()
    job = _prepare(cfg)
    scorer = _scorer(job, cfg)
    checkpoint = cfg.out.with_name(cfg.out.name + ".calibration-checkpoint.json")
    key = resume_key(cfg, job.source, job.meta.config, job.prompts, (job.ids, job.empty))
    state = _search(job, cfg, scorer, checkpoint, key)
    plans = {}
    for target, path in job.targets.items():
        plan = _plan_for(target, job, cfg, scorer, state, key)
        plan = replace(plan, provenance=plan.provenance | {"wall_seconds": round(time.perf_counter() - start, 2)})
        _write_json(path, plan.to_json())
        log.info("wrote %s: %d sub-blocks skipped, %d re-used, sparsity %.4f, D %.5g", path, len(plan.skip),
                 len(plan.reuse), plan.sparsity, plan.provenance["score"])
        plans[target] = plan
    log.info("kept %s: a run with a higher --sparsity and the same --out continues from it", checkpoint)
    return plans


@dataclass
class _Job:
    """What a calibration works on: the model's structure and sub-block sizes, the targets, the tokenized prompts
    and the memory plan."""

    source: Any
    meta: Any
    sizes: list[int]
    total: int
    targets: dict[float, Path]
    tokenizer: Any
    prompts: list[str]
    ids: list[list[int]]
    empty: list[int]
    projection: nn.Module | None
    memory: MemoryPlan


def _prepare(cfg: CalibrationConfig) -> _Job:
    """Check the request against the model's structure (no weights read) and tokenize the prompts."""
    from .apply import sub_block_parameters
    from .model import build_meta, load_config, source_of

    check_config(cfg)
    source = source_of(cfg)
    meta = build_meta(load_config(source))
    sizes = [sum(p.numel() for _, p in block) for block in sub_block_parameters(meta)]
    total = sum(p.numel() for p in meta.model.parameters())
    targets = output_paths(cfg)
    _check_targets(targets, sizes, total)
    _check_length(meta.config, cfg.max_length)
    tokenizer = load_tokenizer(source)
    prompts, ids, empty = _tokenize(tokenizer, meta.config, read_prompts(cfg.prompts, cfg.num_prompts), cfg.max_length,
                                    str(cfg.prompts or "the built-in calibration set"), negative_prompt(cfg))
    projection = load_projection(cfg.projection, meta.adapter.sizes(meta.config).hidden) if cfg.projection else None
    memory = _memory_plan(meta, cfg, ids, empty, projection)
    log.info("%s", memory.describe())
    return _Job(source, meta, sizes, total, targets, tokenizer, prompts, ids, empty, projection, memory)


def _check_targets(targets: dict[float, Path], sizes: list[int], total: int) -> None:
    most, least = (sum(sizes) - min(sizes)) / total, min(sizes) / total
    for s in targets:
        if not least <= s <= most:
            raise UserError(f"--sparsity {s}: not reachable for this model; a plan removes between {least:.4f} "
                            f"(one sub-block) and {most:.4f} (all but one) of its parameters")


def _scorer(job: _Job, cfg: CalibrationConfig) -> Scorer:
    """The dense model on the device, and the scorer of the prompts in batches the memory plan allows."""
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    enc = _load(job.source, Plan.dense(job.meta.adapter.family, job.meta.adapter.num_blocks(job.meta.config)), cfg.precision)
    for m in (enc.stem, enc.head, *enc.sub_blocks):
        m.to(cfg.device)
    # Candidates stacked on the batch axis: worth it on a GPU; on CPU one at a time is fastest
    # (MiniLM skip phase, 32 prompts, 2 cores: 38.4 s unstacked, 41.8 s by 2, 50.5 s by 8).
    width = 8 if cfg.device.startswith("cuda") else 1
    size, masked = job.memory.batch, _masked(cfg)
    length = None if masked else cfg.max_length  # unmasked: every prompt padded to the pipeline's length, all scored
    batches = [_pad(job.tokenizer, job.ids[i:i + size], length) for i in range(0, len(job.ids), size)]
    return Scorer(enc, batches, _pad(job.tokenizer, [job.empty], length), job.projection, cfg.device, width, masked,
                  cfg.pipeline.outputs if cfg.pipeline is not None else None)


def _scored(cfg: CalibrationConfig) -> str:
    return "every real token" if _masked(cfg) else f"every position (padded to {cfg.max_length}, padding included; unmasked)"


def _read(cfg: CalibrationConfig) -> str:
    """The outputs D scores, in words."""
    return ", ".join(cfg.pipeline.outputs) if cfg.pipeline is not None else "the first output"


def negative_prompt(cfg: CalibrationConfig) -> str:
    """The prompt of D's second term: --negative-prompt, else the pipeline's declared one, else "" (the empty prompt
    classifier-free guidance runs without a negative prompt)."""
    if cfg.negative_prompt is not None:
        return cfg.negative_prompt
    return cfg.pipeline.negative_prompt if cfg.pipeline is not None else ""


def _masked(cfg: CalibrationConfig) -> bool:
    """Whether the pipeline runs the encoder with the mask (D over real tokens) or without (D over every position)."""
    return cfg.pipeline is None or cfg.pipeline.attention_mask


def _search(job: _Job, cfg: CalibrationConfig, scorer: Scorer, checkpoint: Path, key: dict[str, Any]) -> SearchState:
    """The skip search to the largest target, resumed from and saved to ``checkpoint`` step by step."""
    state = _resume(checkpoint, key)
    progress = _progress(round(max(job.targets) * job.total / (sum(job.sizes) / len(job.sizes))), state)

    def on_step(st: SearchState) -> None:
        _save_checkpoint(checkpoint, key, st)
        progress.total = max(progress.total, st.step)
        progress.update(1)
        progress.set_postfix(step=st.step, best=f"{st.beams[0].score:.4g}", sparsity=f"{st.history[-1]['sparsity']:.3f}")

    try:
        state = skip_search(scorer, job.sizes, job.total, max(job.targets), cfg.beam, cfg.naive, state, on_step)
        progress.total = progress.n  # the estimate was a guess; the bar ends at the steps taken
        progress.refresh()
    except KeyboardInterrupt:
        raise Interrupted(f"calibration interrupted; {_kept(checkpoint)}; run the same command again to resume") from None
    except (torch.OutOfMemoryError, MemoryError):
        raise UserError(f"calibration ran out of memory on {cfg.device} with {job.memory.batch} prompts in flight; "
                        f"{_kept(checkpoint)}; run again with a lower --max-memory or --batch-size to resume") from None
    finally:
        progress.close()
    return state


def _kept(checkpoint: Path) -> str:
    return f"checkpoint {checkpoint} kept" if checkpoint.is_file() else "no step had finished, nothing kept"


def _plan_for(target: float, job: _Job, cfg: CalibrationConfig, scorer: Scorer, state: SearchState,
              key: dict[str, Any]) -> Plan:
    """The skip set for ``target`` from the search, then the greedy re-use pass on it."""
    skip = skip_for(state, job.sizes, job.total, target)
    before = scorer.evaluations
    reuse, skip_score, score, reuse_steps, naive_reuse = reuse_search(scorer, skip, cfg.naive)
    sparsity = sum(job.sizes[i] for i in skip) / job.total
    provenance = {
        "tool": "skrr-export calibrate",
        "method": "Skrr: beam-search Skip, greedy Re-use (Seo et al., ICML 2025)",
        "pipeline": cfg.pipeline.to_json() if cfg.pipeline is not None else None,
        "metric": f"MSE(dense, pruned) of {_read(cfg)} over {_scored(cfg)} of the prompts + the same on the "
                  f"negative prompt {negative_prompt(cfg)!r}, after "
                  + (f"projection {cfg.projection.name}" if cfg.projection else "no projection (raw encoder output)"),
        "negative_prompt": negative_prompt(cfg),
        "model": str(job.source.folder),
        "tokenizer": tokenizer_used(job.source),
        "model_config_sha256": key["model_config"],
        "model_sha256": key["model"],
        "prompts": str(cfg.prompts) if cfg.prompts else "built-in calibration set",
        "prompt_set_sha256": fingerprint(job.prompts, cfg.max_length),
        "num_prompts": len(job.prompts),
        "max_length": cfg.max_length,
        "beam": cfg.beam,
        "precision": cfg.precision,
        "device": cfg.device,
        "memory_plan": job.memory.to_json(),
        "skip_order": list(state.beams[0].order),
        "skip_steps": state.history,
        "skip_score": skip_score,
        "reuse_steps": reuse_steps,
        "score": score,
        "subblock_evaluations": state.evaluations + scorer.evaluations - before,
        "naive_subblock_evaluations": state.naive_evaluations + naive_reuse,
        "skip_seconds": round(state.seconds, 2),
        "non_finite_candidates": {"skip": state.non_finite, "reuse": sum(len(s["non_finite"]) for s in reuse_steps)},
        "skip_subblock_evaluations_per_second": round(state.evaluations / state.seconds, 2) if state.seconds else None,
    }
    family, num_blocks = job.meta.adapter.family, job.meta.adapter.num_blocks(job.meta.config)
    return Plan(family, num_blocks, skip=skip, reuse=reuse, sparsity=round(sparsity, 6), provenance=provenance)


def _load(source: Any, dense: Plan, precision: str) -> Any:
    """The dense encoder (the stage chain's load_source); random weights are drawn from a fixed seed, so a resumed
    run scores the same model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load_source(source, dense, precision)


def _check_length(config: Any, max_length: int) -> None:
    positions = sizes_of(config).positions
    if positions is not None and max_length > positions:
        raise UserError(f"--max-length {max_length}: this model has {positions} positions; use at most {positions}")


def _memory_plan(meta: Any, cfg: CalibrationConfig, ids: list[list[int]], empty: list[int],
                 projection: nn.Module | None) -> MemoryPlan:
    """Weights, reference outputs and the batch in flight against ``--max-memory`` (default: free minus a margin)."""
    from .apply import plan_cost
    from .artifacts import check_memory
    from .model import DTYPES

    meta.dtype = DTYPES[cfg.precision]
    weights = plan_cost(meta, Plan.dense(meta.adapter.family, meta.adapter.num_blocks(meta.config))).kept_weight_bytes
    out_width = meta.adapter.sizes(meta.config).hidden
    if projection is not None:
        weights += sum(p.numel() * 4 for p in projection.parameters())
        out_width = [m for m in projection.modules() if isinstance(m, nn.Linear)][-1].out_features
    out_width *= len(cfg.pipeline.outputs) if cfg.pipeline is not None else 1  # a pooled one counted per token: more
    if cfg.device.startswith("cuda"):  # the checkpoint is read into host memory before it moves to the GPU
        check_memory(need(weights), f"loading the model for calibration (dense weights {size(weights, 'GiB', 1)})")
    budget = cfg.max_memory or default_budget(cfg.device) or 2**62
    device = "cuda" if cfg.device.startswith("cuda") else "cpu"
    tokens = sum(map(len, ids)) + len(empty) if _masked(cfg) else (len(ids) + 1) * cfg.max_length  # positions scored
    width = 8 if device == "cuda" else 1
    seq = max(map(len, ids)) if _masked(cfg) else cfg.max_length
    plan = plan_memory(shapes_of(meta, out_width), weights, tokens, seq, cfg.batch_size, width, budget, device)
    if plan.batch < cfg.batch_size:
        log.info("batch size %d -> %d to stay within %s", cfg.batch_size, plan.batch, _gib(budget))
    return plan


def resume_key(cfg: CalibrationConfig, source: Any, config: Any, prompts: list[str],
               tokens: tuple[list[list[int]], list[int]]) -> dict[str, Any]:
    """Everything that changes D: the model, the prompts and their token ids (``tokens``: the prompts', the empty
    prompt's), the precision, the device kind, the objective (projection) and the search (beam, method). Not the
    batch size: the memory plan sets it from free memory, and D does not depend on it (only float rounding does,
    which can swap a near-tie; the search logs those). Not the targets: a step does not depend on them, so a run
    with a higher target continues where a lower one stopped."""
    return {
        "model": _model_hash(source),
        "model_config": fingerprint(config.to_dict()),
        "prompts": fingerprint(prompts),
        "num_prompts": len(prompts),
        "max_length": cfg.max_length,
        "tokens": fingerprint(*tokens),
        "precision": cfg.precision,
        "device": "cuda" if cfg.device.startswith("cuda") else "cpu",
        "beam": cfg.beam,
        "projection": sha256_file(cfg.projection) if cfg.projection else None,
        "method": "naive" if cfg.naive else "fast",
        "pipeline": cfg.pipeline.to_json() if cfg.pipeline is not None else None,
    }


def _model_hash(source: Any) -> str:
    if source.random_weights:
        return "random weights (seed 0)"
    return fingerprint([(p.name, sha256_file(p)) for p in sorted(source.folder.glob("*.safetensors"))])


def _tokenize(tokenizer: Any, config: Any, prompts: list[str], max_length: int, where: str, negative: str = ""
              ) -> tuple[list[str], list[list[int]], list[int]]:
    """(prompts kept, their token ids, the ids of ``negative``, D's second prompt: "" or the declared negative prompt),
    truncated to ``max_length`` as the pipelines truncate. Prompts that tokenize like the empty prompt are dropped (all
    of them: an error). Without a tokenizer: seeded random ids of ``max_length`` tokens, and the end-of-text token
    alone for the second prompt (a negative prompt needs a tokenizer)."""
    import numpy as np

    from .inputs import prompt_batch, random_ids

    if tokenizer is None:
        if negative:
            raise UserError(f"negative prompt {negative!r}: token ids for it need a tokenizer (random ids stand in for "
                            "the empty prompt only); pass --tokenizer DIR, or drop the negative prompt")
        ids = random_ids(config, (len(prompts), max_length), np.random.default_rng(0))
        _, empty = prompt_batch(None, config, "int64", None)
        return prompts, ids.tolist(), empty.feed["input_ids"][0].tolist()
    empty_ids = tokenizer("", truncation=True, max_length=max_length)["input_ids"]
    negative_ids = tokenizer(negative, truncation=True, max_length=max_length)["input_ids"]
    ids = tokenizer(prompts, truncation=True, max_length=max_length)["input_ids"]
    kept = [i for i, t in enumerate(ids) if t != empty_ids]
    if not kept:
        raise UserError(f"{where}: all {len(prompts)} prompts are empty after tokenization (e.g. {prompts[0]!r}); "
                        "give prompts with text the tokenizer keeps")
    if len(kept) < len(prompts):
        log.warning("%s: %d prompts are empty after tokenization and were left out", where, len(prompts) - len(kept))
    return [prompts[i] for i in kept], [ids[i] for i in kept], negative_ids


def _pad(tokenizer: Any, ids: list[list[int]], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch padded to its longest prompt: (input_ids, attention_mask). With ``length`` (a pipeline that runs the
    encoder unmasked): padded to ``length`` as the pipeline pads, and the mask all ones, since D scores every
    position the denoiser reads."""
    if length is not None and tokenizer is not None:  # the tokenizer's own padding (its pad token, its side)
        enc = tokenizer.pad({"input_ids": ids}, padding="max_length", max_length=length, return_tensors="pt")
        return enc["input_ids"], torch.ones_like(enc["input_ids"])
    if length is not None:
        out = torch.tensor([row + [0] * (length - len(row)) for row in ids], dtype=torch.long)
        return out, torch.ones_like(out)
    if tokenizer is not None:
        enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]
    longest = max(map(len, ids))
    out = torch.zeros(len(ids), longest, dtype=torch.long)
    mask = torch.zeros_like(out)
    for row, t in enumerate(ids):
        out[row, :len(t)] = torch.tensor(t)
        mask[row, :len(t)] = 1
    return out, mask


def _resume(checkpoint: Path, key: dict[str, Any]) -> SearchState | None:
    if not checkpoint.is_file():
        return None
    try:
        data = json.loads(checkpoint.read_text())
    except json.JSONDecodeError:
        raise ArtifactError(f"calibration checkpoint {checkpoint} is corrupt; delete it to start over") from None
    old = data.get("key") if isinstance(data.get("key"), dict) else {}
    changed = [k for k in key if old.get(k) != key[k]]
    if changed:
        what = "; ".join(f"{k} {_short(old.get(k))}, now {_short(key[k])}" for k in changed)
        log.warning("starting over: %s was made with other settings (%s)", checkpoint.name, what)
        return None
    state = SearchState.from_json(data["state"])
    log.info("resuming calibration from %s at step %d", checkpoint.name, state.step)
    return state


def _short(value: Any) -> str:
    text = "none" if value is None else str(value)
    return text[:12] if len(text) == 64 else text  # sha256 hashes: their first 12 digits


def _save_checkpoint(path: Path, key: dict[str, Any], state: SearchState) -> None:
    _write_json(path, {"key": key, "state": state.to_json()})


def _write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def _progress(expected_steps: int, state: SearchState | None) -> Any:
    """The search's bar as every long stage shows one (``progress.counted_bar``: plain lines when not a terminal)."""
    from .progress import counted_bar

    done = state.step if state else 0
    return counted_bar("skip search", max(expected_steps, done), "steps", initial=done)
