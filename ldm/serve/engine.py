"""One loaded model serving the page: chat turns, infill and side-by-side runs, streamed step by step.

Every run is the library's sampler (`generate` or `infill`) on a worker thread; its per-step
callback hands each step to the request's generator through a small queue. The callback is also
where a run stops: when the page's stop button is pressed, the tab is closed, or the request's
generator is dropped, the run's stop event is set and the next step raises `Stopped`. The queue is
bounded, so a run whose reader went away cannot race ahead of it.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ldm.errors import ConfigError, LdmError
from ldm.sampling.decode import chat_banned_ids
from ldm.sampling.infill import infill
from ldm.sampling.prompts import check_prompt_text, encode_infill, parse_infill
from ldm.sampling.render import TokenPieces, clean_answer, step_title
from ldm.sampling.sampler import ModelFn, SamplerStep, generate
from ldm.sampling.settings import SamplerSettings
from ldm.serve.canvas import CommitTracker, canvas_html
from ldm.tokenizer import encode_chat


class Stopped(Exception):
    """Raised inside the sampler's step callback to end a run early."""


@dataclass
class Frame:
    """What the page shows of one run after a step, or at its end (`done`)."""

    index: int  # which run of the request (side by side: 0 and 1)
    html: str
    stats: str = ""
    text: Optional[str] = None  # the final text, at the end
    done: bool = False
    stopped: bool = False
    nfe: int = 0
    committed: int = 0


Job = Callable[[Callable[[SamplerStep], None], torch.Generator], Any]


