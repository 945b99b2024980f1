"""Chat sources: instruction data from the hub, a registry package or the user's JSONL files.

Every source becomes a `ConversationSource`: a callable returning a fresh iterator of
conversations, each a list of `{"role": "system"|"user"|"assistant", "content": str}`. Three
record schemas are read, detected per file from its first non-empty record:

  alpaca    {"instruction", "input" (optional), "output"}  -> user, assistant
  messages  {"messages": [{"role", "content"}, ...]}
  sharegpt  {"conversations": [{"from": human|user|gpt|assistant|system, "value"}, ...]}

A record that does not follow its file's schema (missing field, empty answer, unknown role) is
a DataError naming file, line and field, or is skipped and counted with skip_bad_records=True.
A line that is not JSON at all (e.g. truncated) is always an error.
"""

from __future__ import annotations

import importlib.util
import logging
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TextIO

from ldm.data.sources import describe_files, jsonl_records, resolve_local_paths
from ldm.errors import ConfigError, DataError
from ldm.hub import require_hub

log = logging.getLogger(__name__)

Conversation = List[Dict[str, str]]
SCHEMAS = ("alpaca", "messages", "sharegpt")
SCHEMA_HELP = ("alpaca {instruction, input, output}, messages {messages: [{role, content}]}, "
               "sharegpt {conversations: [{from, value}]}")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
CHAT_SOURCES = ("construction_faq", "local", "hub")
FAQ_PACKAGE = "zaragoza_construction_faq"
FAQ_FILE = "data/faq-en-alpaca.jsonl"
OFFLINE_CHAT = "dataset=construction_faq or dataset=local_chat"
ALPACA_HUB = "tatsu-lab/alpaca"


class BadRecord(ValueError):
    """A record that does not follow its schema; `field` names the offending field."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r} {problem}")
        self.field = field


class ConversationSource:
    """A re-iterable stream of conversations; `skipped_bad` counts bad records skipped last pass."""

    def __init__(self, name: str,
                 records: Callable[["ConversationSource"], Iterator[Conversation]]):
        self.name, self._records, self.skipped_bad = name, records, 0

    def __call__(self) -> Iterator[Conversation]:
        """Return a fresh iterator of conversations (resetting the skip count)."""
        self.skipped_bad = 0
        return self._records(self)

    def skip(self) -> None:
        """Count one skipped bad record."""
        self.skipped_bad += 1


# --- schemas -----------------------------------------------------------------------------------

def detect_schema(record: Any) -> Optional[str]:
    """Return the schema name a record follows by its keys, or None for none of them."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return None


def _text(record: dict, field: str, required: bool = True, name: Optional[str] = None) -> str:
    name = name or field
    value = record.get(field)
    if value is None and not required:
        return ""
    if value is None:
        raise BadRecord(name, "is missing")
    if not isinstance(value, str):
        raise BadRecord(name, f"is {type(value).__name__}, expected a string")
    return value


def _check_answers(messages: Conversation, field: str) -> Conversation:
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answers:
        raise BadRecord(field, "has no assistant turn")
    for i in answers:
        if not messages[i]["content"].strip():
            raise BadRecord(f"{field}[{i}]", "is an empty answer")
    return messages


