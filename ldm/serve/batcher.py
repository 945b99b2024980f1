"""Concurrent API requests share the model: those that can share a canvas run as one batch.

Requests wait in a queue; the worker takes the oldest, waits up to `window_s` from its arrival
for others with the same sampler settings, and answers them all with one `generate` call over
their left-padded prompts. Only deterministic settings (greedy, no random remasking or random
reveals) are batched, so a batched answer is the answer the request gets alone; a sampled request
runs alone with its own seed, so the same seed gives the same answer. Each request's settled text
(answer tokens with nothing masked before them) is handed out as it grows, and a request whose
answer is finished is answered at once, while the rest of its batch goes on.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ldm.sampling.render import clean_answer
from ldm.sampling.sampler import ModelFn, SamplerStep, generate
from ldm.sampling.settings import SamplerSettings


class Cancelled(Exception):
    """Raised inside the sampler's step callback when every request of a batch went away."""


def deterministic(settings: SamplerSettings) -> bool:
    """Return True when the settings draw nothing at random (so batch-mates cannot matter)."""
    return settings.temperature == 0 and settings.remasking != "random" and \
        settings.rule != "original"


@dataclass
class Job:
    """One request: its prompt ids and settings, and where its answer goes.

    `emit(kind, payload)` is called from the worker thread with ("text", new text),
    ("done", {text, finish_reason, completion_tokens, model_calls, batch}) or ("error", exc).
    """

    prompt: List[int]
    settings: SamplerSettings
    emit: Callable[[str, Any], None]
    seed: int = 0
    stops: Sequence[str] = ()
    arrived: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)


class TextStream:
    """The settled text of one answer, handed out in order: never a stop string, never retracted."""

    def __init__(self, tok, job: Job, mask_id: int, eos_id: int):
        self.tok, self.job, self.mask_id, self.eos_id = tok, job, mask_id, eos_id
        self.sent = ""
        self.hold = max((len(s) for s in job.stops if s), default=1) - 1
        self.finished = False
        self.calls = 0

    def text(self, ids: Sequence[int]) -> tuple:
        """Return (text cut at the first stop string, whether a stop string was found)."""
        text = clean_answer(self.tok, ids, self.mask_id, self.eos_id)
        cut = min((i for i in (text.find(s) for s in self.job.stops if s) if i != -1),
                  default=-1)
        return (text[:cut], True) if cut != -1 else (text, False)

    def update(self, answer: List[int]) -> bool:
        """Hand out newly settled text of `answer`; return True when the answer is complete."""
        first_mask = answer.index(self.mask_id) if self.mask_id in answer else len(answer)
        settled = answer[:first_mask]
        text, stopped = self.text(settled)
        complete = stopped or self.eos_id in settled
        safe = text if complete else text[:max(0, len(text) - self.hold)]
        if not complete and safe.endswith("\ufffd"):
            safe = safe.rstrip("\ufffd")  # a character whose bytes are not all settled yet
        if len(safe) > len(self.sent) and safe.startswith(self.sent):
            self.job.emit("text", safe[len(self.sent):])
            self.sent = safe
        return complete

    def finish(self, answer: List[int], batch: int) -> None:
        """Send what is left of the final text and the request's figures."""
        if self.finished:
            return
        self.finished = True
        ids = answer[: answer.index(self.eos_id)] if self.eos_id in answer else answer
        text, stopped = self.text(answer)
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.job.emit("text", text[len(self.sent):])
        ended = stopped or self.eos_id in answer
        self.job.emit("done", {
            "text": text, "finish_reason": "stop" if ended else "length",
            "completion_tokens": sum(1 for i in ids if i != self.mask_id),
            "model_calls": self.calls * (2 if self.job.settings.cfg_scale > 0 else 1),
            "batch": batch})


class Batcher:
    """Answers jobs on one worker thread, batching those that arrive together and can share."""

    def __init__(self, model_fn: ModelFn, tok, *, mask_id: int, special_ids: Sequence[int],
                 device="cpu", window_s: float = 0.02, max_batch: int = 16):
        self.model_fn, self.tok, self.mask_id = model_fn, tok, mask_id
        self.eos_id, self.pad_id = tok.eos_token_id, tok.pad_token_id
        self.special_ids, self.device = list(special_ids), device
        self.window_s, self.max_batch = window_s, max_batch
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._pending: List[Job] = []
        self.stats: Dict[str, int] = {"requests": 0, "batches": 0, "largest": 0}
        self._thread = threading.Thread(target=self._work, name="ldm-batcher", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`; its answer arrives through job.emit."""
        self._queue.put(job)

    def close(self) -> None:
        """Stop the worker once the jobs it holds are answered."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=60)

    @staticmethod
    def key(job: Job) -> Any:
        """Return what jobs must share to be answered in one canvas (the job itself: alone)."""
        return job.settings if deterministic(job.settings) else id(job)

    def _take(self, block: bool) -> bool:
        """Move queued jobs to the pending list; return False once closed."""
        try:
            job = self._queue.get(block=block, timeout=None)
            while True:
                if job is None:
                    return False
                self._pending.append(job)
                job = self._queue.get_nowait()
        except queue.Empty:
            return True

    def _work(self) -> None:
        open_ = True
        while open_ or self._pending:
            if not self._pending:
                open_ = self._take(block=True)
                if not self._pending:
                    continue
            first = self._pending[0]
            key = self.key(first)
            while open_:
                same = sum(1 for j in self._pending if self.key(j) == key)
                left = first.arrived + self.window_s - time.monotonic()
                if same >= self.max_batch or left <= 0 or not isinstance(key, SamplerSettings):
                    break
                try:
                    job = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if job is None:
                    open_ = False
                else:
                    self._pending.append(job)
            if open_:
                open_ = self._take(block=False)
            group = [j for j in self._pending if self.key(j) == key][: self.max_batch]
            self._pending = [j for j in self._pending if all(j is not g for g in group)]
            group = [j for j in group if not j.cancelled.is_set()]
            if group:
                self._run(group)

    def _run(self, group: List[Job]) -> None:
        """Answer `group` with one generate call."""
        self.stats["requests"] += len(group)
        self.stats["batches"] += 1
        self.stats["largest"] = max(self.stats["largest"], len(group))
        streams = [TextStream(self.tok, job, self.mask_id, self.eos_id) for job in group]
        size = len(group)

        def on_step(step: SamplerStep) -> None:
            if all(job.cancelled.is_set() for job in group):
                raise Cancelled
            in_call = step.committed.any(1).tolist()  # a row that committed was in the call
            for row, stream in enumerate(streams):
                if stream.finished:
                    continue
                stream.calls += int(in_call[row])
                answer = step.answer[row].tolist()
                if stream.update(answer):
                    stream.finish(answer, size)

        try:
            generator = torch.Generator(device=torch.device(self.device)).manual_seed(
                group[0].seed)
            result = generate(self.model_fn, [job.prompt for job in group], group[0].settings,
                              mask_id=self.mask_id, eos_id=self.eos_id,
                              special_ids=self.special_ids, pad_id=self.pad_id,
                              device=self.device, generator=generator, record_history=False,
                              on_step=on_step)
        except Cancelled:
            return
        except BaseException as err:  # answered as an error; the server keeps serving
            for stream in streams:
                if not stream.finished:
                    stream.finished = True
                    stream.job.emit("error", err)
            return
        for row, stream in enumerate(streams):
            stream.finish(result.answer[row].tolist(), size)
