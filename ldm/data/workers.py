"""Tokenizing in worker processes, in order: what pretraining and chat data preparation share."""

from __future__ import annotations

import collections
import itertools
import multiprocessing as mp
from typing import Any, Callable, Iterable, Iterator, List, Sequence, Tuple


def batched(pairs: Iterator[Tuple[str, Any]], size: int) -> Iterator[Tuple[List[str], List[Any]]]:
    """Yield (splits, items) lists of at most `size` (split, item) pairs each."""
    while True:
        chunk = list(itertools.islice(pairs, size))
        if not chunk:
            return
        yield [s for s, _ in chunk], [item for _, item in chunk]


def encoded_in_order(batches: Iterable[Tuple[List[str], List[Any]]], encode: Callable,
                     num_workers: int, initializer: Callable, initargs: Sequence[Any],
                     encode_here: Callable) -> Iterator[Tuple[List[str], List[Any]]]:
    """Yield (splits, encoded items) per batch, in input order.

    With more than one worker, `encode` (a module-level function, run in `spawn`ed processes set
    up by `initializer(*initargs)`) gets the batches, at most 2 per worker queued so memory stays
    flat; otherwise `encode_here` runs them in this process.
    """
    if num_workers <= 1:
        for splits, items in batches:
            yield splits, encode_here(items)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(num_workers, initializer=initializer, initargs=tuple(initargs)) as pool:
        pending: collections.deque = collections.deque()
        for splits, items in batches:
            pending.append((splits, pool.apply_async(encode, (items,))))
            if len(pending) >= 2 * num_workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()
