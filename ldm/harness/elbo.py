"""The Monte Carlo ELBO of a continuation given its context, for a masked diffusion model.

A masked diffusion model has no exact log-likelihood; LLaDA (arXiv:2502.09992) scores a
continuation x of L tokens after a context c with the lower bound

    log p(x | c) >= E_{k ~ U{1..L}} E_{S: k-subset} [ (L / k) * sum_{i in S} log p(x_i | c, x_S) ]

where x_S is x with the positions in S masked.

Each Monte Carlo sample masks k continuation tokens (never context tokens) and weights the
log-probabilities of the masked tokens by L / k. The k of the `mc_num` samples of one request
are stratified (a random offset, then every value of 1..L in turn) rather than drawn
independently, which removes most of the variance that comes from k.

Numbers never depend on batching: each request's masks come from a generator seeded by the
request's own ids, rows are right-padded (positions unchanged, padding never attended to), and
the per-request sums are taken in sample order.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ldm.errors import ConfigError

# (input_ids [B, W], attention_mask [B, W], positions [B, W] bool) -> logits [N, V] at positions
LogitsAt = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def model_logits_at(model) -> LogitsAt:
    """Return a LogitsAt for a transformers masked LM (logits computed at the positions only)."""
    from ldm.model import logits_at

    def fn(ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return logits_at(model, ids, attention, positions)

    return fn


def request_seed(seed: int, context: Sequence[int], continuation: Sequence[int]) -> int:
    """Return a seed that depends only on `seed` and the request's token ids."""
    data = ",".join(map(str, context)).encode() + b"|" + ",".join(map(str, continuation)).encode()
    return (seed * 1_000_003 + zlib.crc32(data)) % (2 ** 63)


def stratified_ks(length: int, mc_num: int, generator: torch.Generator) -> List[int]:
    """Return mc_num mask counts in 1..length: a random start, then every count in turn."""
    offset = int(torch.randint(length, (1,), generator=generator))
    return [(offset + j) % length + 1 for j in range(mc_num)]


@dataclass
class _Row:
    request: int
    ids: List[int]  # context + continuation, the masked continuation positions set to mask_id
    targets: List[Tuple[int, int]]  # (position, true token) of each masked position
    weight: float  # L / k
    context_length: int


def _rows(requests: Sequence[Tuple[Sequence[int], Sequence[int]]], mask_id: int, mc_num: int,
          seed: int) -> List[_Row]:
    rows = []
    for r, (context, continuation) in enumerate(requests):
        length = len(continuation)
        gen = torch.Generator().manual_seed(request_seed(seed, context, continuation))
        for k in stratified_ks(length, mc_num, gen):
            chosen = torch.randperm(length, generator=gen)[:k].sort().values.tolist()
            ids = list(context) + list(continuation)
            for i in chosen:
                ids[len(context) + i] = mask_id
            rows.append(_Row(r, ids, [(len(context) + i, continuation[i]) for i in chosen],
                             length / k, len(context)))
    return rows


@torch.no_grad()
def _score_rows(logits_at: LogitsAt, rows: Sequence[_Row], *, mask_id: int, pad_id: int,
                cfg_scale: float, device) -> List[float]:
    """Return, per row, the sum of log p(true token) over its masked positions."""
    from ldm.sampling.decode import guided_logits

    width = max(len(row.ids) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.bool)
    targets = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row.ids)] = torch.tensor(row.ids)
        attention[b, :len(row.ids)] = 1
        for pos, token in row.targets:
            positions[b, pos], targets[b, pos] = True, token
    ids, attention, positions = ids.to(device), attention.to(device), positions.to(device)
    logits = logits_at(ids, attention, positions).float()
    if cfg_scale > 0:
        # the unconditional input: the same row with every context token masked
        context = torch.zeros_like(positions)
        for b, row in enumerate(rows):
            context[b, :row.context_length] = True
        uncond = logits_at(ids.masked_fill(context, mask_id), attention, positions).float()
        logits = guided_logits(logits, uncond, cfg_scale)
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(1, targets.to(device)[positions][:, None]).squeeze(1).cpu().double()
    per_row = [0.0] * len(rows)
    owners = positions.cpu().nonzero()[:, 0].tolist()
    for owner, value in zip(owners, picked.tolist()):
        per_row[owner] += value
    return per_row


def check_estimator_args(mc_num: int, batch_size: int, cfg_scale: float,
                         prefix: str = "") -> None:
    """Raise ConfigError naming the first estimator setting out of range (as `prefix`<name>)."""
    if mc_num < 1:
        raise ConfigError(f"{prefix}mc_num={mc_num} must be >= 1 (Monte Carlo samples per "
                          "request)")
    if batch_size < 1:
        raise ConfigError(f"{prefix}batch_size={batch_size} must be >= 1")
    if cfg_scale < 0:
        raise ConfigError(f"{prefix}cfg_scale={cfg_scale} must be >= 0 (0 = no guidance)")


def mc_elbo(logits_at: LogitsAt, requests: Sequence[Tuple[Sequence[int], Sequence[int]]], *,
            mask_id: int, pad_id: int, mc_num: int, batch_size: int, seed: int = 0,
            cfg_scale: float = 0.0, device="cpu",
            progress: Optional[Callable[[int], None]] = None) -> List[float]:
    """Return the Monte Carlo ELBO of each (context ids, continuation ids) request."""
    check_estimator_args(mc_num, batch_size, cfg_scale)
    for n, (_, continuation) in enumerate(requests):
        if not continuation:
            raise ConfigError(f"request {n} has an empty continuation; nothing to score")
    rows = _rows(requests, mask_id, mc_num, seed)
    # rows of similar length share a batch (less padding); the order never changes a number
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
    totals = [0.0] * len(requests)
    sums = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        scores = _score_rows(logits_at, [rows[i] for i in chunk], mask_id=mask_id, pad_id=pad_id,
                             cfg_scale=cfg_scale, device=device)
        for i, score in zip(chunk, scores):
            sums[i] = rows[i].weight * score
        if progress is not None:
            progress(len(chunk))
    for i, row in enumerate(rows):  # in sample order, so float sums never depend on batching
        totals[row.request] += sums[i]
    return [t / mc_num for t in totals]


def exact_elbo(logits_at: LogitsAt, context: Sequence[int], continuation: Sequence[int], *,
               mask_id: int, pad_id: int = 0, cfg_scale: float = 0.0, device="cpu") -> float:
    """Return the ELBO computed exactly: every k in 1..L and every k-subset (2^L - 1 model rows).

    The reference the Monte Carlo estimate converges to; only for short continuations.
    """
    length = len(continuation)
    if length > 12:
        raise ConfigError(f"exact_elbo enumerates 2^L subsets; L={length} is too long (<= 12)")
    total = 0.0
    for k in range(1, length + 1):
        rows = []
        for subset in itertools.combinations(range(length), k):
            ids = list(context) + list(continuation)
            for i in subset:
                ids[len(context) + i] = mask_id
            rows.append(_Row(0, ids, [(len(context) + i, continuation[i]) for i in subset],
                             length / k, len(context)))
        scores = _score_rows(logits_at, rows, mask_id=mask_id, pad_id=pad_id,
                             cfg_scale=cfg_scale, device=device)
        total += (length / k) * sum(scores) / len(scores)
    return total / length