class Engine:
    """The model, its tokenizer and the runs in flight, by browser session."""

    def __init__(self, model_fn: ModelFn, tok, *, mask_id: int,
                 max_positions: Optional[int] = None, device="cpu", seed: int = 0,
                 system: Optional[str] = None, vocab_size: Optional[int] = None):
        self.model_fn, self.tok, self.mask_id = model_fn, tok, mask_id
        self.eos_id, self.pad_id = tok.eos_token_id, tok.pad_token_id
        self.max_positions, self.device, self.seed, self.system = max_positions, device, seed, system
        self.special_ids = chat_banned_ids(tok, vocab_size)
        self.pieces = TokenPieces(tok)
        self._lock = threading.Lock()
        self._running: Dict[str, List[threading.Event]] = {}
        self.stats = {"runs": 0, "finished": 0, "stopped": 0, "steps": 0}
        self.abandon_after = 10.0  # seconds a step may wait unread before its run is stopped

    # --- runs in flight --------------------------------------------------------------------

    def stop(self, session: Optional[str]) -> int:
        """Stop every run of `session`; return how many were running."""
        with self._lock:
            events = list(self._running.get(session or "", []))
        for event in events:
            event.set()
        return len(events)

    def _count(self, what: str) -> None:
        with self._lock:
            self.stats[what] += 1

    def running(self) -> int:
        """Return the number of runs in flight."""
        with self._lock:
            return sum(len(v) for v in self._running.values())

    def _stream(self, jobs: Sequence[Job], session: Optional[str]
                ) -> Iterator[Tuple[int, str, Any]]:
        """Run `jobs` on worker threads; yield (job index, "step" | "done" | "stopped", payload)."""
        stop = threading.Event()
        key = session or ""
        with self._lock:
            self._running.setdefault(key, []).append(stop)
            self.stats["runs"] += len(jobs)
        channel: "queue.Queue" = queue.Queue(maxsize=2 * len(jobs))
        working = [len(jobs)]  # worker threads not yet ended

        def release():
            # The run leaves the runs in flight when its last worker ends or its reader closes,
            # whichever comes first: a cancelled request's generator may never be closed.
            with self._lock:
                runs = self._running.get(key, [])
                if stop in runs:  # an Event compares by identity
                    runs.remove(stop)
                    if not runs:
                        del self._running[key]

        def put(item, final=False):
            waited = 0.0
            while True:
                try:
                    channel.put(item, timeout=0.2)
                    return
                except queue.Full:
                    waited += 0.2
                    # A request whose reader went away (a cancelled or dropped event whose
                    # generator is not closed yet) must not hold the model: stop it.
                    if waited >= self.abandon_after:
                        stop.set()
                    if stop.is_set():
                        if final:
                            return  # nobody is reading any more
                        raise Stopped from None

        def work(index: int, job: Job):
            start = time.perf_counter()

            def on_step(step: SamplerStep):
                if stop.is_set():
                    raise Stopped
                self._count("steps")
                put((index, "step", step))

            try:
                generator = torch.Generator(device=torch.device(self.device)).manual_seed(self.seed)
                result = job(on_step, generator)
                self._count("finished")
                put((index, "done", (result, time.perf_counter() - start)), final=True)
            except Stopped:
                self._count("stopped")
                put((index, "stopped", time.perf_counter() - start), final=True)
            except BaseException as err:  # shown in the page; the server keeps serving
                put((index, "error", err), final=True)
            finally:
                with self._lock:
                    working[0] -= 1
                    last = working[0] == 0
                if last:
                    release()

        threads = [threading.Thread(target=work, args=(i, job), daemon=True)
                   for i, job in enumerate(jobs)]
        for thread in threads:
            thread.start()
        try:
            left = len(jobs)
            while left:
                index, kind, payload = channel.get()
                if kind == "error":
                    raise payload
                if kind != "step":
                    left -= 1
                yield index, kind, payload
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
            release()

    # --- chat and side by side -------------------------------------------------------------

    def chat_prompt(self, messages: List[Dict[str, str]], max_new_tokens: int
                    ) -> Tuple[List[int], int]:
        """Return (prompt ids, oldest exchanges dropped to fit the model's positions)."""
        for message in messages:
            check_prompt_text(message["content"], "that message")
        convo = ([{"role": "system", "content": self.system}] if self.system else []) + [
            dict(m) for m in messages]
        first = 1 if self.system else 0
        dropped = 0
        while True:
            ids = encode_chat(self.tok, convo, add_generation_prompt=True)[0]
            if self.max_positions is None or len(ids) + max_new_tokens <= self.max_positions:
                return ids, dropped
            if len(convo) - first < 3:
                raise ConfigError(
                    f"that message is {len(ids)} tokens with the chat layout; + max new tokens "
                    f"{max_new_tokens} = {len(ids) + max_new_tokens} exceeds the model's "
                    f"{self.max_positions} positions: write a shorter message or lower max new "
                    f"tokens")
            del convo[first:first + 2]
            dropped += 1

    def answer(self, messages: List[Dict[str, str]], runs: Sequence[SamplerSettings],
               session: Optional[str] = None) -> Iterator[Frame]:
        """Answer the conversation's last user turn once per settings in `runs`, step by step."""
        prompts = [self.chat_prompt(messages, settings.max_new_tokens)[0] for settings in runs]
        trackers = [CommitTracker() for _ in runs]
        latest: List[Optional[SamplerStep]] = [None] * len(runs)

        def job_for(ids, settings) -> Job:
            def job(on_step, generator):
                return generate(self.model_fn, [ids], settings, mask_id=self.mask_id,
                                eos_id=self.eos_id, special_ids=self.special_ids,
                                pad_id=self.pad_id, device=self.device, generator=generator,
                                record_history=False, on_step=on_step)
            return job

        jobs = [job_for(ids, settings) for ids, settings in zip(prompts, runs)]
        for index, kind, payload in self._stream(jobs, session):
            settings, tracker = runs[index], trackers[index]
            if kind == "step":
                latest[index] = payload
                born = tracker.update(payload)
                html = canvas_html(self.pieces, payload.answer[0].tolist(), mask_id=self.mask_id,
                                   born=born[0].tolist(), new=payload.committed[0].tolist(),
                                   total_steps=settings.steps, head=step_title(payload),
                                   eos_id=self.eos_id)
                committed = int((payload.answer[0] != self.mask_id).sum())
                yield Frame(index, html, f"step {tracker.steps} · {payload.nfe} model calls",
                            nfe=payload.nfe, committed=committed)
                continue
            step = latest[index]
            if kind == "stopped":
                ids = step.answer[0].tolist() if step is not None else []
                text = clean_answer(self.tok, ids, self.mask_id, self.eos_id)
                nfe = step.nfe if step is not None else 0
                head = f"stopped after {tracker.steps} steps"
                stats = f"stopped · {nfe} model calls · {payload:.2f} s"
            else:
                result, seconds = payload
                ids, nfe = result.answer[0].tolist(), result.nfe
                text = clean_answer(self.tok, result.tokens[0], self.mask_id, self.eos_id)
                tokens = len(result.tokens[0])
                head = f"done · {result.steps_run} steps · {nfe} model calls"
                stats = (f"{nfe} model calls · {seconds:.2f} s · "
                         f"{tokens / seconds if seconds > 0 else 0.0:.1f} tokens/s")
            born = tracker.born[0].tolist() if tracker.born is not None else None
            html = canvas_html(self.pieces, ids, mask_id=self.mask_id, born=born,
                               total_steps=settings.steps, head=head,
                               state="stopped" if kind == "stopped" else "done",
                               end_id=self.eos_id if kind == "done" else None,
                               eos_id=self.eos_id)
            yield Frame(index, html, stats, text=text, done=True, stopped=kind == "stopped",
                        nfe=nfe, committed=sum(1 for i in ids if i != self.mask_id))

    # --- infill ----------------------------------------------------------------------------

    def fill(self, text: str, settings: SamplerSettings, session: Optional[str] = None
             ) -> Iterator[Frame]:
        """Fill the [MASK:N] spans of `text` step by step; the last frame holds the filled text."""
        template = parse_infill(text, "the infill text")
        ids, ranges = encode_infill(self.tok, template, self.mask_id)
        if self.max_positions is not None and len(ids) > self.max_positions:
            raise ConfigError(f"the infill text is {len(ids)} tokens; the model has "
                              f"{self.max_positions} positions: shorten it")
        fixed = [not any(a <= p < b for a, b in ranges) for p in range(len(ids))]
        total = sum(b - a for a, b in ranges)
        tracker = CommitTracker()
        latest: Optional[SamplerStep] = None

        def job(on_step, generator):
            return infill(self.model_fn, [ids], settings, mask_id=self.mask_id,
                          pad_id=self.pad_id, banned_ids=[*self.special_ids, self.eos_id],
                          generator=generator, device=self.device, record_history=False,
                          on_step=on_step)

        for _, kind, payload in self._stream([job], session):
            if kind == "step":
                latest = payload
                born = tracker.update(payload)
                yield Frame(0, canvas_html(self.pieces, payload.answer[0].tolist(),
                                           mask_id=self.mask_id, born=born[0].tolist(),
                                           new=payload.committed[0].tolist(), fixed=fixed,
                                           total_steps=min(settings.steps, total),
                                           head=step_title(payload)),
                            f"step {tracker.steps} · {payload.nfe} model calls", nfe=payload.nfe)
                continue
            if kind == "stopped":
                filled = latest.answer[0].tolist() if latest is not None else ids
                stats, nfe = "stopped", latest.nfe if latest is not None else 0
            else:
                result, seconds = payload
                filled, nfe = result.tokens[0], result.nfe
                stats = (f"{nfe} model calls · {seconds:.2f} s · "
                         f"{total / seconds if seconds > 0 else 0.0:.1f} tokens/s")
            born = tracker.born[0].tolist() if tracker.born is not None else None
            html = canvas_html(self.pieces, filled, mask_id=self.mask_id, born=born, fixed=fixed,
                               total_steps=min(settings.steps, total), head=stats,
                               state="stopped" if kind == "stopped" else "done")
            out = self.tok.decode([i for i in filled if i != self.mask_id],
                                  skip_special_tokens=True).strip()
            yield Frame(0, html, stats, text=out, done=True, stopped=kind == "stopped", nfe=nfe)


def user_message(err: BaseException) -> str:
    """Return the one line the page shows for a failed request."""
    if isinstance(err, LdmError):
        return str(err)
    return f"the model run failed: {type(err).__name__}: {err}"
