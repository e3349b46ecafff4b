"""Finding Skrr plans: beam-search Skip, then greedy Re-use (Seo et al., ICML 2025; DESIGN.md section 1).

D(pruned) = MSE(f(dense(C)), f(pruned(C))) + MSE(f(dense("")), f(pruned(""))): f is the denoiser's caption
projection (or the identity), C the calibration prompts, padded tokens masked out.

The naive method runs the whole pruned encoder for every candidate (every beam x every slot it still keeps).
This one gives the same answer with fewer sub-block evaluations: each beam keeps its hidden states at every
slot boundary, so a candidate that additionally skips slot j starts from the beam's state at j and runs only
the slots after it (about half); a skip set that several beams reach is scored once, from the beam that
leaves the fewest slots to run; the best candidates' states become the next beams' caches; and the
candidates of one beam run together, stacked along the batch axis.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import Context
from .artifacts import sha256_file, write_atomic
from .errors import ArtifactError, Interrupted, UserError
from .plan import Plan

log = logging.getLogger("skrr_export")

Schedule = tuple[int | None, ...]  # per slot: the sub-block that runs there, or None
Trace = list[list[torch.Tensor]]  # per batch: the state entering every slot, then the final state


def schedule_of(num_slots: int, skip: tuple[int, ...], reuse: dict[int, int] | None = None) -> Schedule:
    reuse = reuse or {}
    skipped = set(skip)
    return tuple(reuse.get(s) if s in skipped else s for s in range(num_slots))


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


@dataclass
class Batch:
    hidden: torch.Tensor  # stem output
    ctx: Context
    mask: torch.Tensor  # (b, s) 1 for real tokens
    reference: torch.Tensor  # f(dense output)


def _expand(ctx: Context, n: int) -> Context:
    """The context of ``n`` candidates stacked along the batch axis."""
    if n == 1:
        return ctx
    pb = ctx.position_bias
    return Context(input_ids=ctx.input_ids.repeat(n, 1), mask=ctx.mask.repeat(n, *[1] * (ctx.mask.dim() - 1)),
                   position_bias=pb)


class Scorer:
    """Runs schedules of sub-blocks from cached slot-boundary states and scores them against the dense model."""

    def __init__(self, enc: Any, feeds: list[tuple[torch.Tensor, torch.Tensor]], projection: nn.Module | None,
                 device: str, chunk: int = 8):
        self.stem, self.blocks, self.head = enc.stem, enc.sub_blocks, enc.head
        self.num_slots = len(self.blocks)
        self.projection = projection.to(device=device, dtype=torch.float32) if projection is not None else None
        self.device, self.chunk = device, chunk
        self.evaluations = 0
        self.batches: list[Batch] = []
        dense = schedule_of(self.num_slots, ())
        with torch.no_grad():
            for ids, mask in feeds:
                ids, mask = ids.to(device), mask.to(device)
                hidden, ctx = self.stem(ids, mask)
                self.batches.append(Batch(hidden, ctx, mask, torch.empty(0)))
            self.dense_trace = self.trace(dense)  # also the root beam's cache
            for b, states in zip(self.batches, self.dense_trace):
                b.reference = self._project(states[-1], b.ctx)
        self.evaluations = 0  # the dense reference is not part of the search

    def _project(self, hidden: torch.Tensor, ctx: Context) -> torch.Tensor:
        out = self.head(hidden, hidden, ctx)[0].float()
        return self.projection(out) if self.projection is not None else out

    def _mse(self, batch: Batch, projected: torch.Tensor) -> float:
        mask = batch.mask.to(projected.dtype)[..., None]
        err = ((projected - batch.reference) ** 2 * mask).sum()
        return float(err / (mask.sum() * projected.shape[-1]))

    def discrepancy(self, finals: list[torch.Tensor]) -> float:
        return sum(self._mse(b, self._project(f, b.ctx)) for b, f in zip(self.batches, finals))

    @torch.no_grad()
    def trace(self, schedule: Schedule) -> Trace:
        """Per batch, the hidden state entering every slot, and the final one: 2N + 1 states."""
        out = []
        for i, b in enumerate(self.batches):
            states = [b.hidden]
            for src in schedule:
                states.append(self._run(src, states[-1], b.ctx, 1, i == 0))
            out.append(states)
        return out

    def finals(self, schedule: Schedule) -> list[torch.Tensor]:
        return [states[-1] for states in self.trace(schedule)]

    def _run(self, src: int | None, hidden: torch.Tensor, ctx: Context, n: int, count: bool) -> torch.Tensor:
        """Run sub-block ``src`` for ``n`` stacked candidates; one evaluation = one sub-block of one candidate
        over the whole calibration set, so only the first batch counts."""
        if src is None:
            return hidden
        if count:
            self.evaluations += n
        return self.blocks[src](hidden, _expand(ctx, n))

    @torch.no_grad()
    def score_skips(self, schedule: Schedule, trace: Trace, slots: list[int], keep: int) -> tuple[dict[int, float], dict[int, Trace]]:
        """D of ``schedule`` with each one of ``slots`` additionally emptied, from the cached ``trace``.

        Also returns the full traces of the ``keep`` best candidates, so a new beam needs no re-run.
        """
        scores: dict[int, float] = {}
        kept: dict[int, Trace] = {}
        for start in range(0, len(slots), self.chunk):
            chunk = sorted(slots[start:start + self.chunk])
            suffixes = [self._suffixes(schedule, trace[i], b, chunk, i == 0) for i, b in enumerate(self.batches)]
            for k, slot in enumerate(chunk):
                scores[slot] = sum(self._mse(b, self._project(suf[k][-1], b.ctx)) for b, suf in zip(self.batches, suffixes))
            best = sorted(scores, key=lambda j: (scores[j], j))[:keep]
            for k, slot in enumerate(chunk):
                if slot in best:
                    kept[slot] = [trace[i][: slot + 1] + suffixes[i][k] for i in range(len(self.batches))]
            kept = {j: t for j, t in kept.items() if j in best}
        return scores, kept

    def _suffixes(self, schedule: Schedule, states: list[torch.Tensor], batch: Batch, slots: list[int], count: bool) -> list[list[torch.Tensor]]:
        """Candidates join at their slot (which they skip) and then run every later slot together, stacked on
        the batch axis; returns each candidate's states at the boundaries after its slot."""
        active: torch.Tensor | None = None
        history: list[torch.Tensor] = []  # stacked states after each slot from slots[0] on
        n = 0
        for t in range(slots[0], self.num_slots):
            if active is not None:
                active = self._run(schedule[t], active, batch.ctx, n, count)
                history.append(active)
            if t in slots:
                active = states[t] if active is None else torch.cat([active, states[t]])
                n += 1
                history[-1:] = [active] if history else [active]
        b = batch.hidden.shape[0]
        out = []
        for k, slot in enumerate(slots):  # candidate k joined at slot; history index t - slots[0] is boundary t + 1
            out.append([h[k * b:(k + 1) * b] for h in history[slot - slots[0]:]])
        return out

    @torch.no_grad()
    def score_schedules(self, schedules: list[Schedule], start: int, trace: Trace) -> list[float]:
        """D of schedules that agree with ``trace``'s schedule before slot ``start``."""
        out = []
        for schedule in schedules:
            finals = []
            for i, b in enumerate(self.batches):
                hidden = trace[i][start]
                for t in range(start, self.num_slots):
                    hidden = self._run(schedule[t], hidden, b.ctx, 1, i == 0)
                finals.append(hidden)
            out.append(self.discrepancy(finals))
        return out


