"""SFT data: conversations -> chat-layout token ids + answer mask, split, saved like pretraining.

One conversation is one example (never packed). `answer_mask` is 1 on the tokens SFT may mask
and is trained on: every assistant turn's text and its EOS (or only the last assistant turn's,
answer_turns="last"), plus, with padding="eos", the EOS padding up to the context length
(LLaDA's SFT recipe: the model learns to fill the rest of the canvas with EOS). System and user
turns and the role headers are 0: prompt tokens are never masked.

Layout on disk (read with `ldm.data.store.load_split`): `<final>/{train,test}/shard-*.arrow`
with columns `input_ids` (id dtype), `answer_mask` (uint8), `length` (tokens before padding);
padding="eos" stores fixed-size rows of context_length, padding="dynamic" and padding="batch"
unpadded rows (batch: EOS-padded when batched, to the longest row of each micro-batch, the EOS
visible and maskable as in LLaDA; see ldm/train/data.py), padding="answer" rows of the prompt plus exactly `answer_positions` answer tokens (the last answer,
its EOS and EOS padding, all maskable): a row then looks like the sampler's canvas (prompt +
max_new_tokens masks), which a small model needs in order to place its answer (measured in
benchmarks/RESULTS.md, "make quickstart").
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from ldm.data.pretrain import ROWS_PER_SHARD, SPLITS, split_of
from ldm.data.store import atomic_folder, folder_bytes, write_manifest
from ldm.data.workers import batched, encoded_in_order
from ldm.errors import ConfigError, DataError
from ldm.faults import kill_point
from ldm.tokenizer import (ANSWER_TURNS, CHAT_TOKENS, add_chat_template, check_messages,
                           encode_chat, id_dtype)

log = logging.getLogger(__name__)

PADDINGS = ("eos", "dynamic", "answer", "batch")
OVERLONG = ("drop", "truncate")
Example = Tuple[np.ndarray, np.ndarray]


def trim_to_last_answer(messages: List[dict]) -> List[dict]:
    """Return `messages` without the turns after the last assistant turn (they teach nothing)."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
    return list(messages[: last + 1])


def check_answer_positions(padding: str, answer_positions, context_length: int) -> None:
    """Raise ConfigError unless answer_positions suits the padding.

    Needed by "answer" (the exact answer area); optional for "batch" (the least answer area a
    batch gives each row); not read by the others.
    """
    if padding == "batch" and answer_positions is not None:
        if (not isinstance(answer_positions, int) or isinstance(answer_positions, bool)
                or not 1 <= answer_positions < context_length):
            raise ConfigError(f"dataset.padding=batch takes dataset.answer_positions as the least "
                              f"answer area (answer + EOS padding) of a row in a batch: null or an "
                              f"integer in 1..{context_length - 1}; got {answer_positions!r}")
        return
    if padding != "answer":
        return
    if (not isinstance(answer_positions, int) or isinstance(answer_positions, bool)
            or not 2 <= answer_positions < context_length):
        raise ConfigError(f"dataset.padding=answer needs dataset.answer_positions, an integer in "
                          f"2..{context_length - 1} (the answer and its EOS padding, in tokens, "
                          f"below the context length {context_length}); got {answer_positions!r}")


def canvas_mismatch(padding: Optional[str], answer_positions: Optional[int],
                    max_new_tokens: int) -> Optional[str]:
    """Return a warning when the sampler's canvas differs from the answer area trained on."""
    if padding != "answer" or answer_positions == max_new_tokens:
        return None
    return (f"the model was trained with answers padded to {answer_positions} tokens "
            f"(dataset.padding=answer) but sampler.max_new_tokens={max_new_tokens}: a canvas "
            f"laid out unlike the training rows; set sampler.max_new_tokens={answer_positions}")


def last_answer_start(mask: np.ndarray) -> int:
    """Return the index where the last answer span (the tail of 1s in `mask`) begins."""
    prompt = np.flatnonzero(mask == 0)
    return int(prompt[-1]) + 1 if len(prompt) else 0


def fit_answer_area(ids: np.ndarray, mask: np.ndarray, context_length: int, answer_positions: int,
                    overlong: str) -> Tuple[Optional[Example], str, int]:
    """Return ((ids, mask) or None, outcome, row length) for padding="answer".

    The row is the prompt plus exactly `answer_positions` answer tokens: the answer and its EOS,
    then EOS padding. An answer longer than that is dropped (or cut, overlong="truncate"); a
    prompt that leaves no room for the answer area within the context is dropped.
    """
    start = last_answer_start(mask)
    row = start + answer_positions
    if row > context_length:
        return None, "dropped_overlong", row
    if len(ids) <= row:
        return (ids, mask), "kept", row
    if overlong == "drop":
        return None, "dropped_overlong", row
    return (ids[:row], mask[:row]), "truncated", row


