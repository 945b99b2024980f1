"""Pretraining data: split documents, tokenize in parallel, pack into fixed-length rows, save.

Documents stream through; the only things held in memory are one tokenizer batch per worker
and the packer's carry-over of less than one row, so memory does not grow with the corpus.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from ldm.data.store import atomic_folder, folder_bytes, write_manifest
from ldm.errors import ConfigError, DataError
from ldm.faults import kill_point
from ldm.tokenizer import TRAIN_BPE, id_dtype, train_bpe

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
ROWS_PER_SHARD = 1 << 16
BPE_TRAIN_MAX_DOCS = 200_000


def split_of(index: int, seed: int, test_pct: float) -> str:
    """Return "test" or "train" for document `index`: a seeded hash, so streams need no count."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") / 2.0**64 < test_pct else "train"


class Packer:
    """Turns documents of token ids into rows of exactly `length` ids.

    pack=True concatenates documents, each followed by EOS, and cuts rows; the last partial row
    is dropped or EOS-padded (`last_row`). pack=False is the original recipe's layout: each
    document (plus EOS) is chunked on its own and its last chunk is EOS-padded.
    """

    def __init__(self, length: int, eos_id: int, pack: bool = True, last_row: str = "drop",
                 dtype: str = "uint16"):
        self.length, self.eos_id, self.pack, self.last_row = length, eos_id, pack, last_row
        self.dtype = np.dtype(dtype)
        self.buffer = np.zeros(0, dtype=self.dtype)
        self.documents = self.tokens = self.rows = self.padding = self.dropped = 0

    def _pad(self, ids: np.ndarray) -> np.ndarray:
        extra = (-len(ids)) % self.length
        self.padding += extra
        return np.concatenate([ids, np.full(extra, self.eos_id, dtype=self.dtype)])

    def add(self, ids: np.ndarray) -> np.ndarray:
        """Add one document; return the completed rows as an array [n, length]."""
        doc = np.concatenate([ids.astype(self.dtype, copy=False),
                              np.array([self.eos_id], dtype=self.dtype)])
        self.documents += 1
        self.tokens += len(doc)
        if not self.pack:
            rows = self._pad(doc).reshape(-1, self.length)
            self.rows += len(rows)
            return rows
        buf = np.concatenate([self.buffer, doc]) if len(self.buffer) else doc
        n = len(buf) // self.length
        rows = buf[: n * self.length].reshape(n, self.length)
        self.buffer = buf[n * self.length:].copy()
        self.rows += n
        return rows

    def finish(self) -> np.ndarray:
        """Flush the carry-over: dropped, or padded into one last row (last_row=pad)."""
        rest, self.buffer = self.buffer, np.zeros(0, dtype=self.dtype)
        if not len(rest):
            return np.zeros((0, self.length), dtype=self.dtype)
        if self.last_row == "drop":
            self.dropped += len(rest)
            return np.zeros((0, self.length), dtype=self.dtype)
        self.rows += 1
        return self._pad(rest).reshape(1, self.length)

    def stats(self) -> Dict[str, Any]:
        """Return counts for the manifest."""
        stored = self.rows * self.length
        return {"documents": self.documents, "tokens": self.tokens, "rows": self.rows,
                "stored_tokens": stored, "padding_tokens": self.padding,
                "padding_fraction": self.padding / stored if stored else 0.0,
                "dropped_tokens": self.dropped}