# ----------------------------------------------------------------------------------------------- search


@dataclass
class Beam:
    order: tuple[int, ...]  # skipped slots, in the order they were chosen
    score: float
    trace: Trace | None = None  # cached slot-boundary states (not checkpointed)


@dataclass
class SearchState:
    step: int = 0
    beams: list[Beam] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)  # best beam after every step
    evaluations: int = 0
    naive_evaluations: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "beams": [{"order": list(b.order), "score": b.score} for b in self.beams],
            "history": self.history,
            "evaluations": self.evaluations,
            "naive_evaluations": self.naive_evaluations,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SearchState:
        beams = [Beam(tuple(b["order"]), b["score"]) for b in data["beams"]]
        return cls(data["step"], beams, data["history"], data["evaluations"], data["naive_evaluations"], data["seconds"])


def naive_cost(num_slots: int, skipped: int) -> int:
    """Sub-block evaluations of running a model with ``skipped`` empty slots from the start."""
    return num_slots - skipped


def skip_search(scorer: Scorer, sizes: list[int], total: int, target: float, beam: int, naive: bool = False,
                state: SearchState | None = None, on_step: Any = None) -> SearchState:
    """Beam search until the best beam removes at least ``target`` of the parameters (or one slot is left)."""
    n = scorer.num_slots
    state = state or SearchState(beams=[Beam((), 0.0, scorer.dense_trace)])

    def sparsity(order: tuple[int, ...]) -> float:
        return sum(sizes[i] for i in order) / total

    while sparsity(state.beams[0].order) < target and len(state.beams[0].order) < n - 1:
        start = time.perf_counter()
        before = scorer.evaluations
        candidates = _candidates(state.beams, n)
        for rank, parent in enumerate(state.beams):
            mine = {key: c for key, c in candidates.items() if c.parent == rank}
            free = sorted(c.slot for c in mine.values())
            traces: dict[int, Trace] = {}
            every = [j for j in range(n) if j not in parent.order]  # the naive method runs them all, repeats included
            state.naive_evaluations += len(every) * naive_cost(n, len(parent.order) + 1)
            if naive:
                all_scores = {j: scorer.discrepancy(scorer.finals(schedule_of(n, (*parent.order, j)))) for j in every}
                scores = {c.slot: all_scores[c.slot] for c in mine.values()}
            elif free:
                parent.trace = parent.trace or scorer.trace(schedule_of(n, parent.order))
                scores, traces = scorer.score_skips(schedule_of(n, parent.order), parent.trace, free, beam)
            for c in mine.values():
                c.beam.score, c.beam.trace = scores[c.slot], traces.get(c.slot)
        ranked = sorted((c.beam for c in candidates.values()), key=lambda b: (b.score, b.order))
        state.beams = ranked[:beam]
        state.step += 1
        state.evaluations += scorer.evaluations - before
        state.seconds += time.perf_counter() - start
        best = state.beams[0]
        state.history.append({"step": state.step, "order": list(best.order), "score": best.score,
                              "sparsity": sparsity(best.order), "evaluations": state.evaluations})
        if on_step:
            on_step(state)
    return state


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
    current = initial = scorer.discrepancy(scorer.finals(schedule_of(n, skip)))
    naive_count = naive_cost(n, len(skip))
    steps = []
    for slot in skip:
        sources = [s for s in (_nearest(slot, skipped, -2, n), _nearest(slot, skipped, 2, n)) if s is not None]
        if not sources:
            continue
        trials = [schedule_of(n, skip, reuse | {slot: s}) for s in sources]
        naive_count += sum(sum(src is not None for src in t) for t in trials)
        if naive:
            scores = [scorer.discrepancy(scorer.finals(t)) for t in trials]
        else:
            scores = scorer.score_schedules(trials, slot, scorer.trace(schedule_of(n, skip, reuse)))
        best = min(range(len(sources)), key=lambda i: (scores[i], sources[i]))
        accepted = scores[best] < current
        steps.append({"slot": slot, "tried": dict(zip(map(str, sources), scores)), "accepted": sources[best] if accepted else None})
        if accepted:
            reuse[slot], current = sources[best], scores[best]
    return reuse, initial, current, steps, naive_count


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


