"""Held-out evaluation: the negative ELBO per token, its perplexity bound, accuracy by t bucket.

Deterministic by construction: a fixed subset of held-out rows, a fixed grid of t values (the
midpoints of K equal bins of [eps, 1], i.e. midpoint quadrature of the ELBO's integral over t)
and masks drawn from a generator seeded per (batch, grid point). The same model gives the same
numbers at every step of every run, so curves are comparable.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn.functional as F

from ldm.masking import apply_mask, get_schedule
from ldm.model import logits_at

BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)


def t_grid(points: int, eps: float) -> torch.Tensor:
    """Return `points` midpoints of equal bins of [eps, 1]."""
    return eps + (1.0 - eps) * (torch.arange(points, dtype=torch.float64) + 0.5) / points


@torch.no_grad()
def heldout_nelbo(
    model,
    batches: Iterable[Dict[str, Optional[torch.Tensor]]],
    *,
    schedule: str,
    eps: float,
    grid_points: int,
    mask_id: int,
    seed: int = 0,
    samples: int = 1,
) -> Dict[str, float]:
    """Return {nelbo, ppl_bound, acc_t<lo>-<hi>...} over `batches` (input_ids, maskable, attention_mask).

    nelbo is per maskable token: mean over t of w(t) * (sum of masked-token NLL) / maskable tokens.
    `samples` independent masks per grid point reduce the Monte Carlo noise.
    """
    sched = get_schedule(schedule)
    grid = t_grid(grid_points, eps)
    total_bound = 0.0
    total_tokens = 0.0
    correct = torch.zeros(len(BUCKETS) - 1, dtype=torch.float64)
    counted = torch.zeros(len(BUCKETS) - 1, dtype=torch.float64)
    for b, batch in enumerate(batches):
        ids = batch["input_ids"]
        maskable = batch.get("maskable")
        attention = batch.get("attention_mask")
        if maskable is None:
            maskable = attention.bool() if attention is not None else torch.ones_like(ids, dtype=torch.bool)
        total_tokens += float(maskable.sum())
        for k, t_value in enumerate(grid.tolist()):
            for s in range(samples):
                gen = torch.Generator(device=ids.device)
                gen.manual_seed(((seed * 7919 + b) * 1009 + k) * 131 + s)
                t = torch.full((ids.shape[0],), t_value, device=ids.device)
                noisy, masked = apply_mask(ids, maskable, t, sched, mask_id, gen)
                if not masked.any():
                    continue
                logits = logits_at(model, noisy, attention, masked).float()
                targets = ids[masked]
                nll = F.cross_entropy(logits, targets, reduction="sum")
                weight = float(sched.weight(torch.tensor(t_value, dtype=torch.float64)))
                total_bound += weight * float(nll) / (grid_points * samples)
                bucket = min(int(t_value * (len(BUCKETS) - 1)), len(BUCKETS) - 2)
                correct[bucket] += float((logits.argmax(-1) == targets).sum())
                counted[bucket] += float(masked.sum())
    nelbo = total_bound / max(total_tokens, 1.0)
    out = {"nelbo": nelbo, "ppl_bound": math.exp(min(nelbo, 700.0))}
    for i in range(len(BUCKETS) - 1):
        if counted[i] > 0:
            out[f"acc_t{BUCKETS[i]:.2f}-{BUCKETS[i + 1]:.2f}"] = float(correct[i] / counted[i])
    return out


def fixed_batches(data, num_batches: int, batch_size: int, collate: Callable, device):
    """Yield the first num_batches x batch_size rows of `data` (a fixed held-out subset)."""
    rows = min(len(data), num_batches * batch_size)
    view = data.with_format("numpy")
    for start in range(0, rows, batch_size):
        yield collate(view[start:min(start + batch_size, rows)], device)
