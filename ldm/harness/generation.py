"""Sampler settings for the harness and greedy/stop-string generation through ldm's sampler."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

from ldm.errors import ConfigError
from ldm.sampling.settings import SamplerSettings

SAMPLER_FIELDS = ("max_new_tokens", "steps", "block_length", "remasking", "temperature", "top_k",
                  "top_p", "cfg_scale", "threshold", "early_stop", "rule", "gamma", "cache")


def sampler_presets() -> List[str]:
    """Return the names of the sampler presets in conf/sampler/."""
    from ldm.config import preset_names

    return preset_names()


def sampler_settings(preset: str, overrides: Optional[Dict[str, Any]] = None,
                     max_new_tokens: Optional[int] = None,
                     max_positions: Optional[int] = None) -> SamplerSettings:
    """Return the SamplerSettings of a sampler preset with overrides, for an answer length.

    Interpolations such as `steps: ${.max_new_tokens}` are resolved after the length is set, so
    a preset keeps its meaning at every length; a block length that does not divide the length
    becomes the whole length, and steps are rounded down to a multiple of the blocks.
    """
    from omegaconf import OmegaConf

    from ldm.config import load_preset

    node = load_preset(preset)
    unknown = sorted(set(overrides or {}) - set(SAMPLER_FIELDS))
    if unknown:
        raise ConfigError(f"unknown sampler setting {unknown[0]!r}; accepted: "
                          f"{', '.join(SAMPLER_FIELDS)}")
    node = OmegaConf.merge(node, overrides or {})
    if max_new_tokens is not None:
        node.max_new_tokens = max_new_tokens
    values = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items()
              if k in SAMPLER_FIELDS}
    length = values["max_new_tokens"]
    if max_new_tokens is not None:
        block = values["block_length"]
        if not block or length % block != 0:
            values["block_length"] = block = length
        blocks = length // block
        values["steps"] = max(blocks, min(values["steps"], length) // blocks * blocks)
    return SamplerSettings(**values, max_positions=max_positions)


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """Return `text` up to the first occurrence of any stop string (all of it if none occurs)."""
    cut = len(text)
    for stop in stops:
        if stop:
            found = text.find(stop)
            if found != -1:
                cut = min(cut, found)
    return text[:cut]


def generate_batch(model_fn, tok, prompts: List[List[int]], settings: SamplerSettings, *,
                   mask_id: int, seed: int, device) -> List[Dict[str, Any]]:
    """Sample one answer per prompt; return {tokens, text, nfe, seconds} per prompt."""
    import torch

    from ldm.sampling.decode import never_emitted_ids
    from ldm.sampling.sampler import generate

    calls = torch.zeros(len(prompts), dtype=torch.long)

    def count(step):
        # a row that commits at a step was in that step's model call(s)
        calls.add_(step.committed.any(1).long())

    began = time.perf_counter()
    result = generate(model_fn, prompts, settings, mask_id=mask_id, eos_id=tok.eos_token_id,
                      special_ids=never_emitted_ids(tok), pad_id=tok.pad_token_id,
                      generator=torch.Generator().manual_seed(seed), device=device,
                      record_history=False, on_step=count)
    seconds = time.perf_counter() - began
    factor = 2 if settings.cfg_scale > 0 else 1
    return [{"tokens": tokens, "nfe": int(n) * factor, "seconds": seconds / len(prompts),
             "text": tok.decode(tokens, skip_special_tokens=True).strip()}
            for tokens, n in zip(result.tokens, calls.tolist())]
