"""The masked-diffusion training objective: a Monte Carlo estimate of the negative ELBO.

For a clean sequence x, a time t and the noisy x_t from `ldm.masking.apply_mask`, the bound is
  -log p(x) <= E_t E_{x_t} [ w(t) * sum_{masked i} -log p_theta(x_i | x_t) ],
with w(t) = -alpha'(t) / (1 - alpha(t)) (MDLM arXiv:2406.07524, eq. 10; 1/t for LLaDA's linear
schedule, arXiv:2502.09992, eq. 3). The normaliser decides what the summed bound is divided by:
  token     all token positions of the batch (LLaDA pretraining: B * L, or the real tokens)
  sequence  each sequence by its maskable-token count, then mean over sequences (LLaDA SFT,
            eq. 5: the answer length)
  masked    the number of masked tokens (a per-masked-token average; a biased, lower-variance
            estimate, useful for monitoring rather than as the ELBO)
  maskable  the batch's maskable tokens together (answers and their EOS padding): a per-answer-
            token ELBO over the whole micro-batch, the normalisation of dLLM's MDLM trainer
            (its loss_norm_type "token", which counts the positions whose label is not -100)
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ldm.masking import Schedule, apply_mask, check_normalizer, get_schedule, sample_times
from ldm.model import logits_at

def diffusion_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    schedule: Union[str, Schedule],
    normalizer: str,
    maskable: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Return the normalised negative-ELBO loss (a 0-d tensor) for one noised batch.

    `logits` are either sparse [N, V] rows for the N True entries of `masked` (row-major order,
    as `masked_logits` returns them) or dense [B, L, V]. `input_ids` are the clean targets.
    """
    check_normalizer(normalizer)
    masked = masked.bool()
    if logits.dim() == 3:
        logits = logits[masked]
    batch_size, length = input_ids.shape
    # Cross-entropy in float32: bf16 log-softmax over a 50k vocabulary loses the small terms.
    token_nll = F.cross_entropy(logits.float(), input_ids[masked], reduction="none")
    rows = torch.arange(batch_size, device=input_ids.device)[:, None].expand(batch_size, length)
    masked_rows = rows[masked]
    row_weight = get_schedule(schedule).weight(t.float().to(token_nll.device))
    weighted = row_weight[masked_rows] * token_nll

    # With nothing masked every sum below is an empty sum: 0, still attached to the model's graph
    # (the head ran on zero rows), so backward works and yields zero gradients, never NaN.
    # Denominators stay tensors: converting them to Python numbers would wait on the GPU.
    if normalizer == "token":
        if attention_mask is None:
            return weighted.sum() / (batch_size * length)
        return weighted.sum() / attention_mask.sum().clamp(min=1).to(weighted)
    if normalizer == "masked":
        return weighted.sum() / masked.sum().clamp(min=1).to(weighted)
    if maskable is None:
        raise ValueError(f"normalizer={normalizer!r} needs the maskable mask (the answer tokens)")
    if normalizer == "maskable":
        return weighted.sum() / maskable.bool().sum().clamp(min=1).to(weighted)
    per_sequence = torch.zeros(batch_size, device=weighted.device, dtype=weighted.dtype)
    per_sequence = per_sequence.index_add(0, masked_rows, weighted)
    lengths = maskable.bool().sum(dim=1).to(weighted)
    has_answer = (lengths > 0).to(weighted)
    # Sequences without answer tokens contribute 0 / 1 and are left out of the mean's count.
    return (per_sequence / lengths.clamp(min=1)).sum() / has_answer.sum().clamp(min=1)


def diffusion_step(
    model: nn.Module,
    input_ids: torch.Tensor,
    maskable: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    schedule: Union[str, Schedule],
    time_sampling: str,
    eps: float,
    mask_id: int,
    normalizer: str,
    generator: Optional[torch.Generator] = None,
    sparse: bool = True,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Return (loss, stats) for one forward pass: sample t, mask, predict, weigh the ELBO terms.

    `model` is a transformers masked LM, or a `SparseMaskedLM` (possibly inside DDP/FSDP/compile
    wrappers, which is what distributed training needs). `maskable` None means every real token
    (pretraining). `stats` holds detached 0-d tensors `masked_fraction` (masked / maskable),
    `num_masked` and `mean_t`; the caller decides when to move them to the host, since `.item()`
    on a GPU waits for the step to finish.
    """
    check_normalizer(normalizer)
    schedule = get_schedule(schedule)
    if maskable is None:
        maskable = (attention_mask.bool() if attention_mask is not None
                    else torch.ones_like(input_ids, dtype=torch.bool))
    elif attention_mask is not None:
        maskable = maskable.bool() & attention_mask.bool()  # padding is never a target
    t = sample_times(input_ids.shape[0], time_sampling, eps, generator, input_ids.device)
    noisy_ids, masked = apply_mask(input_ids, maskable, t, schedule, mask_id, generator)
    logits = logits_at(model, noisy_ids, attention_mask, masked, sparse=sparse)
    loss = diffusion_loss(logits, input_ids, masked, t, schedule, normalizer, maskable,
                          attention_mask)
    num_masked = masked.sum()
    stats = {
        "masked_fraction": (num_masked / maskable.sum().clamp(min=1)).detach().float(),
        "num_masked": num_masked.detach(),
        "mean_t": t.mean().detach(),
    }
    return loss, stats
