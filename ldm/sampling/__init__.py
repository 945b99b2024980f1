"""Masked-diffusion sampling: iterative unmasking of a prompt + masks canvas (see sampler.py).

The public surface: `SamplerSettings` (one frozen, validated settings object), `generate`
(prompt + masks), `infill` (masks inside a text), `unmask_block` (the one unmasking loop both
use, over a `Canvas`), and `sampler_model` (a transformers masked LM as the sampler's model, a
`SamplerModel`; a bare logits function is taken as an opaque one).
"""

from ldm.sampling.infill import InfillResult, infill
from ldm.sampling.model import SamplerModel, sampler_model
from ldm.sampling.sampler import (
    Canvas,
    SampleResult,
    SamplerStep,
    finished_answers,
    generate,
    unmask_block,
)
from ldm.sampling.schedule import commit_schedule, unmask_probability
from ldm.sampling.settings import SamplerSettings

__all__ = [
    "Canvas",
    "InfillResult",
    "SampleResult",
    "SamplerModel",
    "SamplerSettings",
    "SamplerStep",
    "commit_schedule",
    "finished_answers",
    "generate",
    "infill",
    "sampler_model",
    "unmask_block",
    "unmask_probability",
]
