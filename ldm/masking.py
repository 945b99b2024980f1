"""The forward (noising) process of masked diffusion: schedules, time sampling, masking.

A schedule gives alpha(t), the probability that a token is still clean at time t in [0, 1]
(alpha(0) = 1, alpha(1) = 0). A token is masked with probability 1 - alpha(t), and the negative
ELBO weighs the cross-entropy at a masked token by w(t) = -alpha'(t) / (1 - alpha(t))
(MDLM arXiv:2406.07524, eq. 10; with the linear schedule this is LLaDA's 1/t, arXiv:2502.09992).

Adding a schedule is one class registered in `SCHEDULES` and one YAML file in conf/masking/.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple, Type, Union

import torch

from ldm.errors import ConfigError

TIME_SAMPLING = ("uniform", "antithetic")
# What the summed masked-token loss is divided by: the batch's token positions (LLaDA
# pretraining), each sequence's maskable (answer) length (LLaDA SFT), or the masked count.
NORMALIZERS = ("token", "sequence", "masked", "maskable")
# `masking.normalizer: null` means the data's natural one: text rows are all maskable, chat rows
# only in their answers, whose lengths differ per sequence.
DEFAULT_NORMALIZER = {"text": "token", "chat": "sequence"}


def check_normalizer(normalizer: str) -> str:
    """Return `normalizer` if it is known, else raise ConfigError listing the known ones."""
    if normalizer not in NORMALIZERS:
        raise ConfigError(
            f"masking.normalizer={normalizer!r} is not known; use one of {', '.join(NORMALIZERS)}"
        )
    return normalizer


def normalizer_for(normalizer: Optional[str], data_kind: str) -> str:
    """Return the loss normaliser: `normalizer` if set, else the default of `data_kind`."""
    return check_normalizer(normalizer if normalizer is not None else DEFAULT_NORMALIZER[data_kind])


@dataclass(frozen=True)
class Schedule:
    """Base class: subclasses define `alpha` and `alpha_prime`; the rest follows from them."""

    name: ClassVar[str] = ""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Return alpha(t), the probability that a token is still clean at time t."""
        raise NotImplementedError

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        """Return d alpha / dt at t (negative: tokens only ever get masked as t grows)."""
        raise NotImplementedError

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """Return 1 - alpha(t), the probability that a token is masked at time t."""
        return 1.0 - self.alpha(t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Return the ELBO loss weight -alpha'(t) / (1 - alpha(t)) at t."""
        return -self.alpha_prime(t) / self.mask_prob(t)


@dataclass(frozen=True)
class LinearSchedule(Schedule):
    """alpha(t) = 1 - t: mask probability t, loss weight 1/t (LLaDA, MDLM)."""

    name: ClassVar[str] = "linear"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Return 1 - t."""
        return 1.0 - t

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        """Return -1 everywhere."""
        return torch.full_like(t, -1.0)

    # Written out rather than inherited: 1 - (1 - t) loses digits for small t in float32.
    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """Return t."""
        return t.clone()

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Return 1 / t."""
        return 1.0 / t


@dataclass(frozen=True)
class CosineSchedule(Schedule):
    """alpha(t) = cos(pi t / 2): fewer masks at small t than linear, weight (pi/2) cot(pi t / 4)."""

    name: ClassVar[str] = "cosine"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Return cos(pi t / 2)."""
        return torch.cos(0.5 * math.pi * t)

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        """Return -(pi/2) sin(pi t / 2)."""
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    # 1 - cos(x) = 2 sin^2(x/2) avoids cancellation near t = 0, where 1 - cos(x) ~ x^2 / 2 would
    # round to zero in float32 and make the weight infinite.
    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """Return 1 - cos(pi t / 2), computed as 2 sin^2(pi t / 4)."""
        return 2.0 * torch.sin(0.25 * math.pi * t) ** 2

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Return (pi/2) sin(pi t/2) / (1 - cos(pi t/2)) = (pi/2) / tan(pi t / 4)."""
        return 0.5 * math.pi / torch.tan(0.25 * math.pi * t)


SCHEDULES: Dict[str, Type[Schedule]] = {s.name: s for s in (LinearSchedule, CosineSchedule)}


def get_schedule(name: Union[str, Schedule]) -> Schedule:
    """Return the schedule registered under `name` (a Schedule passes through unchanged)."""
    if isinstance(name, Schedule):
        return name
    if name not in SCHEDULES:
        raise ConfigError(
            f"masking.schedule={name!r} is not known; use one of {', '.join(sorted(SCHEDULES))}"
        )
    return SCHEDULES[name]()


def sample_times(
    batch_size: int,
    method: str,
    eps: float,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Return a float32 [batch_size] tensor of per-sequence times in [eps, 1]."""
    if method not in TIME_SAMPLING:
        raise ConfigError(
            f"masking.time_sampling={method!r} is not known; use one of {', '.join(TIME_SAMPLING)}"
        )
    if not 0.0 <= eps < 1.0:
        raise ConfigError(f"masking.eps={eps!r} is out of range; use a value in [0, 1)")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be at least 1")
    # Draw where the generator lives, so a CPU generator seeds a GPU batch reproducibly.
    draw_on = generator.device if generator is not None else device
    if method == "uniform":
        u = torch.rand(batch_size, generator=generator, device=draw_on)
    else:
        # Stratified (antithetic) times: one shared offset, B evenly spaced points mod 1. Every
        # batch then covers all noise levels, which lowers the variance of the ELBO estimate
        # (Kingma et al., Variational Diffusion Models, arXiv:2107.00630, "low-discrepancy").
        offset = torch.rand(1, generator=generator, device=draw_on)
        steps = torch.arange(batch_size, device=draw_on, dtype=torch.float32) / batch_size
        u = torch.remainder(offset + steps, 1.0)
    return (eps + (1.0 - eps) * u).to(device=device, dtype=torch.float32)


def apply_mask(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    t: torch.Tensor,
    schedule: Union[str, Schedule],
    mask_id: int,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return (noisy_ids, masked): maskable tokens replaced by mask_id w.p. 1 - alpha(t) per row."""
    if input_ids.shape != maskable.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and maskable {tuple(maskable.shape)} differ"
        )
    if t.shape != input_ids.shape[:1]:
        raise ValueError(f"t has shape {tuple(t.shape)}; expected ({input_ids.shape[0]},)")
    prob = get_schedule(schedule).mask_prob(t.float()).to(input_ids.device)
    draw_on = generator.device if generator is not None else input_ids.device
    u = torch.rand(input_ids.shape, generator=generator, device=draw_on).to(input_ids.device)
    masked = (u < prob[:, None]) & maskable.bool()
    noisy_ids = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return noisy_ids, masked
