"""What task=sample is asked to continue: prompt files, chat turns, and [MASK:N] infill templates.

User text is always encoded as text: a prompt that spells "[MASK]" or "<|end|>" gets the ids of
those characters, never the special token (chat turns go through `encode_chat`, raw text through
`split_special_tokens=True`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from ldm.errors import ConfigError, DataError
from ldm.tokenizer import check_messages, encode_chat

MASK_SPAN = re.compile(r"\[MASK:(\d+)\]")
PROMPT_SUFFIXES = (".txt", ".jsonl")
# C0 and C1 control characters (terminal escapes, NUL, ...) except tab, newline, carriage return
CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def check_prompt_text(text: str, where: str = "prompt") -> str:
    """Return `text`; raise DataError if it holds a control character (tab and newlines are fine)."""
    found = CONTROL_CHARACTER.search(text)
    if found:
        raise DataError(f"{where} has control character U+{ord(found.group()):04X} at character "
                        f"{found.start()}; prompts are plain text: remove it (tab and newline "
                        "are accepted)")
    return text


@dataclass
class Prompt:
    """One prompt: plain text, or a conversation whose next assistant turn is wanted."""

    text: str  # the raw text, or the last user turn of `messages`
    messages: Optional[List[dict]] = None  # chat turns before the answer (no system prompt added)
    reference: Optional[str] = None  # an assistant answer given with the prompt, kept for reading


def read_prompts_file(path: Union[str, Path], allow_empty: bool = False) -> List[Prompt]:
    """Return the prompts of a .txt (one per line) or .jsonl ("prompt" or "messages") file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompts_file={str(path)!r} does not exist; pass a .txt file with one "
                        f"prompt per line or a .jsonl file with a 'prompt' or 'messages' field")
    if path.suffix not in PROMPT_SUFFIXES:
        raise DataError(f"prompts_file={str(path)!r} has suffix {path.suffix!r}; accepted: "
                        f"{', '.join(PROMPT_SUFFIXES)}")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".txt":
        prompts = [Prompt(line.strip()) for line in lines if line.strip()]
    else:
        prompts = [_jsonl_prompt(line, n, path) for n, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise DataError(f"prompts_file={str(path)!r} holds no prompts")
    for n, prompt in enumerate(prompts, 1):
        if not allow_empty and not prompt.text.strip():
            raise DataError(f"prompts_file={str(path)!r}: prompt {n} is empty")
        for message in prompt.messages or [{"content": prompt.text}]:
            check_prompt_text(message["content"], f"prompts_file={str(path)!r} prompt {n}")
    return prompts


def _jsonl_prompt(line: str, n: int, path: Path) -> Prompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"prompts_file={str(path)!r} line {n} is not JSON: {err.msg}") from err
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
        return Prompt(row["prompt"], reference=row.get("answer") or row.get("response"))
    if isinstance(row, dict) and "messages" in row:
        messages = [dict(m) if isinstance(m, dict) else m for m in row["messages"] or []]
        check_messages(messages, f"prompts_file line {n}")
        reference = None
        if messages[-1]["role"] == "assistant":  # the answer to compare with, not a prompt turn
            reference = messages.pop()["content"]
        if not messages or messages[-1]["role"] != "user":
            raise DataError(f"prompts_file={str(path)!r} line {n}: the conversation must end "
                            f"with a user turn (optionally followed by its reference answer)")
        return Prompt(messages[-1]["content"], messages=messages, reference=reference)
    raise DataError(f"prompts_file={str(path)!r} line {n} has neither a string 'prompt' field "
                    f"nor a 'messages' list")


def chat_messages(prompt: Prompt, system: Optional[str] = None) -> List[dict]:
    """Return the conversation of `prompt`, with `system` first unless it already has one."""
    messages = [dict(m) for m in prompt.messages] if prompt.messages else [
        {"role": "user", "content": prompt.text}]
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def encode_prompt(tok, prompt: Prompt, chat: bool, system: Optional[str] = None) -> List[int]:
    """Return the ids the sampler continues: the chat layout + generation prompt, or raw text."""
    if chat:
        return encode_chat(tok, chat_messages(prompt, system), add_generation_prompt=True)[0]
    if prompt.messages:
        raise ConfigError("a 'messages' prompt needs chat=true (raw continuation takes text)")
    return encode_text(tok, prompt.text)


def encode_text(tok, text: str) -> List[int]:
    """Return the ids of `text` as plain text: no [CLS]/[SEP], special-token spellings kept."""
    if not text:
        return []
    return tok(text, add_special_tokens=False, split_special_tokens=True,
               return_attention_mask=False, return_token_type_ids=False)["input_ids"]


# --- infill ------------------------------------------------------------------------------------


@dataclass
class InfillTemplate:
    """Text with [MASK:N] spans: the text pieces around them and each span's length."""

    source: str
    pieces: List[str]  # len(spans) + 1 text pieces; spans sit between consecutive pieces
    spans: List[int] = field(default_factory=list)


def parse_infill(text: str, where: Optional[str] = None) -> InfillTemplate:
    """Return the template of `text`; raise ConfigError if it has no [MASK:N] span with N >= 1."""
    what = f"infill={text!r}" if where is None else f"{where} ({text!r})"
    check_prompt_text(text, what)
    parts = MASK_SPAN.split(text)
    pieces, spans = parts[0::2], [int(n) for n in parts[1::2]]
    if not spans:
        hint = " (a bare [MASK] stays text; write [MASK:N])" if "[MASK" in text else ""
        raise ConfigError(f"{what} has no [MASK:N] span{hint}; write e.g. "
                          f"infill=\"The [MASK:3] sat on the mat.\" or pass a file of such lines")
    if min(spans) < 1:
        raise ConfigError(f"{what} has a [MASK:0] span; each span needs N >= 1 tokens")
    return InfillTemplate(text, pieces, spans)


def read_infill(value: str) -> List[InfillTemplate]:
    """Return the templates of an infill string, or of a file holding one template per line."""
    path = Path(value)
    if "[MASK:" not in value and _is_file(path):
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise DataError(f"infill file {value!r} holds no lines")
        return [parse_infill(line, f"infill file {value!r} line {n}")
                for n, line in enumerate(lines, 1)]
    return [parse_infill(value)]


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a sentence too long to be a file name
        return False


def encode_infill(tok, template: InfillTemplate,
                  mask_id: int) -> Tuple[List[int], List[Tuple[int, int]]]:
    """Return (ids with mask_id at every span position, [start, end) of each span in ids)."""
    ids: List[int] = []
    ranges: List[Tuple[int, int]] = []
    for i, piece in enumerate(template.pieces):
        if i < len(template.spans):
            # In byte-level BPEs a word carries its leading space, so the space before a span
            # belongs to the first filled token, not to a lone space token before it.
            piece = piece.rstrip(" ")
        ids += encode_text(tok, piece)
        if i < len(template.spans):
            ranges.append((len(ids), len(ids) + template.spans[i]))
            ids += [mask_id] * template.spans[i]
    return ids, ranges


def infill_fills(ids: Sequence[int], ranges: Sequence[Tuple[int, int]]) -> List[List[int]]:
    """Return the ids that fill each span of a filled canvas."""
    return [list(ids[a:b]) for a, b in ranges]