@dataclass(frozen=True)
class CalibrationConfig:
    out: Path
    sparsities: tuple[float, ...]
    model: Path | None = None
    subfolder: str | None = None
    random_weights: bool = False
    beam: int = 3
    prompts: Path | None = None
    num_prompts: int | None = None
    max_length: int = 256
    batch_size: int = 16
    projection: Path | None = None
    device: str = "cpu"
    precision: str = "fp32"
    naive: bool = False  # the reference method: every candidate runs the whole encoder
    force: bool = False  # replace existing plan files


def check_config(cfg: CalibrationConfig) -> None:
    if not cfg.sparsities:
        raise UserError("--sparsity: give at least one target, e.g. --sparsity 0.3 0.4")
    for s in cfg.sparsities:
        if not 0 < s < 1:
            raise UserError(f"--sparsity {s}: a target sparsity must lie in (0, 1)")
    if cfg.beam < 1:
        raise UserError(f"--beam {cfg.beam}: the beam width must be at least 1")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device}: no CUDA device on this machine; use --device cpu")
    if cfg.out.suffix != ".json":
        raise UserError(f"--out {cfg.out}: plan files end in .json")
    existing = [p for p in output_paths(cfg).values() if p.exists()]
    if existing and not cfg.force:
        raise UserError(f"{existing[0]} exists; pass --force to replace it")


