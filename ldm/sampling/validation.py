"""Checks on sampler arguments, run before any model call: one clear line per bad value."""

from __future__ import annotations

from typing import Optional

from ldm.errors import ConfigError
from ldm.sampling.decode import REMASKING

RULES = ("commit", "original", "entropy_bound")
CACHE_MODES = ("none", "prefix", "dual")


def validate_sampler_args(
    *,
    prompt_length: int,
    max_new_tokens: int,
    steps: int,
    block_length: Optional[int] = None,
    remasking: str = "low_confidence",
    rule: str = "commit",
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    cfg_scale: float = 0.0,
    threshold: Optional[float] = None,
    max_positions: Optional[int] = None,
    cache: str = "none",
    gamma: Optional[float] = None,
) -> int:
    """Return the number of blocks; raise ConfigError naming the first bad value."""
    if max_new_tokens < 1:
        raise ConfigError(f"sampler.max_new_tokens={max_new_tokens} must be >= 1")
    if max_positions is not None and prompt_length + max_new_tokens > max_positions:
        raise ConfigError(
            f"prompt length {prompt_length} + sampler.max_new_tokens={max_new_tokens} = "
            f"{prompt_length + max_new_tokens} exceeds the model's max_positions={max_positions}; "
            f"shorten the prompt or lower max_new_tokens"
        )
    block = max_new_tokens if block_length is None else block_length
    if block < 1 or max_new_tokens % block != 0:
        raise ConfigError(
            f"sampler.block_length={block_length} must be >= 1 and divide "
            f"sampler.max_new_tokens={max_new_tokens}"
        )
    num_blocks = max_new_tokens // block
    if steps < 1 or steps > max_new_tokens:
        raise ConfigError(
            f"sampler.steps={steps} must be between 1 and sampler.max_new_tokens={max_new_tokens}"
        )
    if steps % num_blocks != 0:
        raise ConfigError(
            f"sampler.steps={steps} must be divisible by the number of blocks {num_blocks} "
            f"(max_new_tokens={max_new_tokens} / block_length={block})"
        )
    if remasking not in REMASKING:
        raise ConfigError(f"sampler.remasking={remasking!r} is unknown; accepted: {REMASKING}")
    if rule not in RULES:
        raise ConfigError(f"sampler.rule={rule!r} is unknown; accepted: {RULES}")
    if temperature < 0:
        raise ConfigError(f"sampler.temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"sampler.top_k={top_k} must be >= 1 or null")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"sampler.top_p={top_p} must be in (0, 1] or null")
    if cfg_scale < 0:
        raise ConfigError(f"sampler.cfg_scale={cfg_scale} must be >= 0 (0 = no guidance)")
    if threshold is not None and not 0 < threshold <= 1:
        raise ConfigError(f"sampler.threshold={threshold} must be in (0, 1] or null")
    if threshold is not None and rule == "original":
        raise ConfigError(
            f"sampler.threshold={threshold} needs sampler.rule='commit'; rule='original' reveals "
            f"positions at random, set threshold to null"
        )
    if cache not in CACHE_MODES:
        raise ConfigError(f"sampler.cache={cache!r} is unknown; accepted: {', '.join(CACHE_MODES)}")
    if rule == "entropy_bound":
        if gamma is None or not gamma > 0:
            raise ConfigError(f"sampler.gamma={gamma} must be > 0 for sampler.rule='entropy_bound' "
                              f"(the entropy budget of one step's commits, e.g. 0.5)")
        if threshold is not None:
            raise ConfigError(f"sampler.threshold={threshold} and rule='entropy_bound' are two "
                              f"commit rules; set threshold to null")
    elif gamma is not None:
        raise ConfigError(f"sampler.gamma={gamma} is used only by sampler.rule='entropy_bound' "
                          f"(rule is {rule!r}); set gamma to null")
    return num_blocks
