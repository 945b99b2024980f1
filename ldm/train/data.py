"""Which rows each process reads at each step: a pure function of (seed, step), no loader state.

The rows form an endless stream of epochs, each a seeded permutation of the data set. Step s
reads stream positions [s * G, (s + 1) * G) for global batch G; inside that window micro-batch m
of process r reads positions (m * P + r) * M ... + M. So a resumed run reads exactly the batches
an uninterrupted run would have, and ranks never overlap.

Length-grouped (`lengths` given, task.group_by_length): each epoch's permutation is cut into
groups of GROUP_BATCHES global batches; a group's rows are sorted longest first and cut into
global batches, whose order inside the group is shuffled (seeded by seed, epoch and group). A
global batch then holds rows of similar length and its micro-batches (contiguous slices of it)
even more so, so batch-level padding wastes little. An epoch is floor(rows / G) whole batches (the
few rows left over differ from epoch to epoch); the very first batch is the one holding the
longest rows, so a run that runs out of memory does so at once.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np
import torch

from ldm.data.sft import last_answer_start
from ldm.errors import ConfigError


def check_batch_layout(global_batch: int, micro_batch: int, accumulation: int, processes: int) -> None:
    """Raise ConfigError unless global batch = micro-batch x accumulation x processes."""
    if min(global_batch, micro_batch, accumulation, processes) < 1:
        raise ConfigError(
            f"batch numbers must be >= 1: task.global_batch_size={global_batch}, "
            f"hardware.micro_batch_size={micro_batch}, "
            f"hardware.gradient_accumulation_steps={accumulation}, processes={processes}"
        )
    if micro_batch * accumulation * processes != global_batch:
        raise ConfigError(
            f"task.global_batch_size={global_batch} != hardware.micro_batch_size={micro_batch} x "
            f"hardware.gradient_accumulation_steps={accumulation} x {processes} process(es) = "
            f"{micro_batch * accumulation * processes}; change one of them so they agree"
        )


GROUP_BATCHES = 50  # global batches per length group (the Hugging Face Trainer's megabatch is 50)


def resolve_accumulation(value, global_batch: int, micro_batch: int, processes: int) -> int:
    """Return the micro-batches per optimizer step: `value`, or with "auto" the global batch
    divided by micro-batch x processes (a ConfigError when that does not divide)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        per_step = micro_batch * processes
        if micro_batch < 1 or processes < 1 or global_batch < 1 or global_batch % per_step:
            raise ConfigError(
                f"hardware.gradient_accumulation_steps=auto: task.global_batch_size={global_batch} "
                f"is not a whole multiple of hardware.micro_batch_size={micro_batch} x {processes} "
                f"process(es) = {per_step}; change one of them")
        return global_batch // per_step
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"hardware.gradient_accumulation_steps={value!r}; accepted: an integer "
                          ">= 1 or auto (global batch / (micro-batch x processes))")
    return value


