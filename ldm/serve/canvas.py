"""The answer canvas as HTML: masks as grey boxes, each token coloured by the step that committed
it, the tokens the latest step committed outlined."""

from __future__ import annotations

import html
from typing import List, Optional, Sequence

import torch

from ldm.sampling.render import TokenPieces
from ldm.sampling.sampler import SamplerStep

CSS = """
.ldm-canvas { font-family: ui-monospace, monospace; line-height: 1.9; white-space: pre-wrap;
  padding: 8px; border-radius: 6px; min-height: 3em; overflow-wrap: anywhere;
  word-break: break-word; }
.ldm-canvas .ldm-head { font-size: 0.8em; opacity: 0.75; margin-bottom: 4px; }
.ldm-canvas .ldm-mask { display: inline-block; width: 1.6em; height: 1.1em; margin: 0 1px;
  vertical-align: middle; background: #9ca3af; border-radius: 3px; opacity: 0.55; }
.ldm-canvas .ldm-tok { border-radius: 3px; color: #111; }
.ldm-canvas .ldm-new { outline: 2px solid #dc2626; font-weight: bold; }
.ldm-canvas .ldm-text { opacity: 0.8; }
.ldm-canvas .ldm-eos { font-size: 0.8em; opacity: 0.7; }
"""


class CommitTracker:
    """Remembers, per canvas position, at which step (1, 2, ...) it was committed; 0 = never."""

    def __init__(self):
        self.born: Optional[torch.Tensor] = None
        self.steps = 0

    def update(self, step: SamplerStep) -> torch.Tensor:
        """Record `step` and return the [B, L] commit-step table."""
        if self.born is None:
            self.born = torch.zeros(step.committed.shape, dtype=torch.long)
        self.steps += 1
        self.born[step.committed] = self.steps
        return self.born


def step_colour(born: int, total: int) -> str:
    """Return the background of a token committed at step `born` of about `total`: blue to amber."""
    frac = 0.0 if total <= 1 else min(1.0, (born - 1) / (total - 1))
    return f"hsl({int(210 - 170 * frac)}, 85%, 80%)"


def canvas_html(pieces: TokenPieces, ids: Sequence[int], *, mask_id: int,
                born: Optional[Sequence[int]] = None, new: Optional[Sequence[bool]] = None,
                total_steps: int = 1, head: str = "", fixed: Optional[Sequence[bool]] = None,
                state: str = "running", end_id: Optional[int] = None,
                eos_id: Optional[int] = None) -> str:
    """Return one canvas row as HTML; `fixed` marks given text (infill) drawn without colour.

    With `end_id` (the EOS of a finished answer) nothing after its first occurrence is drawn:
    positions past the end of an answer that stopped early are never filled. Otherwise a
    committed `eos_id` is drawn as a small end mark, so a step that commits only EOS padding
    (as LLaDA-style models do at the end of an answer first) still shows.
    """
    parts: List[str] = []
    masked = committed = 0
    first = True
    for pos, token in enumerate(int(i) for i in ids):
        if end_id is not None and token == end_id:
            break
        if token == mask_id:
            masked += 1
            parts.append('<span class="ldm-mask" title="masked"></span>')
            first = False
            continue
        text = pieces(token)
        if token == eos_id and (fixed is None or not fixed[pos]):
            text = "∎"
        if not text:
            continue  # other special tokens are not drawn
        if first:
            text = text.lstrip()
        first = False
        if fixed is not None and fixed[pos]:
            parts.append(f'<span class="ldm-text">{html.escape(text)}</span>')
            continue
        committed += 1
        step = int(born[pos]) if born is not None else 0
        classes = "ldm-tok ldm-new" if new is not None and new[pos] else "ldm-tok"
        if token == eos_id:
            classes += " ldm-eos"
        style = f' style="background:{step_colour(step, total_steps)}"' if step else ""
        parts.append(f'<span class="{classes}"{style} title="step {step}">'
                     f'{html.escape(text)}</span>')
    head_html = f'<div class="ldm-head">{html.escape(head)}</div>' if head else ""
    return (f'<div class="ldm-canvas" data-state="{state}" data-committed="{committed}" '
            f'data-masked="{masked}">{head_html}{"".join(parts)}</div>')


def empty_canvas(note: str = "") -> str:
    """Return the canvas shown before anything is sampled."""
    return (f'<div class="ldm-canvas" data-state="idle" data-committed="0" data-masked="0">'
            f'<div class="ldm-head">{html.escape(note)}</div></div>')
