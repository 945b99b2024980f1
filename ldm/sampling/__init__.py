"""Masked-diffusion sampling: iterative unmasking of a prompt + masks canvas (see sampler.py)."""

from ldm.sampling.sampler import (
    SampleResult,
    SamplerStep,
    finished_answers,
    generate,
    hf_logits_fn,
)
from ldm.sampling.schedule import commit_schedule, unmask_probability
from ldm.sampling.validation import validate_sampler_args

__all__ = [
    "SampleResult",
    "SamplerStep",
    "commit_schedule",
    "finished_answers",
    "generate",
    "hf_logits_fn",
    "unmask_probability",
    "validate_sampler_args",
]