def fit_example(ids: np.ndarray, mask: np.ndarray, context_length: int, overlong: str
                ) -> Tuple[Optional[Example], str]:
    """Return ((ids, mask) or None, outcome): kept, truncated, dropped_overlong|dropped_no_answer."""
    if len(ids) <= context_length:
        return (ids, mask), "kept"
    if overlong == "drop":
        return None, "dropped_overlong"
    ids, mask = ids[:context_length], mask[:context_length]
    if not mask.any():
        return None, "dropped_no_answer"
    return (ids, mask), "truncated"


class ExampleWriter:
    """Writes examples to Arrow IPC shards `<folder>/shard-NNNNN.arrow` readable by `datasets`.

    With `length` set, rows are padded with `pad_id` (answer mask 1) to fixed-size lists;
    without, rows are variable-length lists.
    """

    def __init__(self, folder: Path, dtype: str, length: Optional[int], pad_id: int):
        import pyarrow as pa

        self.pa, self.folder, self.length, self.pad_id = pa, folder, length, pad_id
        self.dtype = np.dtype(dtype)
        self.id_type = pa.from_numpy_dtype(self.dtype)
        list_of = (lambda t: pa.list_(t, length)) if length else pa.list_
        self.schema = pa.schema([pa.field("input_ids", list_of(self.id_type)),
                                 pa.field("answer_mask", list_of(pa.uint8())),
                                 pa.field("length", pa.uint32())])
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard, self.in_shard, self.sink, self.writer = 0, 0, None, None
        self.pending: List[Tuple[np.ndarray, np.ndarray, int]] = []

    def write(self, ids: np.ndarray, mask: np.ndarray, pad_to: Optional[int] = None) -> int:
        """Queue one example (padded to `pad_to` tokens, or the fixed length); return the padding."""
        real = len(ids)
        extra = (self.length or pad_to or real) - real
        if extra:
            ids = np.concatenate([ids, np.full(extra, self.pad_id, dtype=ids.dtype)])
            mask = np.concatenate([mask, np.ones(extra, dtype=np.uint8)])
        self.pending.append((ids.astype(self.dtype, copy=False), mask.astype(np.uint8, copy=False),
                             real))
        if len(self.pending) >= 4096:
            self.flush()
        return extra

    def _column(self, rows: List[np.ndarray], value_type):
        flat = self.pa.array(np.concatenate(rows), type=value_type)
        if self.length:
            return self.pa.FixedSizeListArray.from_arrays(flat, self.length)
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)
        return self.pa.ListArray.from_arrays(self.pa.array(offsets), flat)

    def flush(self) -> None:
        """Write queued examples, starting a new shard every ROWS_PER_SHARD rows."""
        rows, self.pending = self.pending, []
        while rows:
            if self.writer is None:
                path = self.folder / f"shard-{self.shard:05d}.arrow"
                self.sink = self.pa.OSFile(str(path), "wb")
                self.writer = self.pa.ipc.new_stream(self.sink, self.schema)
            room = ROWS_PER_SHARD - self.in_shard
            take, rows = rows[:room], rows[room:]
            batch = self.pa.record_batch(
                [self._column([i for i, _, _ in take], self.id_type),
                 self._column([m for _, m, _ in take], self.pa.uint8()),
                 self.pa.array([n for _, _, n in take], type=self.pa.uint32())], schema=self.schema)
            self.writer.write_batch(batch)
            self.in_shard += len(take)
            if self.in_shard == ROWS_PER_SHARD:
                self._close()
                self.shard, self.in_shard = self.shard + 1, 0

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sink.close()
            self.writer = self.sink = None

    def close(self) -> None:
        """Flush and close; an empty split still gets one (empty) shard."""
        self.flush()
        if self.writer is None and self.shard == 0:
            self.pending = []
            self.sink = self.pa.OSFile(str(self.folder / "shard-00000.arrow"), "wb")
            self.writer = self.pa.ipc.new_stream(self.sink, self.schema)
        self._close()


# --- tokenization workers ----------------------------------------------------------------------

_TOKENIZER = None
_ANSWER_TURNS = "all"


def _init_worker(tokenizer_dir: str, answer_turns: str) -> None:
    global _TOKENIZER, _ANSWER_TURNS
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    _TOKENIZER, _ANSWER_TURNS = AutoTokenizer.from_pretrained(tokenizer_dir), answer_turns


