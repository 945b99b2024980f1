"""Infilling: fill the mask tokens inside a given canvas, reading the text on both sides.

`generate` appends masks after a prompt; here the masks are already in place ([MASK:N] spans).
The commit rule is the sampler's "commit" rule over one block holding every masked position:
each step predicts all masks and commits the most confident ones (as many as the linear
schedule says, or every one above the threshold); text tokens and committed tokens never change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence

import torch

from ldm.errors import ConfigError
from ldm.sampling.decode import REMASKING, filter_logits, sample_tokens
from ldm.sampling.sampler import LogitsFn, SamplerStep, _most_confident
from ldm.sampling.schedule import commit_schedule_table, minimum_commits


@dataclass
class InfillResult:
    """What `infill` returns."""

    tokens: List[List[int]]  # each canvas with its masks filled, unpadded
    nfe: int
    steps_run: int
    steps_skipped: int
    history: List[SamplerStep] = field(default_factory=list)  # .answer is the padded canvas


@torch.inference_mode()
def infill(
    model_fn: LogitsFn,
    canvases: Sequence[Sequence[int]],
    *,
    mask_id: int,
    pad_id: int,
    banned_ids: Iterable[int] = (),
    steps: int = 64,
    remasking: str = "low_confidence",
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    threshold: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device | str] = None,
    record_history: bool = True,
    on_step: Optional[Callable[[SamplerStep], None]] = None,
) -> InfillResult:
    """Return the canvases with every mask_id position filled in at most `steps` model calls."""
    if steps < 1:
        raise ConfigError(f"sampler.steps={steps} must be >= 1")
    if remasking not in REMASKING:
        raise ConfigError(f"sampler.remasking={remasking!r} is unknown; accepted: {REMASKING}")
    rows = [[int(t) for t in c] for c in canvases]
    width = max(len(r) for r in rows)
    canvas = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long,
                          device=device).reshape(len(rows), width)
    attn = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long,
                        device=device).reshape(len(rows), width)
    fillable = (canvas == mask_id) & attn.bool()
    schedule = commit_schedule_table(fillable.sum(1), steps)
    banned: Optional[torch.Tensor] = None
    nfe = steps_run = steps_skipped = 0
    history: List[SamplerStep] = []

    for k in range(steps):
        still = (canvas == mask_id) & fillable
        if not still.any():
            break
        if threshold is None:
            want = torch.minimum(schedule[:, k], still.sum(1))
        else:
            want = minimum_commits(still.sum(1), steps - k)
        active = (want > 0).nonzero().squeeze(1)
        if active.numel() == 0:
            steps_skipped += 1
            continue
        logits = model_fn(canvas[active], attn[active]).float()
        nfe += 1
        if banned is None:
            # A span is filled with exactly N words: no mask, no special token, not even EOS.
            banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            ids = [i for i in {mask_id, pad_id, *banned_ids} if 0 <= i < logits.shape[-1]]
            banned[torch.tensor(ids, device=logits.device)] = True
        logits = filter_logits(logits.masked_fill(banned, float("-inf")), top_k=top_k, top_p=top_p)
        tokens = sample_tokens(logits, temperature, generator).to(canvas.device)
        commit = _most_confident(logits, tokens, still[active], want[active], remasking,
                                 threshold, generator)
        canvas[active] = torch.where(commit, tokens, canvas[active])
        steps_run += 1
        if record_history or on_step is not None:
            committed = torch.zeros(canvas.shape, dtype=torch.bool)
            committed[active.cpu()] = commit.cpu()
            snapshot = SamplerStep(step=k, block=0, answer=canvas.cpu().clone(),
                                   committed=committed, nfe=nfe)
            if record_history:
                history.append(snapshot)
            if on_step is not None:
                on_step(snapshot)

    out = canvas.cpu()
    return InfillResult(
        tokens=[out[i, width - len(r):].tolist() for i, r in enumerate(rows)],
        nfe=nfe, steps_run=steps_run, steps_skipped=steps_skipped, history=history,
    )