class BatchPlan:
    """Maps (step, micro-batch, rank) to row indices of a data set of `num_rows` rows.

    With `lengths` (one per row) the rows of a step are length-grouped (module docstring).
    """

    def __init__(self, num_rows: int, seed: int, global_batch: int, micro_batch: int,
                 accumulation: int, processes: int, lengths: Optional[np.ndarray] = None,
                 group_batches: int = GROUP_BATCHES):
        check_batch_layout(global_batch, micro_batch, accumulation, processes)
        if num_rows < 1:
            raise ConfigError("the training split has no rows")
        self.num_rows, self.seed = num_rows, seed
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.accumulation, self.processes = accumulation, processes
        self._epoch: Optional[int] = None
        self._perm: Optional[np.ndarray] = None
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        if self.lengths is not None:
            if len(self.lengths) != num_rows:
                raise ValueError(f"{len(self.lengths)} lengths for {num_rows} rows")
            if num_rows < global_batch:
                raise ConfigError(f"task.group_by_length needs at least task.global_batch_size="
                                  f"{global_batch} training rows; the training split has "
                                  f"{num_rows}; set task.group_by_length=false")
        self.group_batches = max(1, int(group_batches))
        self._group: Optional[tuple] = None
        self._batches: Optional[np.ndarray] = None

    def permutation(self, epoch: int) -> np.ndarray:
        """Return the row order of one epoch (seeded by seed and epoch)."""
        if self._epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._epoch = rng.permutation(self.num_rows), epoch
        return self._perm

    def indices(self, step: int, micro: int, rank: int) -> np.ndarray:
        """Return the row indices of micro-batch `micro` of process `rank` at optimizer `step`."""
        offset = (micro * self.processes + rank) * self.micro_batch
        if self.lengths is not None:
            return self.grouped_batch(step)[offset:offset + self.micro_batch]
        start = step * self.global_batch + offset
        positions = np.arange(start, start + self.micro_batch)
        out = np.empty(self.micro_batch, dtype=np.int64)
        for epoch in np.unique(positions // self.num_rows):
            sel = positions // self.num_rows == epoch
            out[sel] = self.permutation(int(epoch))[positions[sel] % self.num_rows]
        return out

    def batches_per_epoch(self) -> int:
        """Return the global batches of one length-grouped epoch (whole batches only)."""
        return self.num_rows // self.global_batch

    def grouped_batch(self, step: int) -> np.ndarray:
        """Return the global batch of `step` (row indices, longest first), length-grouped."""
        epoch, slot = divmod(step, self.batches_per_epoch())
        group, slot = divmod(slot, self.group_batches)
        if self._group != (epoch, group):
            first = group * self.group_batches
            count = min(self.group_batches, self.batches_per_epoch() - first)
            order = self.permutation(epoch)
            if epoch == 0:  # the longest row of all moves into the first group
                order = order.copy()
                at = int(np.flatnonzero(order == int(np.argmax(self.lengths)))[0])
                order[[0, at]] = order[[at, 0]]
            rows = order[first * self.global_batch:(first + count) * self.global_batch]
            # longest first; ties keep the permutation's (random) order
            rows = rows[np.argsort(-self.lengths[rows], kind="stable")]
            batches = rows.reshape(count, self.global_batch)
            order = np.random.default_rng([self.seed, epoch, group, 1]).permutation(count)
            if epoch == 0 and group == 0:  # the longest batch first: memory trouble shows at once
                order = np.concatenate([[0], order[order != 0]])
            self._batches, self._group = batches[order], (epoch, group)
        return self._batches[slot]

    def epoch_of(self, step: int) -> float:
        """Return how many passes over the data `step` steps make."""
        return step * self.global_batch / self.num_rows


def packed_collate(rows: Dict[str, np.ndarray], device) -> Dict[str, Optional[torch.Tensor]]:
    """Return model inputs for packed pretraining rows: every token real and maskable."""
    ids = torch.as_tensor(np.asarray(rows["input_ids"]).astype(np.int64), device=device)
    return {"input_ids": ids, "maskable": None, "attention_mask": None}


def chat_collate(pad_id: int, eos_id: Optional[int] = None, multiple: int = 1,
                 min_answer: Optional[int] = None, limit: Optional[int] = None,
                 per_row: bool = False):
    """Return a collate for SFT rows: answer tokens maskable; variable rows padded per batch.

    Fixed rows (padding eos / answer) carry their EOS padding already. Variable rows are padded
    per micro-batch: with `eos_id` (padding=batch) every row gets EOS up to the batch's width, the
    longest row's length (at least its last answer's start + `min_answer`) rounded up to
    `multiple` and at most `limit`; those EOS are visible and maskable, as in LLaDA's SFT. With
    `per_row` (held-out batches) each row is EOS-padded to its own width instead and the batch
    filled with attention-masked PAD, so a row's held-out NELBO does not depend on which rows
    share its batch. Without `eos_id` (padding=dynamic) the fill is attention-masked PAD, never a
    target.
    """
    def collate(rows: Dict[str, np.ndarray], device) -> Dict[str, Optional[torch.Tensor]]:
        ids, masks = rows["input_ids"], rows["answer_mask"]
        if isinstance(ids, np.ndarray) and ids.dtype != object and ids.ndim == 2:
            # fixed rows, EOS-padded: every position is a real token (LLaDA SFT)
            maskable = masks.astype(bool)
            out = {"input_ids": torch.as_tensor(ids.astype(np.int64), device=device),
                   "maskable": torch.as_tensor(maskable, device=device),
                   "attention_mask": None}
            if "length" in rows:
                # the answer proper: maskable tokens before the row's EOS padding
                before = np.arange(ids.shape[1])[None, :] < np.asarray(rows["length"])[:, None]
                out["answer"] = torch.as_tensor(maskable & before, device=device)
                out["answer_tokens"] = int((maskable & before).sum())  # counted on the host
            return out
        lengths = np.array([len(r) for r in ids], dtype=np.int64)
        widths = lengths
        if eos_id is not None:
            widths = eos_widths(lengths, masks, multiple, min_answer, limit)
            if not per_row:
                widths = np.full_like(widths, widths.max())
        width = int(widths.max())
        batch = np.full((len(ids), width), pad_id, dtype=np.int64)
        maskable = np.zeros((len(ids), width), dtype=bool)
        attention = np.zeros((len(ids), width), dtype=np.int64)
        for i, (row, mask) in enumerate(zip(ids, masks)):
            n, w = len(row), int(widths[i])
            batch[i, :n], maskable[i, :n], attention[i, :w] = row, mask, 1
            if w > n:  # EOS padding: a real, maskable token (padding=batch)
                batch[i, n:w], maskable[i, n:w] = eos_id, True
        # the answer proper ends at the row's stored `length` (padding=answer rows carry EOS
        # padding of their own beyond it)
        ends = np.asarray(rows["length"], dtype=np.int64) if "length" in rows else lengths
        answer = maskable & (np.arange(width)[None, :] < ends[:, None])
        full = bool(attention.all())  # every position real: no mask needed (faster attention)
        return {"input_ids": torch.as_tensor(batch, device=device),
                "maskable": torch.as_tensor(maskable, device=device),
                "attention_mask": None if full else torch.as_tensor(attention, device=device),
                "answer": torch.as_tensor(answer, device=device),
                "answer_tokens": int(answer.sum())}  # counted on the host: no device sync
    return collate


def eos_widths(lengths: np.ndarray, masks, multiple: int, min_answer: Optional[int],
               limit: Optional[int]) -> np.ndarray:
    """Return each row's EOS-padded width under padding=batch (before the batch's maximum).

    A row needs its own length and, with `min_answer`, its last answer's start + min_answer
    positions (so even the longest row of a batch keeps an answer area of EOS to fill); the
    width is rounded up to `multiple` and capped at `limit` (the context length).
    """
    need = lengths.copy()
    if min_answer:
        starts = np.array([last_answer_start(np.asarray(m)) for m in masks], dtype=np.int64)
        need = np.maximum(need, starts + min_answer)
    step = max(int(multiple), 1)
    need = -(-need // step) * step
    if limit:
        need = np.minimum(need, max(int(limit), int(lengths.max())))
    return need


def collate_for_rows(manifest: dict, pad_id: int, eos_id: Optional[int], dataset_cfg=None,
                     heldout: bool = False):
    """Return the collate for prepared chat rows laid out as `manifest` records.

    padding=batch reads `dataset.pad_to_multiple` and `dataset.answer_positions` (the least
    answer area) from `dataset_cfg`; `heldout` pads each row to its own width (see chat_collate).
    """
    if manifest.get("padding") != "batch":
        return chat_collate(pad_id)
    if eos_id is None:
        raise ConfigError("dataset.padding=batch pads with EOS, but the tokenizer has no EOS token")
    multiple = int(dataset_cfg.get("pad_to_multiple", 1) or 1) if dataset_cfg is not None else 1
    min_answer = dataset_cfg.get("answer_positions") if dataset_cfg is not None else None
    return chat_collate(pad_id, eos_id, multiple=multiple, min_answer=min_answer,
                        limit=manifest.get("context_length"), per_row=heldout)


Collate = Callable[[Dict[str, np.ndarray], torch.device], Dict[str, Optional[torch.Tensor]]]


def step_generator(seed: int, step: int, micro: int, rank: int, device) -> torch.Generator:
    """Return the RNG for the masking of one micro-batch, a pure function of its coordinates."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) * 65_537 + micro * 4_099 + rank)
    return gen