def alpaca_messages(record: dict) -> Conversation:
    """Return [user, assistant] from an Alpaca record; a non-empty input follows a blank line."""
    instruction = _text(record, "instruction")
    extra = _text(record, "input", required=False)
    output = _text(record, "output")
    if not instruction.strip():
        raise BadRecord("instruction", "is empty")
    if not output.strip():
        raise BadRecord("output", "is an empty answer")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _turns(record: dict, field: str, role_key: str, text_key: str,
           roles: Dict[str, str]) -> Conversation:
    turns = record.get(field)
    if turns is None:
        raise BadRecord(field, "is missing")
    if not isinstance(turns, list) or not turns:
        raise BadRecord(field, "is not a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord(f"{field}[{i}]", f"is {type(turn).__name__}, expected an object")
        role = turn.get(role_key)
        if role not in roles:
            raise BadRecord(f"{field}[{i}].{role_key}",
                            f"is {role!r}; accepted: {', '.join(roles)}")
        content = _text(turn, text_key, name=f"{field}[{i}].{text_key}")
        messages.append({"role": roles[role], "content": content})
    return _check_answers(messages, field)


def messages_messages(record: dict) -> Conversation:
    """Return the conversation of a {"messages": [{role, content}]} record."""
    return _turns(record, "messages", "role", "content",
                  {"system": "system", "user": "user", "assistant": "assistant"})


def sharegpt_messages(record: dict) -> Conversation:
    """Return the conversation of a ShareGPT {"conversations": [{from, value}]} record."""
    return _turns(record, "conversations", "from", "value", SHAREGPT_ROLES)


CONVERTERS: Dict[str, Callable[[dict], Conversation]] = {
    "alpaca": alpaca_messages, "messages": messages_messages, "sharegpt": sharegpt_messages,
}


def to_messages(record: Any, schema: str) -> Conversation:
    """Return the conversation of `record` in `schema`, or raise BadRecord."""
    if not isinstance(record, dict):
        raise BadRecord("(record)", f"is {type(record).__name__}, expected a JSON object")
    return CONVERTERS[schema](record)


# --- JSONL files -------------------------------------------------------------------------------

def _jsonl_conversations(name: str, open_text: Callable[[], TextIO], source: ConversationSource,
                         skip_bad_records: bool) -> Iterator[Conversation]:
    schema = None
    with open_text() as fh:
        for lineno, record in jsonl_records(name, fh):
            if schema is None:
                schema = detect_schema(record)
                if schema is None:
                    keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(f"{name} is in none of the chat schemas (first record: "
                                    f"{keys}); accepted: {SCHEMA_HELP}")
            try:
                yield to_messages(record, schema)
            except BadRecord as err:
                if not skip_bad_records:
                    raise DataError(f"{name}:{lineno}: {err} ({schema} schema, detected from the "
                                    "first record); fix it or set skip_bad_records") from err
                source.skip()
    if schema is None:
        log.warning("%s holds no records", name)


def jsonl_chat_source(name: str, open_text: Callable[[], TextIO],
                      skip_bad_records: bool = False) -> ConversationSource:
    """Return the conversations of one JSONL text stream (`open_text()` opens it afresh)."""
    return ConversationSource(
        name, lambda source: _jsonl_conversations(name, open_text, source, skip_bad_records))


def resolve_chat_paths(patterns: Sequence[str]) -> List[Path]:
    """Return the .jsonl files named by paths or globs; error on none, missing or other types."""
    if not patterns:
        raise ConfigError("dataset=local_chat needs dataset.paths, e.g. "
                          "'dataset.paths=[/data/*.jsonl]' (JSONL in one of the schemas "
                          f"{SCHEMA_HELP})")
    files = resolve_local_paths(patterns)
    for path in files:
        if path.suffix != ".jsonl":
            raise DataError(f"dataset.paths file {str(path)!r} has suffix {path.suffix!r}; "
                            "dataset=local_chat reads .jsonl files")
    return files


def local_chat(paths: Sequence[str], skip_bad_records: bool = False) -> ConversationSource:
    """Return the conversations of the user's JSONL files, each in its own detected schema."""
    files = resolve_chat_paths(paths)

    def records(source: ConversationSource) -> Iterator[Conversation]:
        for path in files:
            yield from _jsonl_conversations(str(path), lambda p=path: open(p, encoding="utf-8"),
                                            source, skip_bad_records)

    return ConversationSource("local_chat", records)


def construction_faq(skip_bad_records: bool = False) -> ConversationSource:
    """Return the 503 English Q&A pairs of the zaragoza-construction-faq package, offline."""
    if importlib.util.find_spec(FAQ_PACKAGE) is None:
        raise DataError(f"package {FAQ_PACKAGE!r} is not installed; install it with "
                        "`pip install zaragoza-construction-faq` (make test/quickstart do this)")
    resource = resources.files(FAQ_PACKAGE).joinpath(FAQ_FILE)
    if not resource.is_file():
        raise DataError(f"package {FAQ_PACKAGE!r} has no {FAQ_FILE}; reinstall it")
    return jsonl_chat_source(f"{FAQ_PACKAGE}/{FAQ_FILE}",
                             lambda: resource.open("r", encoding="utf-8"), skip_bad_records)


# --- hub ---------------------------------------------------------------------------------------

def hub_chat(hub: Sequence[dict], streaming: bool = False,
             skip_bad_records: bool = False) -> ConversationSource:
    """Return the conversations of hub data sets (schema detected from each one's first row)."""
    if not hub:
        raise ConfigError("a hub chat dataset needs at least one entry in dataset.hub")
    require_hub("dataset " + ", ".join(s["path"] for s in hub), OFFLINE_CHAT)
    from datasets import load_dataset

    parts = [(s["path"], load_dataset(s["path"], s.get("name"), split=s.get("split", "train"),
                                      streaming=streaming)) for s in hub]

    def records(source: ConversationSource) -> Iterator[Conversation]:
        for name, rows in parts:
            schema = None
            for index, row in enumerate(rows):
                schema = schema or detect_schema(row)
                if schema is None:
                    raise DataError(f"hub dataset {name} has columns {', '.join(row)}, in none of "
                                    f"the chat schemas; accepted: {SCHEMA_HELP}")
                try:
                    yield to_messages(row, schema)
                except BadRecord as err:
                    if not skip_bad_records:
                        raise DataError(f"hub dataset {name} row {index}: {err}; "
                                        "set skip_bad_records to skip such rows") from err
                    source.skip()

    return ConversationSource("hub:" + ",".join(name for name, _ in parts), records)


def alpaca(streaming: bool = False, skip_bad_records: bool = False) -> ConversationSource:
    """Return the 52k conversations of tatsu-lab/alpaca from the hub (fails fast offline)."""
    return hub_chat([{"path": ALPACA_HUB, "split": "train"}], streaming, skip_bad_records)


# --- one entry point ---------------------------------------------------------------------------

def open_chat_source(source: str, *, hub: Sequence[dict] = (), paths: Sequence[str] = (),
                     streaming: bool = False, skip_bad_records: bool = False) -> tuple:
    """Return (ConversationSource, description for the fingerprint) for a chat dataset source."""
    if source == "construction_faq":
        from importlib.metadata import version

        desc = {"source": source, "package": f"{FAQ_PACKAGE}=={version(FAQ_PACKAGE)}",
                "file": FAQ_FILE}
        return construction_faq(skip_bad_records), desc
    if source == "local":
        conversations = local_chat(paths, skip_bad_records)
        return conversations, {"source": source, "files": describe_files(resolve_chat_paths(paths))}
    if source == "hub":
        return hub_chat(hub, streaming, skip_bad_records), {"source": source, "hub": list(hub)}
    raise ConfigError(f"dataset.source={source!r} is not a chat source; accepted: "
                      f"{', '.join(CHAT_SOURCES)}")


def validate_chat_source(source: str, hub: Sequence[dict], paths: Sequence[str]) -> None:
    """Check a chat source cheaply (package installed, files exist, hub reachable) before work."""
    if source == "construction_faq":
        if importlib.util.find_spec(FAQ_PACKAGE) is None:
            raise DataError(f"package {FAQ_PACKAGE!r} is not installed; "
                            "`pip install zaragoza-construction-faq`")
    elif source == "local":
        resolve_chat_paths(paths)
    elif source == "hub":
        if not hub:
            raise ConfigError("a hub chat dataset needs at least one entry in dataset.hub")
        require_hub("dataset " + ", ".join(s["path"] for s in hub), OFFLINE_CHAT)
    else:
        raise ConfigError(f"dataset.source={source!r} is not a chat source; accepted: "
                          f"{', '.join(CHAT_SOURCES)}")


def describe_chat_source(source: str, *, hub: Sequence[dict] = (),
                         paths: Sequence[str] = ()) -> dict:
    """Return what a chat source names, as open_chat_source describes it, without reading it."""
    from ldm.data.sources import expand_local_paths

    if source == "construction_faq":
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version(FAQ_PACKAGE)
        except PackageNotFoundError:
            installed = "not installed"
        return {"source": source, "package": f"{FAQ_PACKAGE}=={installed}", "file": FAQ_FILE}
    if source == "local":
        return {"source": source, "files": describe_files(expand_local_paths(paths))}
    if source == "hub":
        return {"source": source, "hub": list(hub)}
    raise ConfigError(f"dataset.source={source!r} is not a chat source; accepted: "
                      f"{', '.join(CHAT_SOURCES)}")
