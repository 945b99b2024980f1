"""Reaching the Hugging Face hub: fail fast and clearly when it cannot be reached, never hang."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from ldm.errors import HubUnavailableError

PROBE_TIMEOUT_S = 3.0


def is_local(where: str) -> bool:
    """Return True when `where` names a local folder (an export), False for a hub id.

    The one rule every stage uses: `checkpoint=`, `init_from=` and `model.pretrained` name an
    existing folder or else a hub id.
    """
    return Path(str(where)).expanduser().is_dir()


def _endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Return True when the hub endpoint accepts a TCP connection within a few seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host, port = _endpoint()
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def require_hub(what: str, alternatives: str) -> None:
    """Raise HubUnavailableError naming `what` and the offline `alternatives` if the hub is down."""
    if not hub_reachable():
        host, _ = _endpoint()
        raise HubUnavailableError(
            f"{what} needs the Hugging Face hub, but {host} cannot be reached (offline?); "
            f"offline alternatives: {alternatives}"
        )
