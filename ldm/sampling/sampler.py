"""Iterative unmasking for masked diffusion LMs: canvas = prompt + masks, fill it step by step.

Two rules. "commit" (LLaDA, arXiv:2502.09992): each step commits the most confident masked
positions of the current semi-autoregressive block, as many as the linear schedule says, or, with
a threshold, every position at least that sure (Fast-dLLM, arXiv:2505.22618). "original" (MDLM,
arXiv:2406.07524): each still-masked position is revealed with probability (t - s) / t, decided
before the model call so that a step revealing nothing costs nothing. In both, committed tokens
are never changed again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence, Union

import torch

from ldm.errors import ConfigError
from ldm.sampling.cache import BlockCache, check_cache_family, flops_estimate
from ldm.sampling.decode import (
    banned_token_mask,
    confidence,
    filter_logits,
    guided_logits,
    sample_tokens,
    token_probability,
    uniform_like,
)
from ldm.sampling.model import LogitsFn, SamplerModel, sampler_model
from ldm.sampling.schedule import commit_schedule_table, minimum_commits, unmask_probability
from ldm.sampling.settings import SamplerSettings

# What the sampler takes as its model: a SamplerModel (see ldm/sampling/model.py), or a bare
# logits function, which it treats as an opaque model.
ModelFn = Union[SamplerModel, LogitsFn]


@dataclass
class SamplerStep:
    """One step that ran: the answers after it and where it committed."""

    step: int  # index in the step budget, 0 .. steps-1; skipped steps leave gaps
    block: int  # semi-autoregressive block this step filled
    answer: torch.Tensor  # [B, max_new_tokens] long on CPU, mask_id where still masked
    committed: torch.Tensor  # [B, max_new_tokens] bool on CPU, True where this step committed
    nfe: int  # model calls so far, this step's included


@dataclass
class SampleResult:
    """What `generate` returns."""

    # Answer token ids per prompt. With early_stop, a finished answer is cut before its first
    # EOS (the EOS is not included); otherwise all max_new_tokens tokens, EOS included.
    tokens: List[List[int]]
    eos: List[bool]  # the answer holds an EOS with nothing masked before it
    committed: List[int]  # positions committed per prompt
    nfe: int  # model calls run; a guided (cfg_scale > 0) step counts 2, cond and uncond
    steps_run: int
    steps_skipped: int  # steps that would have committed nothing, so ran no model call
    answer: torch.Tensor  # [B, max_new_tokens] final answer region, mask_id where never filled
    history: List[SamplerStep] = field(default_factory=list)
    # Estimated forward FLOPs of the model calls (encoder + vocabulary head); 0 for an opaque
    # model (a bare logits function: the sampler cannot see inside it).
    flops: float = 0.0


@dataclass
class Canvas:
    """The working state of one sampler call: ids and attention [B, L], and what it has cost.

    `ban(vocab_size, device)` returns the [V] bool mask of ids never emitted; `uncond` marks the
    positions masked in guidance's unconditional input (None: no guidance possible); `view_from`
    is where the part a `SamplerStep` shows begins (the answer of `generate`, 0 for `infill`).
    """

    ids: torch.Tensor
    attn: torch.Tensor
    mask_id: int
    ban: Callable[[int, torch.device], torch.Tensor]
    uncond: Optional[torch.Tensor] = None
    view_from: int = 0
    active: Optional[torch.Tensor] = None  # [B] bool: rows still being filled
    nfe: int = 0
    steps_run: int = 0
    steps_skipped: int = 0
    flops: float = 0.0  # estimated FLOPs of the model calls so far (0 when the model is opaque)
    caches: dict = field(default_factory=dict)  # "cond" / "uncond" -> BlockCache
    _banned: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.active is None:
            self.active = torch.ones(self.ids.shape[0], dtype=torch.bool, device=self.ids.device)

    def banned(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """Return the [V] bool mask of ids never emitted, built once per call."""
        if self._banned is None:
            self._banned = self.ban(vocab_size, device)
        return self._banned


def unmask_block(
    model_fn: ModelFn,
    canvas: Canvas,
    lo: int,
    hi: int,
    steps: int,
    settings: SamplerSettings,
    *,
    block: int = 0,
    first_step: int = 0,
    generator: Optional[torch.Generator] = None,
    finished: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    on_step: Optional[Callable[[SamplerStep], None]] = None,
) -> None:
    """Fill the masked positions of `canvas.ids[:, lo:hi]` in at most `steps` model calls.

    The one unmasking loop: `generate` calls it per semi-autoregressive block, `infill` once over
    the whole canvas. Each step predicts every masked position of the block and commits some of
    them (the rule, schedule and threshold of `settings`); committed tokens never change. A step
    that would commit nothing is skipped without a model call. `finished(ids)` returns the rows
    that are done after a step (they leave later model calls); `on_step` sees each step run.
    """
    model = SamplerModel.of(model_fn)
    mask_id = canvas.mask_id
    fillable = canvas.attn[:, lo:hi].bool()
    masked_at_start = ((canvas.ids[:, lo:hi] == mask_id) & fillable & canvas.active[:, None]).sum(1)
    schedule = commit_schedule_table(masked_at_start, steps)
    for k in range(steps):
        still = (canvas.ids[:, lo:hi] == mask_id) & fillable & canvas.active[:, None]
        if not still.any():
            break  # the rest of this block's budget is an upper bound, not a quota
        reveal = None
        if settings.rule == "original":
            draw = uniform_like(still, torch.float64, generator)
            reveal = still & (draw < unmask_probability(k, steps))
            want = reveal.sum(1)
        elif settings.threshold is None and settings.rule != "entropy_bound":
            want = torch.minimum(schedule[:, k], still.sum(1))
        else:
            want = minimum_commits(still.sum(1), steps - k)
        rows = (want > 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            canvas.steps_skipped += 1
            continue

        # Only masked positions can be committed, so the head, the token choice and the scores
        # run on them alone: logits are [N, V], one row per candidate, in row-major order.
        candidates = still[rows]
        span = dict(rows=rows, lo=lo, hi=hi, block=block, settings=settings, where=candidates)
        logits = _block_logits(model, canvas, "cond", canvas.ids[rows], **span)
        canvas.nfe += 1
        if settings.cfg_scale > 0 and canvas.uncond is not None:
            # The unconditional pass sees another canvas, so it keeps its own cache.
            uncond_ids = canvas.ids[rows].masked_fill(canvas.uncond[rows], mask_id)
            uncond = _block_logits(model, canvas, "uncond", uncond_ids, **span)
            canvas.nfe += 1
            logits = guided_logits(logits, uncond, settings.cfg_scale)
        logits = logits.masked_fill(canvas.banned(logits.shape[-1], logits.device), float("-inf"))
        logits = filter_logits(logits, top_k=settings.top_k, top_p=settings.top_p)
        picked = sample_tokens(logits, settings.temperature, generator).to(canvas.ids.device)
        tokens = canvas.ids[rows, lo:hi].masked_scatter(candidates, picked)
        if reveal is not None:
            commit = reveal[rows]
        else:
            commit = most_confident(logits, picked, candidates, want[rows], settings.remasking,
                                    settings.threshold, generator, gamma=settings.gamma)
        canvas.ids[rows, lo:hi] = torch.where(commit, tokens, canvas.ids[rows, lo:hi])
        canvas.steps_run += 1

        if on_step is not None:
            committed = torch.zeros(canvas.ids.shape, dtype=torch.bool)
            committed[rows.cpu(), lo:hi] = commit.cpu()
            start = canvas.view_from
            on_step(SamplerStep(step=first_step + k, block=block,
                                answer=canvas.ids[:, start:].cpu().clone(),
                                committed=committed[:, start:], nfe=canvas.nfe))
        if finished is not None:
            canvas.active &= ~finished(canvas.ids)
            for cache in canvas.caches.values():
                cache.retire(~canvas.active)  # finished rows are never asked for again


@torch.inference_mode()
def generate(
    model_fn: ModelFn,
    prompts: Union[Sequence[Sequence[int]], torch.Tensor],
    settings: SamplerSettings,
    *,
    mask_id: int,
    eos_id: int,
    special_ids: Iterable[int] = (),
    pad_id: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[torch.device, str]] = None,
    record_history: bool = True,
    on_step: Optional[Callable[[SamplerStep], None]] = None,
) -> SampleResult:
    """Return the answers sampled for a batch of prompts (lists of ids, or left-padded ids).

    `settings` were validated when built; only the prompts' length is checked here, against
    `settings.prompt_budget`, before any model call.
    """
    model = SamplerModel.of(model_fn)
    prompt_ids, prompt_mask = _left_padded(prompts, attention_mask, pad_id, device)
    settings.check_prompt(prompt_ids.shape[1])
    check_model_cache(model, settings)
    batch, start = prompt_ids.shape
    new = settings.max_new_tokens
    answer_masks = torch.full((batch, new), mask_id, dtype=torch.long, device=prompt_ids.device)
    attn = torch.cat([prompt_mask, torch.ones_like(answer_masks)], dim=1)
    # Guidance's unconditional input is the same canvas with the real prompt tokens masked.
    uncond = torch.cat([prompt_mask.bool(), torch.zeros_like(answer_masks).bool()], 1)

    def ban(vocab_size: int, dev: torch.device) -> torch.Tensor:
        return banned_token_mask(vocab_size, mask_id=mask_id, eos_id=eos_id,
                                 special_ids=special_ids, pad_id=pad_id, device=dev)

    canvas = Canvas(torch.cat([prompt_ids, answer_masks], dim=1), attn, mask_id, ban,
                    uncond=uncond, view_from=start)
    history: List[SamplerStep] = []
    record = record_steps(history, record_history, on_step)

    def finished(ids: torch.Tensor) -> torch.Tensor:
        return finished_answers(ids[:, start:], mask_id, eos_id)

    for b in range(settings.num_blocks):
        lo = start + b * settings.block
        unmask_block(model, canvas, lo, lo + settings.block, settings.block_steps, settings,
                     block=b, first_step=b * settings.block_steps, generator=generator,
                     finished=finished if settings.early_stop else None, on_step=record)
        if not canvas.active.any():
            break

    answer = canvas.ids[:, start:].cpu()
    eos = finished_answers(answer, mask_id, eos_id)
    rows_out = [row.tolist() for row in answer]
    return SampleResult(
        tokens=[
            row[: row.index(eos_id)] if settings.early_stop and done else row
            for row, done in zip(rows_out, eos.tolist())
        ],
        eos=eos.tolist(),
        committed=(answer != mask_id).sum(1).tolist(),
        nfe=canvas.nfe,
        steps_run=canvas.steps_run,
        steps_skipped=canvas.steps_skipped,
        answer=answer,
        history=history,
        flops=canvas.flops,
    )


def check_model_cache(model_fn: ModelFn, settings: SamplerSettings) -> None:
    """Raise ConfigError if settings.cache needs layers the model behind `model_fn` lacks."""
    if settings.cache != "none":
        check_cache_family(settings.cache, SamplerModel.of(model_fn).family)


def _block_logits(model: SamplerModel, canvas: "Canvas", key: str, ids: torch.Tensor, *,
                  rows: torch.Tensor, lo: int, hi: int, block: int, settings: SamplerSettings,
                  where: torch.Tensor) -> torch.Tensor:
    """Return float logits [N, V] of the positions `where` marks (bool [R, hi - lo]) in the
    block [lo, hi) of `ids` (rows of the canvas), row-major."""
    attn = canvas.attn[rows]
    if model.model is None or settings.cache == "none":
        if model.model is not None:
            # The head runs on the block's masked positions alone: nothing else can be committed.
            canvas.flops += flops_estimate(model.model.config, ids.shape[0], ids.shape[1],
                                           ids.shape[1], 0)
            canvas.flops += flops_estimate(model.model.config, 1, 0, 0, int(where.sum()))
        return model.block_logits(ids, attn, lo, hi, where).float()
    if key not in canvas.caches:
        canvas.caches[key] = BlockCache(model, settings.cache, canvas.ids.shape[0],
                                        refresh_every_step=settings.cache_refresh_every_step)
    cache = canvas.caches[key]
    before = cache.flops
    logits = cache.logits(ids, attn, rows, lo, hi, block, where).float()
    canvas.flops += cache.flops - before
    return logits


def record_steps(history: List[SamplerStep], record_history: bool,
              on_step: Optional[Callable[[SamplerStep], None]]
              ) -> Optional[Callable[[SamplerStep], None]]:
    """Return the per-step callback that appends to `history` and calls `on_step` (or None)."""
    if not record_history and on_step is None:
        return None

    def record(step: SamplerStep) -> None:
        if record_history:
            history.append(step)
        if on_step is not None:
            on_step(step)

    return record


def finished_answers(answer: torch.Tensor, mask_id: int, eos_id: int) -> torch.Tensor:
    """Return a [B] bool tensor: True where the answer has an EOS and no mask before it."""
    is_eos = answer == eos_id
    length = answer.shape[1]
    positions = torch.arange(length, device=answer.device)
    first_eos = torch.where(is_eos, positions, length).min(dim=1).values
    masked_before = ((answer == mask_id) & (positions[None, :] < first_eos[:, None])).any(1)
    return is_eos.any(1) & ~masked_before


def most_confident(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    candidates: torch.Tensor,
    want: torch.Tensor,
    remasking: str,
    threshold: Optional[float],
    generator: Optional[torch.Generator],
    gamma: Optional[float] = None,
) -> torch.Tensor:
    """Return a bool [R, block] tensor: per row, the `want` best-scored candidate positions.

    `logits` [N, V] and `tokens` [N] are the candidates' (the True positions of `candidates`
    [R, block], row-major).
    """

    def spread(values: torch.Tensor, fill) -> torch.Tensor:
        # per-candidate values back onto the [R, block] grid, `fill` elsewhere
        grid = torch.full(candidates.shape, fill, dtype=values.dtype, device=values.device)
        return grid.masked_scatter(candidates.to(values.device), values)

    # one float64 softmax per step, shared by the score, the entropy bound and the threshold
    probs = (None if remasking == "random" and gamma is None and threshold is None
             else torch.softmax(logits.double(), dim=-1))
    # non-candidates score -inf (never chosen) and count infinite entropy (never within gamma)
    score = spread(confidence(logits, tokens, remasking, generator, probs=probs), float("-inf"))
    if gamma is not None:
        # Entropy-bounded commits (EB-sampler, Ben-Hamu et al. 2025): the best-scored candidates
        # while their summed entropy stays <= gamma; `want` (>= 1) is the floor.
        entropy = spread(torch.special.entr(probs).sum(-1), float("inf"))
        order = torch.argsort(score, dim=1, descending=True, stable=True)
        want = torch.maximum(want, (entropy.gather(1, order).cumsum(1) <= gamma).sum(1))
    if threshold is not None:
        sure = spread(token_probability(probs, tokens) >= threshold, False)
        want = torch.maximum(want, sure.sum(1))
        score = score.masked_fill(sure, float("inf"))
    # A stable sort breaks ties by position, so equal scores commit left to right and a row's
    # choice never depends on the other rows of its batch.
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    ranks = torch.arange(score.shape[1], device=score.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    return candidates & (rank < want[:, None])


def _left_padded(
    prompts: Union[Sequence[Sequence[int]], torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    pad_id: Optional[int],
    device: Optional[Union[torch.device, str]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (ids, attention mask), both [B, P] long, with every prompt flush right."""
    if isinstance(prompts, torch.Tensor):
        ids = prompts.long().to(device or prompts.device)
        ids = ids[None] if ids.dim() == 1 else ids
        if attention_mask is None:
            return ids, torch.ones_like(ids)
        mask = attention_mask.long().to(ids.device).reshape(ids.shape)
        if (mask[:, 1:] < mask[:, :-1]).any():
            raise ConfigError(
                "prompts must be left-padded: each attention_mask row must be 0s then 1s"
            )
        return ids, mask
    rows = [[int(t) for t in p] for p in prompts]
    if not rows:
        raise ConfigError("prompts is empty; pass at least one prompt")
    width = max(len(r) for r in rows)
    if pad_id is None and any(len(r) != width for r in rows):
        raise ConfigError("prompts have different lengths; pass pad_id so they can be left-padded")
    fill = 0 if pad_id is None else pad_id
    ids = [[fill] * (width - len(r)) + r for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    shape, dev = (len(rows), width), device or "cpu"
    return (
        torch.tensor(ids, dtype=torch.long, device=dev).reshape(shape),
        torch.tensor(mask, dtype=torch.long, device=dev).reshape(shape),
    )
