"""User-facing errors: one line that names the bad value and what would be accepted."""


class LdmError(Exception):
    """A problem with the user's input (config, data, prompt, checkpoint) or environment.

    `run.py` prints the message as one line and exits non-zero, without a traceback unless
    HYDRA_FULL_ERROR=1.
    """


class ConfigError(LdmError):
    """A config value is out of range or inconsistent with another one."""


class DataError(LdmError):
    """A data source is missing, empty, unreadable or malformed."""


class HubUnavailableError(LdmError):
    """A Hugging Face hub resource was requested but the hub cannot be reached."""