def _encode(conversations: List[List[dict]], tok=None, answer_turns: Optional[str] = None
            ) -> List[Example]:
    if tok is None:
        tok, answer_turns = _TOKENIZER, _ANSWER_TURNS
    out = []
    for messages in conversations:
        ids, mask = encode_chat(tok, messages, answer_turns=answer_turns)
        out.append((np.asarray(ids, dtype=np.uint32), np.asarray(mask, dtype=np.uint8)))
    return out


def _split_conversations(conversations: Iterable[List[dict]], seed: int, test_pct: float,
                         max_examples: Optional[int]) -> Iterator[Tuple[str, List[dict]]]:
    for index, messages in enumerate(itertools.islice(conversations, max_examples)):
        check_messages(messages, f"conversation {index}")
        messages = trim_to_last_answer(messages)
        if not messages:
            raise DataError(f"conversation {index} has no assistant turn; nothing to learn from it")
        yield split_of(index, seed, test_pct), messages


def _new_stats() -> Dict[str, Any]:
    keys = ("examples", "kept", "truncated", "dropped_overlong", "dropped_no_answer",
            "answer_tokens", "prompt_tokens", "padding_tokens", "stored_tokens", "longest",
            "encoded_tokens", "unknown_tokens")
    return dict.fromkeys(keys, 0)


def _finish_stats(stats: Dict[str, Any]) -> Dict[str, Any]:
    stored = stats["stored_tokens"]
    stats["padding_fraction"] = stats["padding_tokens"] / stored if stored else 0.0
    stats["maskable_tokens"] = stats["answer_tokens"] + stats["padding_tokens"]
    return stats


