"""Task dispatch: `cfg.task.name` -> `ldm.tasks.<name>.run(cfg)`."""

from __future__ import annotations

import importlib
import logging
import os
import sys

from omegaconf import DictConfig

from ldm.errors import LdmError

# Only tasks that really work are listed here.
TASKS = ("prepare", "pretrain", "sft", "sample", "chain", "evaluate", "compare", "serve",
         "benchmark")

log = logging.getLogger("ldm")


def close_progress_bars() -> None:
    """Close the progress bars an error left open, so the error starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def dispatch(cfg: DictConfig) -> float:
    """Run the configured task; a user error becomes one line on stderr and exit status 2."""
    name = cfg.task.name
    try:
        if name not in TASKS:
            raise LdmError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
        module = importlib.import_module(f"ldm.tasks.{name}")
        result = module.run(cfg)
    except LdmError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.debug("task failed", exc_info=True)
        close_progress_bars()
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    return float(result) if result is not None else 0.0