class ShardWriter:
    """Writes rows to Arrow IPC shards `<folder>/shard-NNNNN.arrow` readable by `datasets`."""

    def __init__(self, folder: Path, length: int, dtype: str):
        import pyarrow as pa

        self.pa = pa
        self.folder, self.length = folder, length
        self.type = pa.from_numpy_dtype(np.dtype(dtype))
        self.schema = pa.schema([pa.field("input_ids", pa.list_(self.type, length))])
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard, self.in_shard, self.sink, self.writer = 0, 0, None, None
        self.pending: List[np.ndarray] = []
        self.pending_rows = 0

    def _open(self) -> None:
        path = self.folder / f"shard-{self.shard:05d}.arrow"
        self.sink = self.pa.OSFile(str(path), "wb")
        self.writer = self.pa.ipc.new_stream(self.sink, self.schema)

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sink.close()
            self.writer = self.sink = None

    def write(self, rows: np.ndarray) -> None:
        """Queue rows [n, length]; they reach disk in record batches."""
        if len(rows):
            self.pending.append(rows)
            self.pending_rows += len(rows)
            if self.pending_rows >= 4096:
                self.flush()

    def flush(self) -> None:
        """Write queued rows, starting a new shard every ROWS_PER_SHARD rows."""
        if not self.pending:
            return
        rows = np.concatenate(self.pending)
        self.pending, self.pending_rows = [], 0
        while len(rows):
            if self.writer is None:
                self._open()
            take = min(len(rows), ROWS_PER_SHARD - self.in_shard)
            flat = self.pa.array(rows[:take].reshape(-1), type=self.type)
            column = self.pa.FixedSizeListArray.from_arrays(flat, self.length)
            self.writer.write_batch(self.pa.record_batch([column], schema=self.schema))
            rows, self.in_shard = rows[take:], self.in_shard + take
            if self.in_shard == ROWS_PER_SHARD:
                self._close()
                self.shard, self.in_shard = self.shard + 1, 0

    def close(self) -> None:
        """Flush and close; an empty split still gets one (empty) shard."""
        self.flush()
        if self.writer is None and self.shard == 0:
            self._open()
        self._close()


# --- tokenization workers ----------------------------------------------------------------------

_TOKENIZER = None


def _init_worker(tokenizer_dir: str) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    _TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_dir)
    _TOKENIZER.model_max_length = 1 << 60  # documents are long on purpose; rows are cut later


def _encode(texts: List[str]) -> List[np.ndarray]:
    # split_special_tokens: a document that spells "[MASK]" or "[SEP]" is text, never the special
    # id (a real mask id in a clean row would be a training target; an EOS would end a document)
    enc = _TOKENIZER(texts, add_special_tokens=False, split_special_tokens=True,
                     return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    return [np.asarray(ids, dtype=np.uint32) for ids in enc]


def _encoded_batches(batches: Iterable[Tuple[List[str], List[str]]], tokenizer_dir: str,
                     num_workers: int) -> Iterator[Tuple[List[str], List[np.ndarray]]]:
    """Yield (splits, token arrays) per batch, in order, with at most 2 batches per worker queued."""
    if num_workers <= 1:
        _init_worker(tokenizer_dir)
        for splits, texts in batches:
            yield splits, _encode(texts)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer_dir,)) as pool:
        pending: collections.deque = collections.deque()
        for splits, texts in batches:
            pending.append((splits, pool.apply_async(_encode, (texts,))))
            if len(pending) >= 2 * num_workers:
                done_splits, result = pending.popleft()
                yield done_splits, result.get()
        while pending:
            done_splits, result = pending.popleft()
            yield done_splits, result.get()


def _split_documents(texts: Iterable[str], seed: int, test_pct: float,
                     max_documents: Optional[int]) -> Iterator[Tuple[str, str]]:
    for index, text in enumerate(itertools.islice(texts, max_documents)):
        if not isinstance(text, str):
            raise DataError(f"document {index} is {type(text).__name__}, expected text")
        yield split_of(index, seed, test_pct), text


def _batched(pairs: Iterator[Tuple[str, str]], size: int) -> Iterator[Tuple[List[str], List[str]]]:
    while True:
        chunk = list(itertools.islice(pairs, size))
        if not chunk:
            return
        yield [s for s, _ in chunk], [t for _, t in chunk]