def build_sft_data(
    conversations: Callable[[], Iterable[List[dict]]],
    final: str | Path,
    *,
    tokenizer,
    context_length: int,
    test_split_pct: float,
    split_seed: int,
    answer_turns: str = "all",
    padding: str = "eos",
    overlong: str = "drop",
    answer_positions: Optional[int] = None,
    num_workers: int = 1,
    batch_size: int = 256,
    max_examples: Optional[int] = None,
    manifest_extra: Optional[Dict[str, Any]] = None,
    progress: bool = True,
    manifest_late: Optional[Callable[[], Dict[str, Any]]] = None,
) -> Dict[str, Any]:
    """Build train/test SFT examples at `final` (atomically) and return the manifest.

    `conversations()` returns a fresh iterable of conversations (lists of {role, content});
    a `ConversationSource` also reports how many bad records it skipped. `tokenizer` is a
    loaded tokenizer; the chat tokens and template are added to it (vocabulary may grow).
    """
    from tqdm.auto import tqdm

    for name, value, accepted in (("answer_turns", answer_turns, ANSWER_TURNS),
                                  ("padding", padding, PADDINGS), ("overlong", overlong, OVERLONG)):
        if value not in accepted:
            raise ConfigError(f"{name}={value!r}; accepted: {', '.join(accepted)}")
    if isinstance(tokenizer, str):
        raise ConfigError(f"build_sft_data needs a loaded tokenizer, got {tokenizer!r}; "
                          "load the pretrained model's tokenizer with ldm.tokenizer.load_tokenizer")
    if context_length < 2:
        raise ConfigError(f"context_length={context_length} is too short for a chat example")
    check_answer_positions(padding, answer_positions, context_length)
    started = time.perf_counter()
    tokenizer = add_chat_template(tokenizer)
    with atomic_folder(final) as tmp:
        tok_dir = tmp / "tokenizer"
        tokenizer.save_pretrained(str(tok_dir))
        dtype = id_dtype(len(tokenizer))
        eos_id = tokenizer.eos_token_id
        unk_id = tokenizer.unk_token_id
        row_length = context_length if padding == "eos" else None
        writers = {s: ExampleWriter(tmp / s, dtype, row_length, eos_id) for s in SPLITS}
        stats = {s: _new_stats() for s in SPLITS}
        pairs = _split_conversations(conversations(), split_seed, test_split_pct, max_examples)
        bar = tqdm(desc="chat template + answer mask", unit="example", disable=not progress)
        encoded = encoded_in_order(batched(pairs, batch_size), _encode, num_workers,
                                   _init_worker, (str(tok_dir), answer_turns),
                                   lambda convs: _encode(convs, tokenizer, answer_turns))
        for splits, examples in encoded:
            for split, (ids, mask) in zip(splits, examples):
                st = stats[split]
                st["examples"] += 1
                st["encoded_tokens"] += len(ids)
                if unk_id is not None:
                    st["unknown_tokens"] += int(np.count_nonzero(ids == unk_id))
                st["longest"] = max(st["longest"], len(ids))
                pad_to = None
                if padding == "answer":
                    fitted, outcome, pad_to = fit_answer_area(ids, mask, context_length,
                                                              answer_positions, overlong)
                else:
                    fitted, outcome = fit_example(ids, mask, context_length, overlong)
                if fitted is None:
                    st[outcome] += 1
                    continue
                ids, mask = fitted
                st["kept"] += 1
                st["truncated"] += outcome == "truncated"
                answer = int(mask.sum())
                st["answer_tokens"] += answer
                st["prompt_tokens"] += len(ids) - answer
                pad = writers[split].write(ids, mask, pad_to)
                st["padding_tokens"] += pad
                st["stored_tokens"] += len(ids) + pad
            bar.update(len(examples))
            kill_point(f"prepare.tokenize:{sum(st['examples'] for st in stats.values())}")
        bar.close()
        for split in SPLITS:
            writers[split].close()
            _finish_stats(stats[split])
        _check_kept(stats, context_length, overlong)
        for split in SPLITS:
            stats[split]["bytes"] = folder_bytes(tmp / split)
        skipped = int(getattr(conversations, "skipped_bad", 0))
        counts = {key: stats["train"][key] + stats["test"][key]
                  for key in ("examples", "kept", "truncated", "dropped_overlong",
                              "dropped_no_answer", "answer_tokens", "prompt_tokens",
                              "padding_tokens", "stored_tokens")}
        counts["skipped_bad"] = skipped
        _finish_stats(counts)
        elapsed = time.perf_counter() - started
        manifest = {
            **(manifest_extra or {}),
            "kind": "chat", "context_length": context_length, "padding": padding,
            **({"answer_positions": answer_positions} if padding == "answer" else {}),
            "overlong": overlong, "answer_turns": answer_turns,
            "answer_mask": ("1 on assistant text + its EOS"
                            + (" (last assistant turn only)" if answer_turns == "last" else "")
                            + (" + the EOS padding" if padding == "eos" else "")
                            + (" + the EOS padding added per batch" if padding == "batch" else "")
                            + (f" + the EOS padding to {answer_positions} answer tokens"
                               if padding == "answer" else "")
                            + "; 0 on system/user turns and role headers"),
            "columns": ["input_ids", "answer_mask", "length"],
            "test_split_pct": test_split_pct, "split_seed": split_seed, "dtype": dtype,
            "vocab_size": len(tokenizer), "eos_id": eos_id, "mask_id": tokenizer.mask_token_id,
            "chat_tokens": {t: tokenizer.convert_tokens_to_ids(t) for t in CHAT_TOKENS},
            "counts": counts, "splits": stats, "seconds": round(elapsed, 3),
            "unk_token": tokenizer.unk_token,
            "unknown_tokens": stats["train"]["unknown_tokens"] + stats["test"]["unknown_tokens"],
            "unknown_of_tokens": stats["train"]["encoded_tokens"] + stats["test"]["encoded_tokens"],
        }
        # fields known only once the source was read (a mixture's realised shares)
        manifest.update(manifest_late() if manifest_late else {})
        write_manifest(tmp, manifest)
        kill_point("prepare.write")
    log.info("SFT data: kept %d of %d conversations (%d truncated, %d dropped as longer than %d "
             "tokens, %d dropped with no answer token left, %d bad records skipped)",
             counts["kept"], counts["examples"], counts["truncated"], counts["dropped_overlong"],
             context_length, counts["dropped_no_answer"], skipped)
    return manifest


def _check_kept(stats: Dict[str, Dict[str, Any]], context_length: int, overlong: str) -> None:
    examples = stats["train"]["examples"] + stats["test"]["examples"]
    if examples == 0:
        raise DataError("the chat source produced no conversations")
    if stats["train"]["kept"] + stats["test"]["kept"] == 0:
        longest = max(stats["train"]["longest"], stats["test"]["longest"])
        if overlong == "drop":
            raise DataError(f"every one of the {examples} examples is longer than the context of "
                            f"{context_length} tokens (longest: {longest}), so all were dropped; "
                            "use a longer context or overlong=truncate")
        raise DataError(f"no example keeps an answer token within the context of {context_length} "
                        f"tokens (longest: {longest}); use a longer context")
    for split in SPLITS:
        if stats[split]["kept"] == 0:
            raise DataError(f"the {split} split has no example ({stats[split]['examples']} "
                            f"conversations, {stats[split]['dropped_overlong']} dropped as too "
                            "long); use more data, or change dataset.test_split_pct or "
                            "dataset.split_seed (which conversations are held out)")
