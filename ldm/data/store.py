"""Prepared data on disk: fingerprints, manifests, atomic folders, and loading for later stages.

A prepared dataset is a folder `outputs/data/<dataset>/<tokenizer>/<context>` holding `train/`
and `test/` (saved with `datasets`), `tokenizer/`, and `manifest.json`. It is built in a hidden
temporary sibling and renamed into place only when complete, so a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from ldm.errors import DataError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TMP_MARK = ".tmp-"


def fingerprint(spec: Dict[str, Any]) -> str:
    """Return a short stable hash of a JSON-serialisable description."""
    blob = json.dumps({"format": FORMAT_VERSION, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def data_dir(data_root: str | Path, dataset: str, tokenizer_name: str, context_name: str) -> Path:
    """Return the folder where prepared data for (dataset, tokenizer, context) lives."""
    return Path(data_root) / dataset / tokenizer_name / context_name


def read_manifest(folder: str | Path) -> Optional[Dict[str, Any]]:
    """Return the manifest of a complete prepared dataset, or None when there is none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_reusable(folder: str | Path, fp: str) -> bool:
    """True when `folder` holds a complete prepared dataset with fingerprint `fp`."""
    manifest = read_manifest(folder)
    return manifest is not None and manifest.get("fingerprint") == fp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(final: Path) -> None:
    """Remove temporary build folders of `final` left by processes that no longer run."""
    if not final.parent.is_dir():
        return
    for tmp in final.parent.glob(f".{final.name}{TMP_MARK}*"):
        try:
            pid = int(tmp.name.split(TMP_MARK, 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces `final` only if the block completes.

    On any error the temporary folder is removed, `final` is left as it was, and parent folders
    this call created are removed again (when still empty), so a failed build leaves no trace.
    """
    final = Path(final)
    created = [p for p in (final.parent, *final.parent.parents) if not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final)
    tmp = final.parent / f".{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    done = False
    try:
        yield tmp
        give_umask_modes(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}{TMP_MARK}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        done = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            for parent in created:  # innermost first
                with contextlib.suppress(OSError):
                    parent.rmdir()


def give_umask_modes(folder: Path) -> None:
    """Give every file under `folder` the mode a plain new file gets (0666 less the umask).

    Some writers (safetensors, tempfile-based savers) create files 0600; an export or prepared
    data set is meant to be read like the rest of the folder it sits in.
    """
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) != mode:
            with contextlib.suppress(OSError):
                path.chmod(mode | (path.stat().st_mode & 0o111))


def write_manifest(folder: str | Path, manifest: Dict[str, Any]) -> None:
    """Write manifest.json (last, so its presence means the folder is complete)."""
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")


def load_split(folder: str | Path, split: str):
    """Return one split of prepared data as a memory-mapped `datasets.Dataset`."""
    from datasets import Dataset, concatenate_datasets

    shards = sorted((Path(folder) / split).glob("shard-*.arrow"))
    if not shards:
        raise DataError(f"prepared data at {folder} has no {split} split")
    parts = [Dataset.from_file(str(p)) for p in shards]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def load_prepared(folder: str | Path, prepare_command: str = "python run.py task=prepare ..."):
    """Return ({split: memory-mapped Dataset}, manifest), or raise naming the prepare command."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise DataError(f"no prepared data at {folder}; run `{prepare_command}` first")
    return {split: load_split(folder, split) for split in ("train", "test")}, manifest


def folder_bytes(folder: str | Path) -> int:
    """Return the total size in bytes of the files under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
