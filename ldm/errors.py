"""User-facing errors: one line that names the bad value and what would be accepted."""

from __future__ import annotations


class LdmError(Exception):
    """A problem with the user's input (config, data, prompt, checkpoint) or environment.

    `run.py` prints the message as one line and exits non-zero, without a traceback unless
    HYDRA_FULL_ERROR=1. Library code states what is wrong; `hint` (what to run or pass instead)
    is added by the task layer, which knows the command line (`ldm.tasks.hint`).
    """

    def __init__(self, message: str = "", hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        message = super().__str__()
        return f"{message}; {self.hint}" if self.hint else message


class ConfigError(LdmError):
    """A config value is out of range or inconsistent with another one."""


class DataError(LdmError):
    """A data source is missing, empty, unreadable or malformed."""


class HubUnavailableError(LdmError):
    """A Hugging Face hub resource was requested but the hub cannot be reached."""
