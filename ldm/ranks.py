"""Which process of a distributed launch this is, from the launcher's environment alone."""

from __future__ import annotations

import os


def is_main_process() -> bool:
    """Return True on rank 0 (or without a distributed launcher)."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") in ("0", "")
