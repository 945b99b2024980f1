"""Showing the denoising: clean answer text, the live terminal canvas (rich), an animated GIF.

A canvas is drawn token by token: committed tokens as their text, masks as a placeholder (a dim
"░" in the terminal, a grey box in the GIF), and the tokens the latest step committed highlighted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ldm.files import atomic_path
from ldm.sampling.sampler import SamplerStep

MASK_GLYPH = "░"
Cell = Tuple[str, str]  # (text, kind): kind is "text", "new" (committed this step) or "mask"


def clean_answer(tok, ids: Sequence[int], mask_id: int, eos_id: Optional[int]) -> str:
    """Return the text of answer ids: cut at the first EOS, masks and special tokens dropped."""
    ids = [int(i) for i in ids]
    if eos_id is not None and eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    # Only the answer's own ids are decoded, so no role header or chat word is ever stripped
    # from text: "user" or "assistant" written by the model stays in the answer.
    return tok.decode([i for i in ids if i != mask_id], skip_special_tokens=True).strip()


class TokenPieces:
    """Per-token display text with its leading space (" the", "ing", "."), cached by id."""

    def __init__(self, tok):
        self.tok = tok
        self.special = set(tok.all_special_ids)
        # Decoding behind an anchor token keeps the spacing a token has inside running text
        # (WordPiece "##ing" joins, byte-level "Ġthe" keeps its space) without decoding prefixes.
        self.anchor = tok("a", add_special_tokens=False)["input_ids"][:1]
        self.anchor_text = tok.decode(self.anchor)
        self.cache: Dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        """Return how token `token_id` reads inside text ("" for special tokens)."""
        piece = self.cache.get(token_id)
        if piece is None:
            if token_id in self.special:
                piece = ""
            else:
                text = self.tok.decode(self.anchor + [token_id], skip_special_tokens=True)
                piece = text[len(self.anchor_text):] if text.startswith(self.anchor_text) else text
            self.cache[token_id] = piece
        return piece


def canvas_cells(pieces: TokenPieces, ids: Sequence[int], committed: Optional[Sequence[bool]],
                 mask_id: int) -> List[Cell]:
    """Return the display cells of one canvas row (special tokens, e.g. padding, left out)."""
    cells: List[Cell] = []
    for pos, token in enumerate(int(i) for i in ids):
        if token == mask_id:
            cells.append(("", "mask"))
            continue
        text = pieces(token)
        if text:
            cells.append((text, "new" if committed is not None and committed[pos] else "text"))
    if cells and cells[0][1] != "mask":
        cells[0] = (cells[0][0].lstrip(), cells[0][1])
    return cells


def step_title(step: SamplerStep) -> str:
    """Return the caption of a frame: step number and model calls so far."""
    return f"step {step.step + 1}  ·  block {step.block + 1}  ·  nfe {step.nfe}"


# --- terminal ----------------------------------------------------------------------------------


class LiveView:
    """A rich Live panel redrawn at every sampler step; use as a context manager and `on_step`."""

    def __init__(self, tok, labels: Sequence[str], mask_id: int, console=None, transient=True):
        self.pieces, self.labels, self.mask_id = TokenPieces(tok), list(labels), mask_id
        self.console, self.transient, self.live = console, transient, None

    def renderable(self, step: Optional[SamplerStep]):
        """Return the rich renderable of the canvas after `step` (labels only before any)."""
        from rich.text import Text

        out = Text()
        if step is not None:
            out.append(step_title(step) + "\n", style="dim")
        for row, label in enumerate(self.labels):
            if label:
                out.append(f"> {label}\n", style="bold cyan")
            if step is not None:
                cells = canvas_cells(self.pieces, step.answer[row].tolist(),
                                     step.committed[row].tolist(), self.mask_id)
                for text, kind in cells:
                    if kind == "mask":
                        out.append(MASK_GLYPH, style="dim")
                    else:
                        out.append(text, style="bold green" if kind == "new" else None)
            out.append("\n")
        return out

    def __enter__(self) -> "LiveView":
        from rich.live import Live

        self.live = Live(self.renderable(None), console=self.console, transient=self.transient,
                         auto_refresh=False)
        self.live.__enter__()
        return self

    def __call__(self, step: SamplerStep) -> None:
        """Redraw the canvas after `step` (the sampler's on_step callback)."""
        if self.live is not None:
            self.live.update(self.renderable(step), refresh=True)

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
            self.live = None


# --- GIF ---------------------------------------------------------------------------------------

COLOURS = {"text": (20, 20, 20), "new": (200, 60, 20), "label": (30, 80, 160),
           "title": (120, 120, 120), "mask": (205, 205, 205)}


def load_font(size: int):
    """Return a TrueType font of `size` px (DejaVu Sans if installed, else Pillow's own)."""
    from PIL import ImageFont

    for name in ("DejaVuSans.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _split_lines(cells: List[Cell]) -> List[Cell]:
    """Return the cells with every newline as a cell of its own, kind "newline"."""
    out: List[Cell] = []
    for text, kind in cells:
        for i, part in enumerate(text.split("\n")):
            if i:
                out.append(("", "newline"))
            if part or kind == "mask":
                out.append((part, kind))
    return out


def _words(cells: List[Cell]) -> List[List[Cell]]:
    """Group cells into wrap units: a word runs until whitespace, a mask or a newline."""
    words: List[List[Cell]] = []
    for cell in cells:
        text, kind = cell
        breaks = ("mask", "newline")
        starts = not words or kind in breaks or words[-1][-1][1] in breaks or text[:1].isspace()
        if starts:
            words.append([cell])
        else:
            words[-1].append(cell)
    return words


class GifRecorder:
    """Collects one frame per sampler step and writes them as an animated GIF."""

    def __init__(self, tok, mask_id: int, width: int = 720, font_size: int = 16,
                 frame_ms: int = 150, last_frame_ms: int = 2000):
        self.pieces, self.mask_id = TokenPieces(tok), mask_id
        self.width, self.margin = width, 12
        self.font, self.small = load_font(font_size), load_font(max(8, font_size - 4))
        self.line = int(font_size * 1.45)
        self.box = (int(font_size * 0.9), int(font_size * 1.0))
        self.frame_ms, self.last_frame_ms = frame_ms, last_frame_ms
        self.frames: list = []

    def _layout(self, cells: List[Cell], y: int) -> Tuple[list, int]:
        """Return (draw ops (x, y, text, kind), the y below the last line), wrapping at width."""
        ops, x, limit = [], self.margin, self.width - self.margin
        space = self.font.getlength(" ")

        def width_of(text: str, kind: str, at_start: bool) -> float:
            if kind == "mask":
                return (0 if at_start else space) + self.box[0]
            return self.font.getlength(text.lstrip() if at_start else text)

        for word in _words(_split_lines(cells)):
            if word[0][1] == "newline":
                x, y = self.margin, y + self.line
                continue
            if x > self.margin and x + sum(width_of(t, k, False) for t, k in word) > limit:
                x, y = self.margin, y + self.line
            for text, kind in word:
                w = width_of(text, kind, x == self.margin)
                if x > self.margin and x + w > limit:  # a word wider than the frame: break it
                    x, y = self.margin, y + self.line
                    w = width_of(text, kind, True)
                if kind == "mask":
                    ops.append((x + w - self.box[0], y, None, kind))
                else:
                    ops.append((x, y, text.lstrip() if x == self.margin else text, kind))
                x += w
        return ops, y + self.line

    def add(self, step: SamplerStep, labels: Sequence[str] = ()) -> None:
        """Render the canvas after `step` (every row, each under its label) as one frame."""
        from PIL import Image, ImageDraw

        ops: list = [(self.margin, self.margin, step_title(step), "title")]
        y = self.margin + self.line
        for row in range(step.answer.shape[0]):
            label = labels[row] if row < len(labels) else ""
            if label:
                words = [(w, "label") for w in re.findall(r"\s*\S+", "> " + label)]
                row_ops, y = self._layout(words, y)
                ops += row_ops
            row_ops, y = self._layout(canvas_cells(self.pieces, step.answer[row].tolist(),
                                                   step.committed[row].tolist(), self.mask_id), y)
            ops += row_ops
            y += self.line // 2
        image = Image.new("RGB", (self.width, y + self.margin), "white")
        draw = ImageDraw.Draw(image)
        for x, top, text, kind in ops:
            if kind == "mask":
                draw.rounded_rectangle([x, top + 2, x + self.box[0], top + 2 + self.box[1]],
                                       radius=3, fill=COLOURS["mask"])
            else:
                font = self.small if kind == "title" else self.font
                draw.text((x, top), text, fill=COLOURS[kind], font=font)
        self.frames.append(image)

    def add_history(self, history: Sequence[SamplerStep], labels: Sequence[str] = ()) -> None:
        """Add one frame per step of a sampler history."""
        for step in history:
            self.add(step, labels)

    def save(self, path: str | Path) -> Path:
        """Write the frames (padded to one size) as a looping GIF at `path`; return the path."""
        from PIL import Image

        if not self.frames:
            raise ValueError("no frames recorded: the sampler ran no step")
        height = max(f.height for f in self.frames)
        frames = []
        for frame in self.frames:
            full = Image.new("RGB", (self.width, height), "white")
            full.paste(frame, (0, 0))
            frames.append(full)
        path = Path(path)
        durations = [self.frame_ms] * (len(frames) - 1) + [self.last_frame_ms]
        with atomic_path(path) as tmp:
            frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                           duration=durations, loop=0)
        return path

