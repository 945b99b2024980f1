"""A sampling session: one loaded model sampling prompts in batches, infill canvases, or chat turns.

Each sample becomes one JSON line (prompt, answer, nfe, seconds, tokens/s, sampler settings) written
as soon as it exists, so an interrupted REPL keeps its transcript. Rendering (live terminal or
GIF frames) hangs off the sampler's per-step history.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ldm.sampling.decode import chat_banned_ids
from ldm.sampling.infill import infill as infill_canvases
from ldm.sampling.prompts import (InfillTemplate, Prompt, chat_messages, check_prompt_text,
                                  infill_fills)
from ldm.sampling.render import GifRecorder, LiveView, clean_answer
from ldm.sampling.sampler import ModelFn, generate
from ldm.sampling.settings import SamplerSettings
from ldm.errors import DataError
from ldm.faults import fault_injection, kill_point
from ldm.tokenizer import encode_chat


class Session:
    """Samples with fixed settings and records every result in a JSONL file."""

    def __init__(self, model_fn: ModelFn, tok, *, mask_id: int, sampler: SamplerSettings,
                 path: Path, batch_size: int = 8, seed: int = 0, device="cpu",
                 render: str = "none", record_extra: Optional[Dict[str, Any]] = None,
                 console=None, echo: bool = True, vocab_size: Optional[int] = None):
        self.model_fn, self.tok, self.mask_id, self.sampler = model_fn, tok, mask_id, sampler
        self.eos_id, self.pad_id = tok.eos_token_id, tok.pad_token_id
        self.special_ids = chat_banned_ids(tok, vocab_size)
        self.path, self.batch_size, self.device = Path(path), batch_size, torch.device(device)
        self.render, self.max_positions = render, sampler.max_positions
        self.console, self.echo = console, echo
        self.extra = dict(record_extra or {})
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.gif = GifRecorder(tok, mask_id) if render == "gif" else None
        self.records: List[Dict[str, Any]] = []
        self._file = None
        self._answers = 0  # chat answers begun (fault injection names them chat.answer:N)

    # --- bookkeeping ---------------------------------------------------------------------------

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, record: Dict[str, Any]) -> None:
        """Append one sample to the JSONL file (earlier runs' lines in it are kept)."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        record = {**record, **self.extra}
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        self.records.append(record)

    def summary(self) -> Dict[str, float]:
        """Return mean nfe and seconds per sampler call, and tokens/s over the whole session."""
        calls = {r["call"]: r for r in self.records}.values()
        seconds = sum(r["seconds"] for r in calls)
        tokens = sum(r["tokens"] for r in self.records)
        return {"samples": float(len(self.records)),
                "mean_nfe": sum(r["nfe"] for r in calls) / len(calls),
                "mean_seconds": seconds / len(calls),
                "tokens_per_second": tokens / seconds if seconds > 0 else 0.0}

    def save_gif(self, out: str | Path) -> Path:
        """Write the recorded frames as a GIF at `out`; return the path."""
        return self.gif.save(out)

    # --- sampling ------------------------------------------------------------------------------

    def _timed(self, call: Callable[..., Any], labels: Sequence[str]) -> Tuple[Any, float]:
        """Run a sampler call (live view or history as the render asks); return (result, s)."""
        history = self.gif is not None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if self.render == "live":
            with LiveView(self.tok, labels, self.mask_id, console=self.console) as view:
                result = call(record_history=False, on_step=view)
        else:
            result = call(record_history=history)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if history:
            self.gif.add_history(result.history, labels)
        return result, seconds

    def _generate(self, prompt_ids: List[List[int]], labels: Sequence[str], on_step=None):
        def call(**render):
            if on_step is not None and "on_step" not in render and fault_injection():
                render["on_step"] = on_step
            return generate(self.model_fn, prompt_ids, self.sampler, mask_id=self.mask_id,
                            eos_id=self.eos_id, special_ids=self.special_ids, pad_id=self.pad_id,
                            generator=self.generator, device=self.device, **render)
        return self._timed(call, labels)

    @staticmethod
    def _common(call: int, result, seconds: float, size: int, tokens: int,
                batch_tokens: int) -> Dict[str, Any]:
        """Return the record fields shared by every sample of one sampler call."""
        return {"nfe": result.nfe, "steps_run": result.steps_run, "seconds": round(seconds, 4),
                "batch_size": size, "tokens": tokens,
                "tokens_per_second": round(batch_tokens / seconds, 3) if seconds > 0 else 0.0,
                "call": call}

    def _print(self, prompt: str, answer: str) -> None:
        if self.echo:
            print(f"> {prompt}\n{answer}\n", flush=True)

    def prompts(self, jobs: Sequence[Tuple[List[int], Prompt]], chat: bool,
                system: Optional[str] = None) -> None:
        """Sample an answer (chat) or continuation (raw) for every (ids, prompt), in batches."""
        for lo in range(0, len(jobs), self.batch_size):
            batch = jobs[lo:lo + self.batch_size]
            labels = [p.text or "(unconditional)" for _, p in batch]
            result, seconds = self._generate([ids for ids, _ in batch], labels)
            call, total = lo // self.batch_size, sum(len(t) for t in result.tokens)
            for i, (ids, prompt) in enumerate(batch):
                answer = clean_answer(self.tok, result.tokens[i], self.mask_id, self.eos_id)
                record = {"mode": "chat" if chat else ("raw" if prompt.text else "unconditional"),
                          "prompt": prompt.text, "answer": answer, "eos": result.eos[i],
                          "prompt_ids": ids, "answer_ids": result.tokens[i],
                          **self._common(call, result, seconds, len(batch), len(result.tokens[i]),
                                         total)}
                if chat:
                    record["messages"] = chat_messages(prompt, system)
                if prompt.reference is not None:
                    record["reference"] = prompt.reference
                self.write(record)
                self._print(labels[i], answer)

    def infill(self, canvases: Sequence[Tuple[List[int], List[Tuple[int, int]]]],
               templates: Sequence[InfillTemplate]) -> None:
        """Fill the [MASK:N] spans of every canvas, in batches, using text on both sides."""
        for lo in range(0, len(canvases), self.batch_size):
            batch = canvases[lo:lo + self.batch_size]

            def call(**render):
                return infill_canvases(self.model_fn, [ids for ids, _ in batch], self.sampler,
                                       mask_id=self.mask_id, pad_id=self.pad_id,
                                       banned_ids=[*self.special_ids, self.eos_id],
                                       generator=self.generator, device=self.device, **render)

            result, seconds = self._timed(call, [""] * len(batch))
            total = sum(b - a for _, ranges in batch for a, b in ranges)
            for i, (ids, ranges) in enumerate(batch):
                filled = result.tokens[i]
                template = templates[lo + i]
                fills = infill_fills(filled, ranges)
                record = {"mode": "infill", "prompt": template.source,
                          "answer": self.tok.decode(filled, skip_special_tokens=True).strip(),
                          "fills": [self.tok.decode(f, skip_special_tokens=True) for f in fills],
                          "prompt_ids": ids, "answer_ids": filled, "spans": ranges,
                          **self._common(lo // self.batch_size, result, seconds, len(batch),
                                         sum(b - a for a, b in ranges), total)}
                self.write(record)
                self._print(template.source, record["answer"])

    def chat_turn(self, messages: List[Dict[str, str]], turn: int) -> Optional[str]:
        """Answer the conversation's last user turn; return the answer (None if it cannot fit)."""
        ids = self._fit(messages)
        if ids is None:
            return None
        self._answers += 1
        point = f"chat.answer:{self._answers}"
        result, seconds = self._generate([ids], [messages[-1]["content"]],
                                         on_step=lambda _: kill_point(point))
        answer = clean_answer(self.tok, result.tokens[0], self.mask_id, self.eos_id)
        self.write({"mode": "interactive", "turn": turn, "prompt": messages[-1]["content"],
                    "answer": answer, "eos": result.eos[0], "messages": [dict(m) for m in messages],
                    "prompt_ids": ids, "answer_ids": result.tokens[0],
                    **self._common(turn, result, seconds, 1, len(result.tokens[0]),
                                   len(result.tokens[0]))})
        return answer

    def _fit(self, messages: List[Dict[str, str]]) -> Optional[List[int]]:
        """Return the prompt ids, dropping the oldest exchanges while it is too long to answer."""
        room = self.sampler.prompt_budget
        while True:
            ids = encode_chat(self.tok, messages, add_generation_prompt=True)[0]
            if room is None or len(ids) <= room:
                return ids
            first = 1 if messages[0]["role"] == "system" else 0
            if len(messages) - first < 3:
                return None
            del messages[first:first + 2]  # the oldest user turn and its answer


BANNER = "chat: type a message and press Enter; /exit or Ctrl-D to leave, Ctrl-C to stop an answer"
EMPTY_ANSWER = "(empty answer)"
STOPPED = "(answer stopped)"


def repl(session: Session, system: Optional[str] = None,
         read: Callable[[str], str] = input, banner: str = BANNER) -> int:
    """Run the chat REPL and return the number of turns answered.

    `> ` prompts; /exit, Ctrl-D (EOF) or Ctrl-C at the prompt end it cleanly; Ctrl-C while an
    answer is being sampled stops that answer (it is neither shown nor kept in the history) and
    returns to the prompt.
    """
    messages: List[Dict[str, str]] = [{"role": "system", "content": system}] if system else []
    turn = 0
    if banner:
        print(banner, flush=True)
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            print(flush=True)
            break
        if line.strip() == "/exit":
            break
        if not line.strip():
            continue
        try:
            check_prompt_text(line, "that message")
        except DataError as err:
            print(err, file=sys.stderr, flush=True)
            continue
        messages.append({"role": "user", "content": line.strip()})
        try:
            answer = session.chat_turn(messages, turn)
        except KeyboardInterrupt:
            messages.pop()
            print(STOPPED, flush=True)
            continue
        if answer is None:
            messages.pop()
            print(f"that message is too long for the model's {session.max_positions} positions "
                  f"with max_new_tokens={session.sampler.max_new_tokens}; write a shorter one",
                  file=sys.stderr, flush=True)
            continue
        print(answer if answer.strip() else EMPTY_ANSWER, flush=True)
        messages.append({"role": "assistant", "content": answer})
        turn += 1
    return turn
