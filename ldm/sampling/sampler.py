"""Iterative unmasking for masked diffusion LMs: canvas = prompt + masks, fill it step by step.

Two rules. "commit" (LLaDA, arXiv:2502.09992): each step commits the most confident masked
positions of the current semi-autoregressive block, as many as the linear schedule says, or, with
a threshold, every position at least that sure (Fast-dLLM, arXiv:2505.22618). "original" (MDLM,
arXiv:2406.07524): each still-masked position is revealed with probability (t - s) / t, decided
before the model call so that a step revealing nothing costs nothing. In both, committed tokens
are never changed again.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence, Union

import torch

from ldm.errors import ConfigError
from ldm.sampling.cache import BlockCache, block_logits, check_cache_family, flops_estimate
from ldm.sampling.decode import (
    banned_token_mask,
    confidence,
    filter_logits,
    guided_logits,
    sample_tokens,
    token_probability,
    uniform_like,
)
from ldm.sampling.schedule import commit_schedule_table, minimum_commits, unmask_probability
from ldm.sampling.validation import validate_sampler_args

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    # Estimated forward FLOPs of the model calls (encoder + vocabulary head); 0 for a model
    # function that is not a transformers masked LM (the sampler cannot see inside it).
    flops: float = 0.0


def hf_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """Return a `(input_ids, attention_mask) -> logits [B, L, V]` function for a HF masked LM."""
    try:
        takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # some wrappers hide the signature; assume HF's usual one
        takes_positions = True

    def logits_fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if takes_positions:
            # Count positions from each row's first real token: otherwise left padding would
            # shift every absolute position, and an answer would depend on its batch-mates.
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits

    # The sampler reads the model behind the function to run the vocabulary head on the current
    # block only and, with sampler.cache, to drive the layers itself (ldm.sampling.cache).
    logits_fn.model = model if takes_positions else None
    return logits_fn


@torch.inference_mode()
def generate(
    model_fn: LogitsFn,
    prompts: Union[Sequence[Sequence[int]], torch.Tensor],
    *,
    mask_id: int,
    eos_id: int,
    special_ids: Iterable[int] = (),
    pad_id: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
    max_new_tokens: int = 64,
    steps: int = 64,
    block_length: Optional[int] = 32,
    remasking: str = "low_confidence",
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    cfg_scale: float = 0.0,
    threshold: Optional[float] = None,
    early_stop: bool = True,
    rule: str = "commit",
    cache: str = "none",
    gamma: Optional[float] = None,
    cache_refresh_every_step: bool = False,
    generator: Optional[torch.Generator] = None,
    max_positions: Optional[int] = None,
    device: Optional[Union[torch.device, str]] = None,
    record_history: bool = True,
    on_step: Optional[Callable[[SamplerStep], None]] = None,
) -> SampleResult:
    """Return the answers sampled for a batch of prompts (lists of ids, or left-padded ids)."""
    prompt_ids, prompt_mask = _left_padded(prompts, attention_mask, pad_id, device)
    num_blocks = validate_sampler_args(
        prompt_length=prompt_ids.shape[1],
        max_new_tokens=max_new_tokens,
        steps=steps,
        block_length=block_length,
        remasking=remasking,
        rule=rule,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        cfg_scale=cfg_scale,
        threshold=threshold,
        max_positions=max_positions,
        cache=cache,
        gamma=gamma,
    )
    model = getattr(model_fn, "model", None)
    if cache != "none":
        check_cache_family(cache, getattr(getattr(model, "config", None), "model_type", None))
    caches: dict = {}
    flops = 0.0
    batch, start = prompt_ids.shape
    block, block_steps = max_new_tokens // num_blocks, steps // num_blocks
    answer_masks = torch.full((batch, max_new_tokens), mask_id, dtype=torch.long)
    canvas = torch.cat([prompt_ids, answer_masks.to(prompt_ids.device)], dim=1)
    attn = torch.cat([prompt_mask, torch.ones_like(answer_masks).to(prompt_mask.device)], dim=1)
    # Guidance's unconditional input is the same canvas with the real prompt tokens masked.
    prompt_positions = torch.cat([prompt_mask.bool(), torch.zeros_like(attn[:, start:]).bool()], 1)
    active = torch.ones(batch, dtype=torch.bool, device=canvas.device)
    banned: Optional[torch.Tensor] = None
    nfe = steps_run = steps_skipped = 0
    history: List[SamplerStep] = []

    for b in range(num_blocks):
        lo, hi = start + b * block, start + (b + 1) * block
        masked_at_start = ((canvas[:, lo:hi] == mask_id) & active[:, None]).sum(1)
        schedule = commit_schedule_table(masked_at_start, block_steps)
        for k in range(block_steps):
            still = (canvas[:, lo:hi] == mask_id) & active[:, None]
            if not still.any():
                break  # the rest of this block's budget is an upper bound, not a quota
            reveal = None
            if rule == "original":
                draw = uniform_like(still, torch.float64, generator)
                reveal = still & (draw < unmask_probability(k, block_steps))
                want = reveal.sum(1)
            elif threshold is None and rule != "entropy_bound":
                want = torch.minimum(schedule[:, k], still.sum(1))
            else:
                want = minimum_commits(still.sum(1), block_steps - k)
            rows = (want > 0).nonzero().squeeze(1)
            if rows.numel() == 0:
                steps_skipped += 1
                continue

            span = dict(rows=rows, lo=lo, hi=hi, block=b, cache=cache, caches=caches,
                        refresh=cache_refresh_every_step)
            logits, cost = _block_logits(model_fn, model, "cond", canvas[rows], attn, **span)
            nfe += 1
            flops += cost
            if cfg_scale > 0:
                # The unconditional pass sees another canvas, so it keeps its own cache.
                uncond_ids = canvas[rows].masked_fill(prompt_positions[rows], mask_id)
                uncond, cost = _block_logits(model_fn, model, "uncond", uncond_ids, attn, **span)
                nfe += 1
                flops += cost
                logits = guided_logits(logits, uncond, cfg_scale)
            if banned is None:
                banned = banned_token_mask(
                    logits.shape[-1],
                    mask_id=mask_id,
                    eos_id=eos_id,
                    special_ids=special_ids,
                    pad_id=pad_id,
                    device=logits.device,
                )
            logits = logits.masked_fill(banned, float("-inf"))
            logits = filter_logits(logits, top_k=top_k, top_p=top_p)
            tokens = sample_tokens(logits, temperature, generator).to(canvas.device)
            if reveal is not None:
                commit = reveal[rows]
            else:
                commit = _most_confident(
                    logits, tokens, still[rows], want[rows], remasking, threshold, generator,
                    gamma=gamma if rule == "entropy_bound" else None,
                )
            canvas[rows, lo:hi] = torch.where(commit, tokens, canvas[rows, lo:hi])
            steps_run += 1

            if record_history or on_step is not None:
                committed = torch.zeros(batch, max_new_tokens, dtype=torch.bool)
                committed[rows.cpu(), lo - start : hi - start] = commit.cpu()
                snapshot = SamplerStep(
                    step=b * block_steps + k,
                    block=b,
                    answer=canvas[:, start:].cpu().clone(),
                    committed=committed,
                    nfe=nfe,
                )
                if record_history:
                    history.append(snapshot)
                if on_step is not None:
                    on_step(snapshot)
            if early_stop:
                active &= ~finished_answers(canvas[:, start:], mask_id, eos_id)
        if not active.any():
            break

    answer = canvas[:, start:].cpu()
    eos = finished_answers(answer, mask_id, eos_id)
    rows_out = [row.tolist() for row in answer]
    return SampleResult(
        tokens=[
            row[: row.index(eos_id)] if early_stop and done else row
            for row, done in zip(rows_out, eos.tolist())
        ],
        eos=eos.tolist(),
        committed=(answer != mask_id).sum(1).tolist(),
        nfe=nfe,
        steps_run=steps_run,
        steps_skipped=steps_skipped,
        answer=answer,
        history=history,
        flops=flops,
    )


def _block_logits(model_fn: LogitsFn, model: Optional[torch.nn.Module], key: str,
                  ids: torch.Tensor, attn: torch.Tensor, *, rows: torch.Tensor, lo: int, hi: int,
                  block: int, cache: str, caches: dict, refresh: bool
                  ) -> tuple[torch.Tensor, float]:
    """Return (float logits [R, hi - lo, V] of the current block, estimated FLOPs of the call)."""
    if model is None:
        return model_fn(ids, attn[rows])[:, lo:hi].float(), 0.0
    if cache == "none":
        # The head runs on the block alone: the rest of the canvas cannot be committed this step.
        cost = flops_estimate(model.config, ids.shape[0], ids.shape[1], ids.shape[1], hi - lo)
        return block_logits(model, ids, attn[rows], lo, hi).float(), cost
    if key not in caches:
        caches[key] = BlockCache(model, cache, attn.shape[0], refresh_every_step=refresh)
    before = caches[key].flops
    logits = caches[key].logits(ids, attn[rows], rows, lo, hi, block).float()
    return logits, caches[key].flops - before


def finished_answers(answer: torch.Tensor, mask_id: int, eos_id: int) -> torch.Tensor:
    """Return a [B] bool tensor: True where the answer has an EOS and no mask before it."""
    is_eos = answer == eos_id
    length = answer.shape[1]
    positions = torch.arange(length, device=answer.device)
    first_eos = torch.where(is_eos, positions, length).min(dim=1).values
    masked_before = ((answer == mask_id) & (positions[None, :] < first_eos[:, None])).any(1)
    return is_eos.any(1) & ~masked_before


def _most_confident(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    candidates: torch.Tensor,
    want: torch.Tensor,
    remasking: str,
    threshold: Optional[float],
    generator: Optional[torch.Generator],
    gamma: Optional[float] = None,
) -> torch.Tensor:
    """Return a bool [R, block] tensor: per row, the `want` best-scored candidate positions."""
    score = confidence(logits, tokens, remasking, generator)
    if gamma is not None:
        # Entropy-bounded commits (EB-sampler, Ben-Hamu et al. 2025): the best-scored candidates
        # while their summed entropy stays <= gamma; `want` (>= 1) is the floor.
        entropy = torch.special.entr(torch.softmax(logits.double(), dim=-1)).sum(-1)
        order = torch.argsort(score.masked_fill(~candidates, float("-inf")), dim=1,
                              descending=True, stable=True)
        ordered = entropy.gather(1, order).masked_fill(~candidates.gather(1, order), float("inf"))
        want = torch.maximum(want, (ordered.cumsum(1) <= gamma).sum(1))
    if threshold is not None:
        probs = torch.softmax(logits.double(), dim=-1)
        sure = candidates & (token_probability(probs, tokens) >= threshold)
        want = torch.maximum(want, sure.sum(1))
        score = score.masked_fill(sure, float("inf"))
    score = score.masked_fill(~candidates, float("-inf"))
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