def output_paths(cfg: CalibrationConfig) -> dict[float, Path]:
    if len(cfg.sparsities) == 1:
        return {cfg.sparsities[0]: cfg.out}
    return {s: cfg.out.with_name(f"{cfg.out.stem}-{s * 100:g}{cfg.out.suffix}") for s in sorted(set(cfg.sparsities))}


def calibrate(cfg: CalibrationConfig) -> dict[float, Plan]:
    """Run the calibration and write one plan file per target sparsity."""
    from .apply import sub_block_parameters
    from .inputs import load_tokenizer
    from .model import build_meta, load_config, load_encoder, model_source

    check_config(cfg)
    start = time.perf_counter()
    source = model_source(cfg.model, cfg.subfolder, cfg.random_weights)
    meta = build_meta(load_config(source))
    family, num_blocks = meta.adapter.family, meta.adapter.num_blocks(meta.config)
    sizes = [sum(p.numel() for _, p in block) for block in sub_block_parameters(meta)]
    total = sum(p.numel() for p in meta.model.parameters())
    most, least = (sum(sizes) - min(sizes)) / total, min(sizes) / total
    targets = output_paths(cfg)
    for s in targets:
        if not least <= s <= most:
            raise UserError(f"--sparsity {s}: not reachable for this model; a plan removes between {least:.4f} "
                            f"(one sub-block) and {most:.4f} (all but one) of its parameters")
    prompts = read_prompts(cfg.prompts, cfg.num_prompts)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    dense = Plan.dense(family, num_blocks)
    _check_memory(meta, dense, cfg)
    enc = load_encoder(source, dense, cfg.precision)
    projection = load_projection(cfg.projection, _hidden_size(enc.config)) if cfg.projection else None
    tokenizer = None if cfg.random_weights else load_tokenizer(source.folder)
    feeds = _feeds(tokenizer, enc.config, prompts, cfg.max_length, cfg.batch_size)
    for m in (enc.stem, enc.head, *enc.sub_blocks):
        m.to(cfg.device)
    # Candidates stacked on the batch axis: worth it on a GPU; on CPU one at a time is fastest
    # (MiniLM skip phase, 32 prompts, 2 cores: 38.4 s unstacked, 41.8 s by 2, 50.5 s by 8).
    scorer = Scorer(enc, feeds, projection, cfg.device, chunk=8 if cfg.device.startswith("cuda") else 1)

    config_hash = fingerprint(enc.config.to_dict())
    prompt_hash = fingerprint(prompts, cfg.max_length)
    checkpoint = cfg.out.with_name(cfg.out.name + ".calibration-checkpoint.json")
    key = fingerprint(config_hash, prompt_hash, cfg.beam, max(targets), cfg.precision, cfg.device, cfg.naive,
                      sha256_file(cfg.projection) if cfg.projection else None, cfg.random_weights)
    state = _resume(checkpoint, key)
    progress = _progress(round(max(targets) * total / (sum(sizes) / len(sizes))), state)

    def on_step(st: SearchState) -> None:
        _save_checkpoint(checkpoint, key, st)
        progress.update(1)
        progress.set_postfix(step=st.step, best=f"{st.beams[0].score:.4g}", sparsity=f"{st.history[-1]['sparsity']:.3f}")

    try:
        state = skip_search(scorer, sizes, total, max(targets), cfg.beam, cfg.naive, state, on_step)
    except KeyboardInterrupt:
        kept = f"checkpoint {checkpoint} kept" if checkpoint.is_file() else "no step had finished, nothing kept"
        raise Interrupted(f"calibration interrupted; {kept}; run the same command again to resume") from None
    finally:
        progress.close()
    order = state.beams[0].order
    plans = {}
    for target, path in targets.items():
        skip = skip_for(state, sizes, total, target)
        before = scorer.evaluations
        reuse, skip_score, score, reuse_steps, naive_reuse = reuse_search(scorer, skip, cfg.naive)
        sparsity = sum(sizes[i] for i in skip) / total
        provenance = {
            "tool": "skrr-export calibrate",
            "method": "Skrr: beam-search Skip, greedy Re-use (Seo et al., ICML 2025)",
            "metric": "MSE(dense, pruned) on the prompts + MSE on the empty prompt, padded tokens masked, after "
                      + (f"projection {cfg.projection.name}" if cfg.projection else "no projection (raw encoder output)"),
            "model": str(source.folder),
            "model_config_sha256": config_hash,
            "prompts": str(cfg.prompts) if cfg.prompts else "built-in calibration set",
            "prompt_set_sha256": prompt_hash,
            "num_prompts": len(prompts),
            "max_length": cfg.max_length,
            "beam": cfg.beam,
            "precision": cfg.precision,
            "device": cfg.device,
            "skip_order": list(order),
            "skip_steps": state.history,
            "skip_score": skip_score,
            "reuse_steps": reuse_steps,
            "score": score,
            "subblock_evaluations": state.evaluations + scorer.evaluations - before,
            "naive_subblock_evaluations": state.naive_evaluations + naive_reuse,
            "wall_seconds": round(time.perf_counter() - start, 2),
        }
        plan = Plan(family, num_blocks, skip=skip, reuse=reuse, sparsity=round(sparsity, 6), provenance=provenance)
        _write_json(path, plan.to_json())
        log.info("wrote %s: %d sub-blocks skipped, %d re-used, sparsity %.4f, D %.5g", path, len(skip), len(reuse), sparsity, score)
        plans[target] = plan
    checkpoint.unlink(missing_ok=True)
    return plans


