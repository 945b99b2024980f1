"""Resumable checkpoints in the run folder (the export of a finished model is `ldm/export.py`).

A checkpoint is `<run>/checkpoints/step-NNNNNNN/`: accelerate's full state (weights, optimizer,
scheduler, RNG) plus `trainer_state.json`. It is written under a hidden temporary name and
renamed into place only when complete, so an interrupted save never becomes "the latest".
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from safetensors import SafetensorError

from ldm.errors import LdmError
from ldm.faults import kill_point

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """The loop's counters, saved with each checkpoint (trainer_state.json, beside the step)."""

    tokens_seen: int = 0
    skipped_steps: int = 0  # non-finite steps skipped under task.skip_nonfinite
    scaler_skipped_steps: int = 0  # fp16 loss-scale overflows
    scheduler_steps: int = 0  # lr schedule steps taken: the scheduler's whole state
    stopped: str = ""  # why training ended before max_steps ("" = it did not)
    extra: Dict[str, object] = field(default_factory=dict)  # saved as they are, never read back

    COUNTERS = ("tokens_seen", "skipped_steps", "scaler_skipped_steps", "scheduler_steps")

    def record(self) -> Dict[str, Any]:
        """Return the state as a checkpoint saves it."""
        return {**{name: getattr(self, name) for name in self.COUNTERS}, "stopped": self.stopped,
                **self.extra}

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Take the counters and the stop reason a checkpoint saved (those it has)."""
        for name in (*self.COUNTERS, "stopped"):
            if name in saved:
                setattr(self, name, saved[name])


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Return the folder holding a run's checkpoints."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Return the complete checkpoints of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """Return the newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_state(checkpoint: str | Path) -> Dict[str, Any]:
    """Return the trainer state saved with a checkpoint."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise LdmError(f"{checkpoint} is not a complete checkpoint (no {STATE_FILE}); "
                       "pass a folder like <run>/checkpoints/step-0000100")
    return json.loads(path.read_text())


def failed_anywhere(accelerator, failed: bool) -> bool:
    """Return True when `failed` is True on any process (every process calls this; it syncs)."""
    if accelerator.num_processes == 1:
        return failed
    flag = torch.tensor([1.0 if failed else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum").item() > 0)


def save_checkpoint(accelerator, run_dir: str | Path, step: int, state: Mapping[str, Any],
                    keep_last: int) -> Path:
    """Save the full training state at `step` (every process calls this) and return its folder."""
    folder = checkpoint_dir(run_dir)
    final = folder / f"step-{step:07d}"
    tmp = folder / f".step-{step:07d}.partial"
    error: Optional[BaseException] = None
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        kill_point(f"save:{step}")
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
    except (OSError, RuntimeError, SafetensorError) as err:
        # a full disk or a refused write: OSError from Python, SafetensorError from the weights'
        # writer, RuntimeError from torch.save's (optimizer state)
        error = err
    # every process writes a part (its RNG state; FSDP: its shard): all agree before the rename
    if failed_anywhere(accelerator, error is not None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        raise LdmError(
            f"could not save the checkpoint of step {step} under {folder}: "
            f"{error or 'another process could not write its part'}; the previous "
            f"checkpoint ({previous.name if previous else 'none'}) is intact"
        ) from error
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_source(run_dir: str | Path, resume: bool, resume_from: Optional[str]) -> Optional[Path]:
    """Return the checkpoint a run continues from: resume_from, else (with resume) the latest."""
    if resume_from:
        return Path(resume_from)
    return latest_checkpoint(run_dir) if resume else None


def resume(accelerator, source: Path, state: TrainState, scheduler) -> int:
    """Load checkpoint `source` into the prepared model, optimizer and RNGs, its counters into
    `state` and the lr schedule's position into `scheduler`; return the step it was saved at.

    Raises LdmError naming the checkpoint when it is damaged or belongs to another model.
    """
    saved = read_state(source)
    kill_point("resume")
    try:
        accelerator.load_state(str(source))
    except (SafetensorError, pickle.UnpicklingError, EOFError, OSError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        part = "model.safetensors" if isinstance(err, SafetensorError) else "optimizer.bin"
        raise LdmError(f"checkpoint {source} cannot be read: {part} is damaged or holds more "
                       f"than tensors ({reason}); resume from an earlier one with "
                       "task.resume_from=<run>/checkpoints/step-N, or delete it") from err
    except (RuntimeError, KeyError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise LdmError(f"checkpoint {source} does not fit this model and optimizer ({reason}); "
                       "it was saved by a different architecture or vocabulary") from err
    step = int(saved["step"])
    state.restore(saved)
    # The scheduler is not in accelerate's checkpoint (see the loop); the optimizer's own state
    # holds the current lr.
    scheduler.last_epoch = int(state.scheduler_steps)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    log.info("resumed from %s at step %d", source, step)
    return step
