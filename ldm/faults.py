"""Named moments where a test can kill or pause this process (fault injection; off by default).

Library code calls `kill_point("save:4")` at a moment worth testing. Nothing happens unless the
environment asks for that name:

- `LDM_KILL_AT=<name>`: the process SIGKILLs itself there, a real kill at an exact moment
  (no cleanup handler, `finally` block or atexit hook runs).
- `LDM_PAUSE_AT=<name>[,<name>...]` with `LDM_PAUSE_DIR=<dir>`: the process creates
  `<dir>/<name>.paused` and waits until the test removes it, so the test can break something
  (stop a server, fill a disk) at that moment and then let the run go on.

Names: `step:N` (after optimizer step N and its checkpoint/export), `forward:N` (between the
forward and the backward pass of step N), `save:N` (checkpoint N written to its temporary folder,
not yet renamed into place), `resume` (while a checkpoint is being loaded), `export` (inside the
export's temporary folder, weights written), `prepare.tokenize:N` (after the tokenizer batch
that brings the documents read to N), `prepare.write` (prepared data complete in its temporary
folder, not yet renamed into place), `chat.answer:N` (each sampler step of the REPL's N-th
answer).
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

PAUSE_LIMIT_SECONDS = 600.0


def kill_point(name: str) -> None:
    """Return at once, unless LDM_KILL_AT or LDM_PAUSE_AT names this moment (see module doc)."""
    kill = os.environ.get("LDM_KILL_AT")
    pause = os.environ.get("LDM_PAUSE_AT")
    if kill is None and pause is None:
        return
    if kill == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if pause and name in pause.split(","):
        _pause(name)


def fault_injection() -> bool:
    """True when the environment names a kill or pause point (so callers may add step hooks)."""
    return "LDM_KILL_AT" in os.environ or "LDM_PAUSE_AT" in os.environ


def pause_file(folder: str | Path, name: str) -> Path:
    """Return the file that marks a process paused at `name` (created by the paused process)."""
    return Path(folder) / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".paused")


def _pause(name: str) -> None:
    marker = pause_file(os.environ.get("LDM_PAUSE_DIR", "."), name)
    marker.write_text(str(os.getpid()))
    deadline = time.monotonic() + PAUSE_LIMIT_SECONDS
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
