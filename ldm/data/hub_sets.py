"""Loading one data set the way the hub serves it: by id, config and split, or from a local copy.

`dataset.hub` entries are `{path, name, split}`: `path` is a hub id (`allenai/tulu-3-sft-mixture`),
a local folder holding a data set's files (a snapshot downloaded elsewhere), or one local
.jsonl / .json / .parquet / .csv file; `name` is the hub config (`HuggingFaceTB/smoltalk` needs
`all`); `split` may be sliced (`train[:10000]`, `train[5000:6000]`, `train[:10%]`). Streaming
reads row by row without downloading the whole set; there the slice is applied with skip/take,
so only absolute row slices are accepted. Only a hub id needs the network: it fails within
seconds when the hub cannot be reached (`ldm.hub.require_hub`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence, Tuple

from ldm.errors import ConfigError
from ldm.hub import require_hub

SPLIT = re.compile(r"^(?P<split>[A-Za-z0-9_.-]+)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def parse_split(split: str, streaming: bool = False) -> Tuple[str, Optional[int], Optional[int]]:
    """Return (split name, start row, stop row) of `train` or `train[a:b]`; ConfigError if malformed.

    Percent slices are returned as (name, None, None) for `datasets` to apply itself; they are
    refused when streaming (the row count is not known before reading).
    """
    match = SPLIT.match(str(split).replace(" ", ""))
    if not match:
        raise ConfigError(f"dataset split {split!r} is not a split name or a slice; accepted: "
                          "train, train[:10000], train[5000:6000], train[:10%]")
    start, stop = match["start"], match["stop"]
    if (start or "").endswith("%") or (stop or "").endswith("%"):
        if streaming:
            raise ConfigError(f"dataset split {split!r} is a percent slice, which streaming cannot "
                              "apply; use row numbers (train[:10000]) or dataset.streaming=false")
        return match["split"], None, None
    if (start or "").startswith("-") or (stop or "").startswith("-"):
        raise ConfigError(f"dataset split {split!r} has a negative bound; use row numbers from 0")
    a, b = (int(start) if start else None), (int(stop) if stop else None)
    if a is not None and b is not None and b <= a:
        raise ConfigError(f"dataset split {split!r} selects no rows (stop <= start)")
    return match["split"], a, b


def is_local(path: str) -> bool:
    """True when a hub entry's path names a local folder or file rather than a hub id."""
    return Path(str(path)).expanduser().exists()


def check_entry(src: dict, streaming: bool, offline_alternatives: str) -> None:
    """Check one `dataset.hub` entry cheaply: a path, a well-formed split, the hub reachable."""
    if not src.get("path"):
        raise ConfigError("each dataset.hub entry needs a path (a hub id such as "
                          "allenai/tulu-3-sft-mixture, or a local folder or file)")
    parse_split(src.get("split") or "train", streaming)
    path = str(src["path"])
    if not is_local(path):
        if path.startswith(("/", "./", "~")):
            raise ConfigError(f"dataset.hub path {path!r} does not exist (a local folder or "
                              ".jsonl / .json / .parquet / .csv file, or a hub id)")
        require_hub(f"dataset {path}", offline_alternatives)


def check_entries(hub: Sequence[dict], streaming: bool, offline_alternatives: str) -> None:
    """Check every `dataset.hub` entry; the hub is probed only when an entry needs it."""
    if not hub:
        raise ConfigError("a hub dataset needs at least one entry in dataset.hub, e.g. "
                          "'dataset.hub=[{path: allenai/tulu-3-sft-mixture, split: train}]'")
    for src in hub:
        check_entry(src, streaming, offline_alternatives)


def load_entry(src: dict, streaming: bool, offline_alternatives: str):
    """Return the rows of one `dataset.hub` entry as a (streaming) `datasets` data set."""
    from datasets import load_dataset

    check_entry(src, streaming, offline_alternatives)
    raw_split = src.get("split") or "train"
    name, start, stop = parse_split(raw_split, streaming)
    path = Path(str(src["path"])).expanduser()
    if is_local(str(src["path"])) and path.is_file():
        builder = FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ConfigError(f"dataset.hub path {str(path)!r} has suffix {path.suffix!r}; "
                              f"accepted files: {', '.join(FILE_BUILDERS)} (or a folder)")
        where, kwargs = builder, {"data_files": {name: str(path)}}
    else:
        where, kwargs = (str(path) if is_local(str(src["path"])) else src["path"]), {}
    if not streaming or (start is None and stop is None):
        split = raw_split.replace(" ", "") if not streaming else name
        return load_dataset(where, src.get("name"), split=split, streaming=streaming, **kwargs)
    rows = load_dataset(where, src.get("name"), split=name, streaming=True, **kwargs)
    if start:
        rows = rows.skip(start)
    if stop is not None:
        rows = rows.take(stop - (start or 0))
    return rows


def column_names(rows) -> Optional[list]:
    """Return a data set's column names, or None when a stream does not know them yet."""
    names = getattr(rows, "column_names", None)
    return list(names) if names else None
