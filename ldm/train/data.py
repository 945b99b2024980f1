"""Which rows each process reads at each step: a pure function of (seed, step), no loader state.

The rows form an endless stream of epochs, each a seeded permutation of the data set. Step s
reads stream positions [s * G, (s + 1) * G) for global batch G; inside that window micro-batch m
of process r reads positions (m * P + r) * M ... + M. So a resumed run reads exactly the batches
an uninterrupted run would have, and ranks never overlap.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np
import torch

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


class BatchPlan:
    """Maps (step, micro-batch, rank) to row indices of a data set of `num_rows` rows."""

    def __init__(self, num_rows: int, seed: int, global_batch: int, micro_batch: int,
                 accumulation: int, processes: int):
        check_batch_layout(global_batch, micro_batch, accumulation, processes)
        if num_rows < 1:
            raise ConfigError("the training split has no rows")
        self.num_rows, self.seed = num_rows, seed
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.accumulation, self.processes = accumulation, processes
        self._epoch: Optional[int] = None
        self._perm: Optional[np.ndarray] = None

    def permutation(self, epoch: int) -> np.ndarray:
        """Return the row order of one epoch (seeded by seed and epoch)."""
        if self._epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._epoch = rng.permutation(self.num_rows), epoch
        return self._perm

    def indices(self, step: int, micro: int, rank: int) -> np.ndarray:
        """Return the row indices of micro-batch `micro` of process `rank` at optimizer `step`."""
        start = step * self.global_batch + (micro * self.processes + rank) * self.micro_batch
        positions = np.arange(start, start + self.micro_batch)
        out = np.empty(self.micro_batch, dtype=np.int64)
        for epoch in np.unique(positions // self.num_rows):
            sel = positions // self.num_rows == epoch
            out[sel] = self.permutation(int(epoch))[positions[sel] % self.num_rows]
        return out

    def epoch_of(self, step: int) -> float:
        """Return how many passes over the data `step` steps make."""
        return step * self.global_batch / self.num_rows


def packed_collate(rows: Dict[str, np.ndarray], device) -> Dict[str, Optional[torch.Tensor]]:
    """Return model inputs for packed pretraining rows: every token real and maskable."""
    ids = torch.as_tensor(np.asarray(rows["input_ids"]).astype(np.int64), device=device)
    return {"input_ids": ids, "maskable": None, "attention_mask": None}


def chat_collate(pad_id: int):
    """Return a collate for SFT rows: answer tokens maskable; variable rows padded per batch."""
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
            return out
        width = max(len(r) for r in ids)
        batch = np.full((len(ids), width), pad_id, dtype=np.int64)
        maskable = np.zeros((len(ids), width), dtype=bool)
        attention = np.zeros((len(ids), width), dtype=np.int64)
        for i, (row, mask) in enumerate(zip(ids, masks)):
            batch[i, :len(row)], maskable[i, :len(row)], attention[i, :len(row)] = row, mask, 1
        maskable_t = torch.as_tensor(maskable, device=device)
        answer = maskable
        if "length" in rows:  # rows may hold EOS padding of their own (padding="answer")
            answer = maskable & (np.arange(width)[None, :] < np.asarray(rows["length"])[:, None])
        return {"input_ids": torch.as_tensor(batch, device=device), "maskable": maskable_t,
                "attention_mask": torch.as_tensor(attention, device=device),
                "answer": torch.as_tensor(answer, device=device)}
    return collate


Collate = Callable[[Dict[str, np.ndarray], torch.device], Dict[str, Optional[torch.Tensor]]]


def step_generator(seed: int, step: int, micro: int, rank: int, device) -> torch.Generator:
    """Return the RNG for the masking of one micro-batch, a pure function of its coordinates."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) * 65_537 + micro * 4_099 + rank)
    return gen
