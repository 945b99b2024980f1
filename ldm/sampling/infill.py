"""Infilling: fill the mask tokens inside a given canvas, reading the text on both sides.

`generate` appends masks after a prompt; here the masks are already in place ([MASK:N] spans).
The sampler's own unmasking loop (`unmask_block`) runs over one block holding every masked
position: each step predicts all masks and commits some of them by the settings' rule (the most
confident ones, as many as the linear schedule says or every one above the threshold; or, with
rule=original, a random share); text tokens and committed tokens never change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence

import torch

from ldm.errors import ConfigError
from ldm.sampling.sampler import Canvas, ModelFn, SamplerStep, record_steps, unmask_block
from ldm.sampling.settings import SamplerSettings


@dataclass
class InfillResult:
    """What `infill` returns."""

    tokens: List[List[int]]  # each canvas with its masks filled, unpadded
    nfe: int
    steps_run: int
    steps_skipped: int
    history: List[SamplerStep] = field(default_factory=list)  # .answer is the padded canvas


@torch.inference_mode()
def infill(
    model_fn: ModelFn,
    canvases: Sequence[Sequence[int]],
    settings: SamplerSettings,
    *,
    mask_id: int,
    pad_id: int,
    banned_ids: Iterable[int] = (),
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device | str] = None,
    record_history: bool = True,
    on_step: Optional[Callable[[SamplerStep], None]] = None,
) -> InfillResult:
    """Return the canvases with every mask_id position filled in at most `settings.steps` calls.

    One block holding every masked position, filled by the sampler's `unmask_block`; the
    settings' block length, EOS early stop and guidance do not apply (there is no prompt to mask).
    """
    rows = [[int(t) for t in c] for c in canvases]
    if not rows:
        raise ConfigError("infill got no canvas; pass at least one text with [MASK:N] spans")
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long,
                       device=device).reshape(len(rows), width)
    attn = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long,
                        device=device).reshape(len(rows), width)
    never = [mask_id, pad_id, *banned_ids]

    def ban(vocab_size: int, dev: torch.device) -> torch.Tensor:
        # A span is filled with exactly N words: no mask, no special token, not even EOS.
        banned = torch.zeros(vocab_size, dtype=torch.bool, device=dev)
        inside = [i for i in set(never) if 0 <= i < vocab_size]
        if inside:
            banned[torch.tensor(inside, device=dev)] = True
        return banned

    canvas = Canvas(ids, attn, mask_id, ban)
    history: List[SamplerStep] = []
    unmask_block(model_fn, canvas, 0, width, settings.steps, settings, generator=generator,
                 on_step=record_steps(history, record_history, on_step))
    out = canvas.ids.cpu()
    return InfillResult(
        tokens=[out[i, width - len(r):].tolist() for i, r in enumerate(rows)],
        nfe=canvas.nfe, steps_run=canvas.steps_run, steps_skipped=canvas.steps_skipped,
        history=history,
    )
