"""Specification of the forward process: schedules, time sampling and masking."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.errors import ConfigError
from ldm.masking import (
    SCHEDULES, CosineSchedule, LinearSchedule, Schedule, apply_mask, get_schedule, sample_times,
)

CONF_MASKING = Path(__file__).resolve().parents[2] / "conf" / "masking"
T_GRID = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)


def test_linear_weight_is_one_over_t():
    s = LinearSchedule()
    assert torch.allclose(s.weight(T_GRID), 1.0 / T_GRID)
    assert torch.allclose(s.mask_prob(T_GRID), T_GRID)
    assert torch.allclose(s.alpha(T_GRID), 1.0 - T_GRID)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_weight_equals_minus_finite_difference_alpha_prime_over_one_minus_alpha(name):
    s = get_schedule(name)
    h = 1e-6
    alpha_prime_fd = (s.alpha(T_GRID + h) - s.alpha(T_GRID - h)) / (2 * h)
    assert torch.allclose(s.alpha_prime(T_GRID), alpha_prime_fd, rtol=1e-6, atol=1e-8)
    expected = -alpha_prime_fd / (1.0 - s.alpha(T_GRID))
    assert torch.allclose(s.weight(T_GRID), expected, rtol=1e-6)


def test_cosine_weight_matches_its_closed_form():
    s = CosineSchedule()
    x = math.pi * T_GRID / 2
    closed = (math.pi / 2) * torch.sin(x) / (1 - torch.cos(x))
    assert torch.allclose(s.weight(T_GRID), closed, rtol=1e-9)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_goes_from_clean_at_zero_to_all_masked_at_one(name):
    s = get_schedule(name)
    ends = torch.tensor([0.0, 1.0])
    assert torch.allclose(s.alpha(ends), torch.tensor([1.0, 0.0]), atol=1e-7)
    assert torch.allclose(s.mask_prob(ends), torch.tensor([0.0, 1.0]), atol=1e-7)
    assert bool((s.alpha_prime(T_GRID) < 0).all())


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_weight_is_finite_and_positive_at_small_t_in_float32(name):
    t = torch.tensor([1e-4, 1e-3, 1e-2], dtype=torch.float32)
    w = get_schedule(name).weight(t)
    assert bool(torch.isfinite(w).all()) and bool((w > 0).all())


def test_every_schedule_has_a_conf_file_naming_it():
    for name in SCHEDULES:
        cfg = OmegaConf.load(CONF_MASKING / f"{name}.yaml")
        assert cfg["schedule"] == name
    for path in CONF_MASKING.glob("*.yaml"):
        cfg = OmegaConf.load(path)
        assert isinstance(get_schedule(cfg["schedule"]), Schedule)
        sample_times(4, cfg["time_sampling"], cfg["eps"])


def test_unknown_schedule_is_a_config_error_listing_known_ones():
    with pytest.raises(ConfigError, match=r"'quadratic'.*cosine, linear"):
        get_schedule("quadratic")


def test_uniform_times_lie_in_eps_to_one():
    g = torch.Generator().manual_seed(0)
    t = sample_times(10_000, "uniform", 0.1, generator=g)
    assert t.shape == (10_000,) and t.dtype == torch.float32
    assert float(t.min()) >= 0.1 and float(t.max()) <= 1.0
    assert abs(float(t.mean()) - 0.55) < 0.01


@pytest.mark.parametrize("batch_size", [1, 4, 7, 32])
def test_antithetic_times_are_evenly_spread_in_eps_to_one(batch_size):
    eps = 1e-3
    g = torch.Generator().manual_seed(batch_size)
    for _ in range(5):
        t = sample_times(batch_size, "antithetic", eps, generator=g).double()
        assert float(t.min()) >= eps and float(t.max()) <= 1.0
        ts = torch.sort(t).values
        gaps = torch.diff(torch.cat([ts, ts[:1] + (1 - eps)]))  # wrap around the circle
        assert torch.allclose(gaps, torch.full_like(gaps, (1 - eps) / batch_size), atol=1e-6)


def test_times_are_reproducible_from_the_generator():
    a = sample_times(8, "antithetic", 1e-3, generator=torch.Generator().manual_seed(3))
    b = sample_times(8, "antithetic", 1e-3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_unknown_time_sampling_is_a_config_error():
    with pytest.raises(ConfigError, match=r"'sobol'.*uniform, antithetic"):
        sample_times(4, "sobol", 1e-3)


def test_eps_outside_zero_one_is_a_config_error():
    with pytest.raises(ConfigError, match="eps"):
        sample_times(4, "uniform", 1.0)


def test_non_maskable_positions_are_never_masked():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (16, 32), generator=g)
    maskable = torch.rand(16, 32, generator=g) < 0.5
    for name in SCHEDULES:
        for _ in range(200):
            t = sample_times(16, "uniform", 1e-3, generator=g)
            noisy, masked = apply_mask(ids, maskable, t, name, mask_id=1, generator=g)
            assert not bool(masked[~maskable].any())
            assert torch.equal(noisy[~maskable], ids[~maskable])
            assert torch.equal(noisy[masked], torch.full_like(noisy[masked], 1))
            assert torch.equal(noisy[~masked], ids[~masked])


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("t_value", [0.1, 0.5, 0.9])
def test_empirical_mask_rate_matches_mask_prob(name, t_value):
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(64, 512, dtype=torch.long)
    t = torch.full((64,), t_value)
    _, masked = apply_mask(ids, torch.ones_like(ids, dtype=torch.bool), t, name, 7, generator=g)
    expected = float(get_schedule(name).mask_prob(torch.tensor(t_value)))
    assert abs(masked.float().mean().item() - expected) < 0.01


def test_linear_mask_rate_follows_each_rows_own_t():
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([0.05, 0.5, 0.95])
    ids = torch.zeros(3, 20_000, dtype=torch.long)
    _, masked = apply_mask(ids, torch.ones_like(ids, dtype=torch.bool), t, "linear", 9, g)
    assert torch.allclose(masked.float().mean(dim=1), t, atol=0.01)


def test_the_loss_normaliser_has_one_source_with_a_default_per_data_kind():
    from ldm.errors import ConfigError
    from ldm.masking import normalizer_for

    assert normalizer_for(None, "text") == "token" and normalizer_for(None, "chat") == "sequence"
    assert normalizer_for("masked", "chat") == "masked"
    with pytest.raises(ConfigError, match="masking.normalizer='tokens'"):
        normalizer_for("tokens", "text")


def test_loop_defaults_are_the_schema_defaults():
    from dataclasses import fields

    from ldm.config import HardwareConfig, MaskingConfig, TrainTaskConfig
    from ldm.masking import normalizer_for
    from ldm.train.settings import LoopConfig

    loop = LoopConfig(max_steps=1, global_batch_size=1, micro_batch_size=1, accumulation=1,
                      mask_id=0)
    ours = {f.name for f in fields(LoopConfig)}
    checked = set()
    for schema in (TrainTaskConfig(), MaskingConfig(), HardwareConfig()):
        shared = ours & {f.name for f in fields(schema)}
        # max_steps, global_batch_size, micro_batch_size: required here; group_by_length: the
        # schema's null (follow the data's padding) is resolved to a bool; normalizer: below
        for name in shared - {"max_steps", "global_batch_size", "micro_batch_size",
                              "group_by_length", "normalizer"}:
            value, theirs = getattr(loop, name), getattr(schema, name)
            assert (list(value) if isinstance(value, tuple) else value) == theirs, name
            checked.add(name)
    assert {"warmup_steps", "eval_every", "save_every", "eval_mc_samples", "schedule", "eps",
            "mixed_precision", "compile"} <= checked
    assert loop.normalizer == normalizer_for(MaskingConfig().normalizer, "text")
    assert loop.cpu == (HardwareConfig().accelerator == "cpu")


def test_loop_settings_take_the_config_settings_of_the_same_name(make_config):
    from ldm.train.settings import LoopConfig

    cfg = make_config("task=sft", "dataset=construction_faq", "task.lr=3e-4",
                      "task.betas=[0.8,0.95]", "masking.eps=0.01", "hardware.mixed_precision=bf16",
                      "task.max_steps=null", "task.group_by_length=null", "seed=5")
    loop = LoopConfig.from_cfg(cfg, mask_id=7, padding="batch")
    assert (loop.lr, loop.betas, loop.eps, loop.mixed_precision) == (3e-4, [0.8, 0.95], 0.01,
                                                                     "bf16")
    assert (loop.mask_id, loop.max_steps, loop.seed, loop.normalizer) == (7, 1, 5, "sequence")
    assert loop.group_by_length and not LoopConfig.from_cfg(cfg, 7, padding="eos").group_by_length