def _check_memory(meta: Any, dense: Plan, cfg: CalibrationConfig) -> None:
    """Calibration holds the dense weights (plus cached states): refuse early when they cannot fit."""
    from .apply import plan_cost
    from .artifacts import check_device_memory, check_memory
    from .model import DTYPES

    meta.dtype = DTYPES[cfg.precision]
    weights = plan_cost(meta, dense).kept_weight_bytes
    if cfg.device.startswith("cuda"):
        check_device_memory(int(weights * 1.2), f"calibrating on {cfg.device} (dense weights {weights / 2**30:.1f} GiB)")
    check_memory(int(weights * 1.1) + (600 << 20), f"calibration (dense weights {weights / 2**30:.1f} GiB)")


def _hidden_size(config: Any) -> int:
    config = getattr(config, "text_config", config)
    return int(getattr(config, "d_model", None) or config.hidden_size)


def _feeds(tokenizer: Any, config: Any, prompts: list[str], max_length: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Calibration batches (padded to the longest in each), then the empty prompt as its own batch."""
    import numpy as np

    from .inputs import prompt_batch, random_ids

    feeds = []
    if tokenizer is not None:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            feeds.append((enc["input_ids"], enc["attention_mask"]))
        _, empty = prompt_batch(tokenizer, config, "int64", None)
    else:  # random-weights work: seeded ids of the calibration length, one batch per batch_size prompts
        rng = np.random.default_rng(0)
        for i in range(0, len(prompts), batch_size):
            n = min(batch_size, len(prompts) - i)
            ids = torch.from_numpy(random_ids(config, (n, max_length), rng))
            feeds.append((ids, torch.ones_like(ids)))
        _, empty = prompt_batch(None, config, "int64", None)
    feeds.append((torch.from_numpy(empty.feed["input_ids"]), torch.from_numpy(empty.feed["attention_mask"])))
    return feeds


def _resume(checkpoint: Path, key: str) -> SearchState | None:
    if not checkpoint.is_file():
        return None
    try:
        data = json.loads(checkpoint.read_text())
    except json.JSONDecodeError:
        raise ArtifactError(f"calibration checkpoint {checkpoint} is corrupt; delete it to start over") from None
    if data.get("key") != key:
        log.info("ignoring %s: it was made with other arguments", checkpoint.name)
        return None
    state = SearchState.from_json(data["state"])
    log.info("resuming calibration from %s at step %d", checkpoint.name, state.step)
    return state


def _save_checkpoint(path: Path, key: str, state: SearchState) -> None:
    _write_json(path, {"key": key, "state": state.to_json()})


def _write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def _progress(expected_steps: int, state: SearchState | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=expected_steps, initial=state.step if state else 0, desc="skip search", unit="step",
                disable=not log.isEnabledFor(logging.INFO))
