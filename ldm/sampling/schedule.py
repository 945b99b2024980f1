"""How many masked positions a sampling step commits: the fixed linear schedule, the adaptive
minimum used with a confidence threshold, and the ancestral (MDLM) unmasking probability."""

from __future__ import annotations

from typing import List

import torch


def commit_schedule(num_tokens: int, steps: int) -> List[int]:
    """Return the tokens to commit at each of `steps` steps: an even split, remainder first."""
    base, extra = divmod(num_tokens, steps)
    # Deterministic rounding keeps the total exact and the schedule reproducible; front-loading
    # the remainder matches LLaDA's linear schedule (arXiv:2502.09992), e.g. 10 in 4 -> 3,3,2,2.
    return [base + 1 if k < extra else base for k in range(steps)]


def commit_schedule_table(num_tokens: torch.Tensor, steps: int) -> torch.Tensor:
    """Return a [B, steps] long tensor: `commit_schedule` for each row's token count."""
    num_tokens = num_tokens.long()
    base = torch.div(num_tokens, steps, rounding_mode="floor")
    extra = num_tokens - base * steps
    k = torch.arange(steps, device=num_tokens.device)
    return base[:, None] + (k[None, :] < extra[:, None]).long()


def minimum_commits(remaining: torch.Tensor, steps_left: int) -> torch.Tensor:
    """Return, per row, the fewest commits this step that still fill `remaining` in `steps_left`."""
    # With a threshold the step budget is an upper bound: committing ceil(remaining / steps_left)
    # guarantees the block is full when its budget runs out, and is at least 1 while any mask
    # remains, so every step makes progress (Fast-dLLM, arXiv:2505.22618, commits >= 1 per step).
    return torch.div(remaining + steps_left - 1, steps_left, rounding_mode="floor")


def unmask_probability(step: int, steps: int) -> float:
    """Return (t - s) / t, the chance a masked position is revealed at `step` (MDLM ancestral)."""
    # t_k = 1 - k/steps and s = t_{k+1}: a masked token stays masked with probability s/t
    # (MDLM, arXiv:2406.07524), so every position is revealed by the last step (s = 0).
    t = 1.0 - step / steps
    s = 1.0 - (step + 1) / steps
    return (t - s) / t
