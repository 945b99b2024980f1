"""Resumable checkpoints in the run folder, and the Hugging Face export of a finished model.

A checkpoint is `<run>/checkpoints/step-NNNNNNN/`: accelerate's full state (weights, optimizer,
scheduler, RNG) plus `trainer_state.json`. It is written under a hidden temporary name and
renamed into place only when complete, so an interrupted save never becomes "the latest".
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from safetensors import SafetensorError

from ldm.data.store import atomic_folder
from ldm.errors import LdmError
from ldm.faults import kill_point

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
EXPORT_INFO = "ldm_export.json"
EXPORT_FORMAT = 1  # bump when an export's layout changes in a way older ldm cannot read
COMPAT_LIBRARIES = ("transformers", "torch")  # an export needs the same major version of these
_STEP_DIR = re.compile(r"^step-(\d+)$")


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
    import torch

    flag = torch.tensor([1.0 if failed else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum").item() > 0)


def save_checkpoint(accelerator, run_dir: str | Path, step: int, state: Dict[str, Any],
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


def library_versions() -> Dict[str, str]:
    """Return the versions of the libraries that shape an export."""
    import importlib.metadata as md

    out = {}
    for name in ("ldm", "torch", "transformers", "tokenizers", "safetensors", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def export_model(model, tokenizer, out_dir: str | Path, resolved_config_yaml: str,
                 info: Dict[str, Any], state_dict: Optional[Dict[str, Any]] = None) -> Path:
    """Write a Hugging Face export (safetensors + tokenizer + config) atomically; return it.

    `state_dict` replaces the model's own weights (FSDP: the gathered full weights).
    """
    out_dir = Path(out_dir)
    try:
        with atomic_folder(out_dir) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
            kill_point("export")
            tokenizer.save_pretrained(str(tmp))
            (tmp / "ldm_config.yaml").write_text(resolved_config_yaml)
            (tmp / EXPORT_INFO).write_text(json.dumps(
                {**info, "format": EXPORT_FORMAT, "versions": library_versions()},
                indent=2, default=str))
    except (OSError, RuntimeError, SafetensorError) as err:
        raise LdmError(f"could not write the export {out_dir}: {err}; nothing there was replaced. "
                       "Free space and re-run the same command: it resumes from the last "
                       "checkpoint and exports again") from err
    return out_dir


def _major(version: str) -> Optional[int]:
    match = re.match(r"\d+", str(version))
    return int(match.group()) if match else None


def check_export_compatible(folder: str | Path) -> Dict[str, Any]:
    """Return an export's ldm_export.json ({} for a plain Hugging Face folder), or raise LdmError.

    Refuses an export of a newer export format than this ldm reads, or one made with another
    major version of a library in COMPAT_LIBRARIES than the one installed.
    """
    path = Path(folder) / EXPORT_INFO
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise LdmError(f"{path} is not valid JSON ({err}); the export is damaged, export it "
                       "again") from err
    if not isinstance(info, dict):
        raise LdmError(f"{path} holds {type(info).__name__}, not an object; export it again")
    made = info.get("versions") if isinstance(info.get("versions"), dict) else {}
    fmt = info.get("format", 1)
    if not isinstance(fmt, int) or fmt > EXPORT_FORMAT:
        raise LdmError(f"export {folder} has export format {fmt!r} (made by ldm "
                       f"{made.get('ldm', '?')}); this ldm reads formats up to {EXPORT_FORMAT}: "
                       "upgrade ldm")
    installed = library_versions()
    for name in COMPAT_LIBRARIES:
        if made.get(name) and installed.get(name) and \
                _major(made[name]) != _major(installed[name]):
            raise LdmError(f"export {folder} was made with {name} {made[name]} but {name} "
                           f"{installed[name]} is installed; another major version may not load "
                           f"it the same way: install {name}=={_major(made[name])}.* or export "
                           "it again with this installation")
    return info
