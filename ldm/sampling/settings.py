"""One frozen object holding every sampler setting, validated once when it is built.

A task builds it from its `sampler` config group with `SamplerSettings.from_config(cfg.sampler,
max_positions=...)`, before any model loads, and hands the same object to `generate`, `infill`,
the REPL and the SFT-time samples. Nothing downstream re-validates it: the only check left for
later is a prompt's length against `prompt_budget`, which needs the prompt.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, Mapping, Optional

from ldm.errors import ConfigError
from ldm.sampling.decode import REMASKING

RULES = ("commit", "original", "entropy_bound")
CACHE_MODES = ("none", "prefix", "dual")  # the sampler's key/value cache modes (ldm.sampling.cache)


@dataclass(frozen=True)
class SamplerSettings:
    """How to unmask: budget, blocks, which positions commit, how tokens are drawn.

    `max_positions` is the model's position limit the settings were checked against (None when
    unknown): prompt + max_new_tokens must fit in it, so `prompt_budget` is what a prompt may use.
    """

    max_new_tokens: int = 64
    steps: int = 64
    block_length: Optional[int] = 32  # None = one block of max_new_tokens
    remasking: str = "low_confidence"  # low_confidence | random | margin | entropy
    temperature: float = 0.0  # 0 = greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    cfg_scale: float = 0.0  # classifier-free guidance; 0 = none
    threshold: Optional[float] = None  # commit every position at least this sure
    early_stop: bool = True  # stop once the answer's EOS is committed with nothing masked before
    rule: str = "commit"  # commit | original | entropy_bound
    gamma: Optional[float] = None  # rule=entropy_bound: entropy budget (nats) of one step's commits
    cache: str = "none"  # none | prefix | dual: block-wise approximate KV cache (ldm.sampling.cache)
    # Refill the cache at every step instead of every block: exact, no faster; for checking it.
    cache_refresh_every_step: bool = False
    max_positions: Optional[int] = None

    def __post_init__(self) -> None:
        _check(self)

    @classmethod
    def from_config(cls, node: Mapping[str, Any], max_positions: Optional[int] = None
                    ) -> "SamplerSettings":
        """Return the settings of a `sampler` config node (its `name` ignored), validated."""
        from omegaconf import DictConfig, OmegaConf

        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) \
            else dict(node)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known - {"name"})
        if unknown:
            raise ConfigError(f"sampler.{unknown[0]} is not a sampler setting; known: "
                              f"{', '.join(sorted(known - {'max_positions'}))}")
        values = {k: v for k, v in values.items() if k in known}
        return cls(**{**values, "max_positions": max_positions})

    def with_max_positions(self, max_positions: Optional[int]) -> "SamplerSettings":
        """Return these settings checked against another model's position limit."""
        return replace(self, max_positions=max_positions)

    @property
    def block(self) -> int:
        """Return the semi-autoregressive block size (max_new_tokens when block_length is None)."""
        return self.max_new_tokens if self.block_length is None else self.block_length

    @property
    def num_blocks(self) -> int:
        """Return the number of semi-autoregressive blocks."""
        return self.max_new_tokens // self.block

    @property
    def block_steps(self) -> int:
        """Return the step budget of each block."""
        return self.steps // self.num_blocks

    @property
    def prompt_budget(self) -> Optional[int]:
        """Return the most prompt tokens that fit before the answer (None when unlimited)."""
        if self.max_positions is None:
            return None
        return self.max_positions - self.max_new_tokens

    def check_prompt(self, prompt_length: int, what: str = "prompt") -> None:
        """Raise ConfigError if a prompt of `prompt_length` tokens leaves no room for the answer."""
        budget = self.prompt_budget
        if budget is not None and prompt_length > budget:
            raise ConfigError(
                f"{what} length {prompt_length} + sampler.max_new_tokens={self.max_new_tokens} = "
                f"{prompt_length + self.max_new_tokens} exceeds the model's max_positions="
                f"{self.max_positions}; shorten the prompt or lower max_new_tokens"
            )

    def as_record(self) -> Dict[str, Any]:
        """Return the settings as a plain dict (for sample records and mlflow)."""
        out = asdict(self)
        out.pop("max_positions")
        return out


def _check(s: SamplerSettings) -> None:
    """Raise ConfigError naming the first bad value of `s`."""
    if s.max_new_tokens < 1:
        raise ConfigError(f"sampler.max_new_tokens={s.max_new_tokens} must be >= 1")
    if s.max_positions is not None and s.max_new_tokens > s.max_positions:
        raise ConfigError(
            f"sampler.max_new_tokens={s.max_new_tokens} exceeds the model's max_positions="
            f"{s.max_positions}; use at most {s.max_positions} minus the prompt's length"
        )
    if s.block < 1 or s.max_new_tokens % s.block != 0:
        raise ConfigError(
            f"sampler.block_length={s.block_length} must be >= 1 and divide "
            f"sampler.max_new_tokens={s.max_new_tokens}"
        )
    if s.steps < 1 or s.steps > s.max_new_tokens:
        raise ConfigError(
            f"sampler.steps={s.steps} must be between 1 and sampler.max_new_tokens="
            f"{s.max_new_tokens}"
        )
    if s.steps % s.num_blocks != 0:
        raise ConfigError(
            f"sampler.steps={s.steps} must be divisible by the number of blocks {s.num_blocks} "
            f"(max_new_tokens={s.max_new_tokens} / block_length={s.block})"
        )
    if s.remasking not in REMASKING:
        raise ConfigError(f"sampler.remasking={s.remasking!r} is unknown; accepted: {REMASKING}")
    if s.rule not in RULES:
        raise ConfigError(f"sampler.rule={s.rule!r} is unknown; accepted: {RULES}")
    if s.temperature < 0:
        raise ConfigError(f"sampler.temperature={s.temperature} must be >= 0 (0 = greedy)")
    if s.top_k is not None and s.top_k < 1:
        raise ConfigError(f"sampler.top_k={s.top_k} must be >= 1 or null")
    if s.top_p is not None and not 0 < s.top_p <= 1:
        raise ConfigError(f"sampler.top_p={s.top_p} must be in (0, 1] or null")
    if s.cfg_scale < 0:
        raise ConfigError(f"sampler.cfg_scale={s.cfg_scale} must be >= 0 (0 = no guidance)")
    if s.threshold is not None and not 0 < s.threshold <= 1:
        raise ConfigError(f"sampler.threshold={s.threshold} must be in (0, 1] or null")
    if s.threshold is not None and s.rule == "original":
        raise ConfigError(
            f"sampler.threshold={s.threshold} needs sampler.rule='commit'; rule='original' "
            "reveals positions at random, set threshold to null"
        )
    if s.cache not in CACHE_MODES:
        raise ConfigError(f"sampler.cache={s.cache!r} is unknown; accepted: {', '.join(CACHE_MODES)}")
    if s.rule == "entropy_bound":
        if s.gamma is None or not s.gamma > 0:
            raise ConfigError(f"sampler.gamma={s.gamma} must be > 0 for sampler.rule="
                              f"'entropy_bound' (the entropy budget of one step's commits, e.g. 0.5)")
        if s.threshold is not None:
            raise ConfigError(f"sampler.threshold={s.threshold} and rule='entropy_bound' are two "
                              f"commit rules; set threshold to null")
    elif s.gamma is not None:
        raise ConfigError(f"sampler.gamma={s.gamma} is used only by sampler.rule='entropy_bound' "
                          f"(rule is {s.rule!r}); set gamma to null")
