"""Masked-diffusion sampling: iterative unmasking of a prompt + masks canvas (see sampler.py).

The public surface: `SamplerSettings` (one frozen, validated settings object), `generate`
(prompt + masks), `infill` (masks inside a text), `unmask_block` (the one unmasking loop both
use, over a `Canvas`), and `hf_logits_fn` (a transformers masked LM as the model function).
"""

from ldm.sampling.infill import InfillResult, infill
from ldm.sampling.sampler import (
    Canvas,
    SampleResult,
    SamplerStep,
    finished_answers,
    generate,
    hf_logits_fn,
    unmask_block,
)
from ldm.sampling.schedule import commit_schedule, unmask_probability
from ldm.sampling.settings import SamplerSettings

__all__ = [
    "Canvas",
    "InfillResult",
    "SampleResult",
    "SamplerSettings",
    "SamplerStep",
    "commit_schedule",
    "finished_answers",
    "generate",
    "hf_logits_fn",
    "infill",
    "unmask_block",
    "unmask_probability",
]