def build_pretraining_data(
    documents: Callable[[], Iterable[str]],
    final: str | Path,
    *,
    tokenizer,
    context_length: int,
    test_split_pct: float,
    split_seed: int,
    pack: bool = True,
    last_row: str = "drop",
    num_workers: int = 1,
    batch_size: int = 256,
    max_documents: Optional[int] = None,
    bpe_vocab_size: Optional[int] = None,
    manifest_extra: Optional[Dict[str, Any]] = None,
    progress: bool = True,
    dtype: Optional[str] = None,
) -> Dict[str, Any]:
    """Build packed train/test rows at `final` (atomically) and return the manifest.

    `documents()` returns a fresh iterable of document strings. `tokenizer` is a loaded
    tokenizer, or "train_bpe" to train a byte-level BPE of `bpe_vocab_size` on the train split.
    `dtype` overrides the smallest id type (e.g. the original recipe's int64, for comparison).
    """
    from tqdm.auto import tqdm

    if last_row not in ("drop", "pad"):
        raise ConfigError(f"task.last_row={last_row!r}; accepted: drop, pad")
    started = time.perf_counter()
    with atomic_folder(final) as tmp:
        tok_dir = tmp / "tokenizer"
        if tokenizer == TRAIN_BPE:
            train_texts = (t for s, t in _split_documents(documents(), split_seed, test_split_pct,
                                                          max_documents) if s == "train")
            log.info("training a byte-level BPE tokenizer (vocab %s) on the train split", bpe_vocab_size)
            tokenizer = train_bpe(itertools.islice(train_texts, BPE_TRAIN_MAX_DOCS),
                                  bpe_vocab_size, tok_dir)
        else:
            tokenizer.save_pretrained(str(tok_dir))
        dtype = dtype or id_dtype(len(tokenizer))
        eos_id = tokenizer.eos_token_id
        packers = {s: Packer(context_length, eos_id, pack, last_row, dtype) for s in SPLITS}
        writers = {s: ShardWriter(tmp / s, context_length, dtype) for s in SPLITS}
        pairs = _split_documents(documents(), split_seed, test_split_pct, max_documents)
        bar = tqdm(desc="tokenize + pack", unit="doc", disable=not progress)
        unk_id = tokenizer.unk_token_id
        unknown = dict.fromkeys(SPLITS, 0)
        for splits, arrays in _encoded_batches(_batched(pairs, batch_size), str(tok_dir),
                                               num_workers):
            for split, ids in zip(splits, arrays):
                if unk_id is not None:
                    unknown[split] += int(np.count_nonzero(ids == unk_id))
                writers[split].write(packers[split].add(ids))
            bar.update(len(arrays))
            kill_point(f"prepare.tokenize:{sum(p.documents for p in packers.values())}")
            bar.set_postfix(tokens=packers["train"].tokens + packers["test"].tokens, refresh=False)
        bar.close()
        for split in SPLITS:
            writers[split].write(packers[split].finish())
            writers[split].close()
        stats = {s: {**packers[s].stats(), "unknown_tokens": unknown[s]} for s in SPLITS}
        total_docs = stats["train"]["documents"] + stats["test"]["documents"]
        if total_docs == 0:
            raise DataError("the corpus is empty: the source produced no documents")
        for split in SPLITS:
            if stats[split]["rows"] == 0:
                raise DataError(
                    f"the {split} split has no complete row of {context_length} tokens "
                    f"({stats[split]['documents']} documents, {stats[split]['tokens']} tokens); "
                    "use a larger corpus, a shorter context, task.last_row=pad, "
                    "dataset.txt_unit=paragraph (more, smaller documents), or change "
                    "dataset.test_split_pct or dataset.split_seed (which documents are held out)"
                )
            size = folder_bytes(tmp / split)
            stats[split]["bytes"] = size
            stats[split]["bytes_per_token"] = size / stats[split]["stored_tokens"]
        elapsed = time.perf_counter() - started
        manifest = {
            **(manifest_extra or {}),
            "context_length": context_length, "pack": pack, "last_row": last_row,
            "test_split_pct": test_split_pct, "split_seed": split_seed, "dtype": dtype,
            "vocab_size": len(tokenizer), "eos_id": eos_id, "mask_id": tokenizer.mask_token_id,
            "splits": stats, "seconds": round(elapsed, 3),
            "unk_token": tokenizer.unk_token, "unknown_tokens": sum(unknown.values()),
            "unknown_of_tokens": stats["train"]["tokens"] + stats["test"]["tokens"],
            "tokens_per_second": (stats["train"]["tokens"] + stats["test"]["tokens"]) / elapsed,
        }
        write_manifest(tmp, manifest)
        kill_point("prepare.write")
    return manifest
