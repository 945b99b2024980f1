"""Per-position decoding: which token a masked position would take, and how sure the model is.

All functions take logits of shape [..., V] and work on any leading shape.
"""

from __future__ import annotations

import re
from typing import Iterable, List, Optional

import torch

from ldm.errors import ConfigError
from ldm.tokenizer import chat_token_ids

REMASKING = ("low_confidence", "random", "margin", "entropy")


def banned_token_mask(
    vocab_size: int,
    *,
    mask_id: int,
    eos_id: int,
    special_ids: Iterable[int] = (),
    pad_id: Optional[int] = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Return a [V] bool tensor, True for ids that must never be emitted (mask, specials, pad)."""
    banned = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    ids = {int(mask_id), *(int(i) for i in special_ids)}
    if pad_id is not None:
        ids.add(int(pad_id))
    # EOS is how an answer ends, so it stays allowed even when it is also a special or pad token.
    ids.discard(int(eos_id))
    ids = [i for i in ids if 0 <= i < vocab_size]
    if ids:
        banned[torch.tensor(ids, device=device)] = True
    return banned


# Vocabulary entries held in reserve, never text: BERT's [unused0..993], Gemma-style <unused0>,
# Llama-3's <|reserved_special_token_N|>, ModernBERT's |||IP_ADDRESS||| placeholders.
RESERVED_TOKEN = re.compile(r"^(\[unused\d+\]|<unused\d+>|<\|reserved[\w-]*\|>|"
                            r"\|\|\|[A-Z_]+\|\|\|)$", re.IGNORECASE)


def never_emitted_ids(tok, vocab_size: Optional[int] = None) -> List[int]:
    """Return the sorted ids a sampler must never emit with this tokenizer, EOS excepted.

    Every special token; every added token except plain-whitespace ones that are not special
    (ModernBERT's runs of spaces are text); every reserved/unused vocabulary entry; every id in
    the tokenizer's range that names no token; and every id from len(tok) up to `vocab_size`
    (embedding rows past the vocabulary, e.g. padded to a multiple of 64, decode to nothing).
    """
    size = len(tok)
    banned = {int(i) for i in tok.all_special_ids}
    for token_id, added in tok.added_tokens_decoder.items():
        if added.special or not added.content.isspace():
            banned.add(int(token_id))
    vocab = tok.get_vocab()
    banned.update(i for t, i in vocab.items() if RESERVED_TOKEN.match(t))
    named = set(vocab.values())
    banned.update(i for i in range(size) if i not in named)
    if vocab_size is not None:
        banned.update(range(size, int(vocab_size)))
    if tok.eos_token_id is not None:
        banned.discard(int(tok.eos_token_id))
    return sorted(banned)


def chat_banned_ids(tok, vocab_size: Optional[int] = None) -> List[int]:
    """Return `never_emitted_ids` plus the tokenizer's chat turn tokens, if it has them.

    The chat turn tokens are special in our exports; a chat answer must never emit them,
    whatever a hub model's tokenizer says about them.
    """
    banned = set(never_emitted_ids(tok, vocab_size))
    try:
        banned |= set(chat_token_ids(tok).values())
    except ConfigError:  # no chat tokens: nothing more to ban
        pass
    banned.discard(tok.eos_token_id)
    return sorted(banned)


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Return classifier-free guided logits uncond + (1 + cfg_scale) * (cond - uncond)."""
    return uncond + (1.0 + cfg_scale) * (cond - uncond)


def filter_logits(
    logits: torch.Tensor, *, top_k: Optional[int] = None, top_p: Optional[float] = None
) -> torch.Tensor:
    """Return logits with tokens outside the top-k and the top-p nucleus set to -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the mass strictly before it already reaches top_p; the most likely
        # token always survives because the mass before it is 0.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Return sampled token ids: argmax at temperature 0, else Gumbel-max in float64."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # float64 because float32 Gumbel-max truncates the low-probability tail, which lowers the
    # effective temperature of masked diffusion samples (arXiv:2409.02908); LLaDA uses float64.
    uniform = uniform_like(logits, torch.float64, generator)
    tiny = torch.finfo(torch.float64).tiny
    gumbel = -torch.log(-torch.log(uniform.clamp(min=tiny)))
    return (logits.double() / temperature + gumbel).argmax(dim=-1)


def confidence(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    remasking: str,
    generator: Optional[torch.Generator] = None,
    probs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Return a float64 score per position; positions with higher scores are committed first.

    `probs` is the float64 softmax of `logits` when the caller has it already."""
    if remasking == "random":
        return uniform_like(tokens, torch.float64, generator)
    if probs is None:
        probs = torch.softmax(logits.double(), dim=-1)
    if remasking == "low_confidence":
        return token_probability(probs, tokens)
    if remasking == "margin":
        top2 = torch.topk(probs, min(2, probs.shape[-1]), dim=-1).values
        second = top2[..., 1] if top2.shape[-1] > 1 else torch.zeros_like(top2[..., 0])
        return top2[..., 0] - second
    if remasking == "entropy":
        return -torch.special.entr(probs).sum(dim=-1)
    raise ValueError(f"unknown remasking {remasking!r}; expected one of {REMASKING}")


def token_probability(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Return probs[..., tokens]: the probability the model gave each chosen token."""
    return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def uniform_like(
    like: torch.Tensor, dtype: torch.dtype, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Return U[0, 1) noise shaped like `like`, drawn from `generator` on its own device."""
    # Drawing on the generator's device lets a CPU generator drive a GPU canvas reproducibly.
    device = generator.device if generator is not None else like.device
    noise = torch.rand(like.shape, dtype=dtype, device=device, generator=generator)
    return noise.to(like.device)
