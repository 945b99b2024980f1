"""What prepared data was made from, and whether a run names the same sources.

A source description is the JSON-able dict a source opener returns (`{"source": "local",
"files": [{"path", "size", "mtime_ns"}, ...], ...}`, a synthetic generator's settings, a
package, a hub list, or `{"mix": [...]}` of those). Prepared data whose sources name files lives
in a folder keyed by those files' paths, so two prepares of different files never share a
folder; the files' sizes and modification times are checked when a later stage reads it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator, List, Optional

MAX_LISTED = 3  # files named in a one-line summary before "... (N files)"


def named_files(desc: Any) -> Iterator[dict]:
    """Yield every {"path", ...} entry of the `files` lists anywhere in a description."""
    if isinstance(desc, dict):
        for key, value in desc.items():
            if key == "files" and isinstance(value, list):
                yield from (f for f in value if isinstance(f, dict) and "path" in f)
            else:
                yield from named_files(value)
    elif isinstance(desc, list):
        for item in desc:
            yield from named_files(item)


def _selection(desc: Any) -> Any:
    """Return the description with each file reduced to its path (what is named, not its state)."""
    if isinstance(desc, dict):
        return {k: ([f.get("path") if isinstance(f, dict) else f for f in v]
                    if k == "files" and isinstance(v, list) else _selection(v))
                for k, v in desc.items()}
    if isinstance(desc, list):
        return [_selection(item) for item in desc]
    return desc


def source_key(desc: Any) -> Optional[str]:
    """Return an 8-character key of the files a description names, or None when it names none."""
    if not any(True for _ in named_files(desc)):
        return None
    blob = json.dumps(_selection(desc), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def _paths(files: List[dict]) -> str:
    names = [str(f["path"]) for f in files]
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names)} files)" if len(names) > MAX_LISTED else "")


def summary(desc: Any) -> str:
    """Return a short human description of a source description, for one error line."""
    if isinstance(desc, dict) and isinstance(desc.get("mix"), list):
        return "mix of [" + "; ".join(summary(part) for part in desc["mix"]) + "]"
    if not isinstance(desc, dict):
        return str(desc)
    source = desc.get("source")
    if isinstance(desc.get("files"), list) and source == "local":
        return f"files {_paths(desc['files'])}"
    if source == "synthetic":
        return (f"synthetic tasks ({desc.get('num_examples')} examples, seed {desc.get('seed')}, "
                f"types {','.join(desc.get('task_types') or [])}, difficulty "
                f"{desc.get('difficulty')})")
    if source == "hub":
        return "hub " + ", ".join(str(h.get("path", h)) if isinstance(h, dict) else str(h)
                                  for h in desc.get("hub") or [])
    if "package" in desc:
        return f"package {desc['package']}"
    return json.dumps(desc, sort_keys=True, default=str)[:300]


def differences(named: Any, prepared: Any, where: str = "") -> Optional[str]:
    """Return the first way `prepared` does not match `named` (None when it matches).

    Only the keys `named` has are compared, so a cheap description (no download) can be checked
    against the full one a prepare recorded.
    """
    if isinstance(named, dict) and isinstance(prepared, dict):
        if isinstance(named.get("files"), list) and isinstance(prepared.get("files"), list):
            found = _file_differences(named["files"], prepared["files"])
            if found:
                return found
        for key, value in named.items():
            if key == "files" and isinstance(value, list):
                continue
            if key not in prepared:
                return f"{where}{key} is not recorded"
            found = differences(value, prepared[key], f"{where}{key}.")
            if found:
                return found
        return None
    if isinstance(named, list) and isinstance(prepared, list):
        if len(named) != len(prepared):
            return f"{where.rstrip('.')} has {len(named)} entries, not {len(prepared)}"
        for i, (a, b) in enumerate(zip(named, prepared)):
            found = differences(a, b, f"{where}{i}.")
            if found:
                return found
        return None
    if named != prepared:
        return f"{where.rstrip('.')}={named!r}, not {prepared!r}"
    return None


def _file_differences(named: List[dict], prepared: List[dict]) -> Optional[str]:
    if [f.get("path") for f in named] != [f.get("path") for f in prepared]:
        return "other files"
    for now, then in zip(named, prepared):
        if now.get("size") != then.get("size"):
            return (f"file {now['path']} changed since it was prepared (size {then.get('size')} "
                    f"-> {now.get('size')} bytes)")
        if now.get("mtime_ns") != then.get("mtime_ns"):
            return f"file {now['path']} changed since it was prepared (modified since)"
    return None
