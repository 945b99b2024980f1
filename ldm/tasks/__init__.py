"""Task dispatch: `cfg.task.name` -> `ldm.tasks.<name>.run(cfg)`."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def hint(text: str):
    """Add `text` (what to run or pass instead) to an LdmError raised inside, if it has none."""
    try:
        yield
    except LdmError as err:
        if err.hint is None:
            err.hint = text
        raise


def task_choice():
    """Return the task option picked on the command line (None outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get("task")


def set_threads(threads) -> None:
    """Set torch's CPU threads from hardware.threads (None keeps torch's own choice)."""
    if threads is None:
        return
    if not isinstance(threads, int) or threads < 1:
        raise LdmError(f"hardware.threads={threads} must be an integer >= 1, or null (torch's "
                       "default: OMP_NUM_THREADS or the cores)")
    import torch

    torch.set_num_threads(threads)


def dispatch(cfg: DictConfig) -> float:
    """Run the configured task; a user error becomes one line on stderr and exit status 2."""
    name = cfg.task.name
    try:
        chosen = task_choice()
        if chosen is not None and chosen not in TASKS:
            raise LdmError(f"task={chosen} is not a task (an internal schema option); known "
                           f"tasks: {', '.join(TASKS)}")
        if name not in TASKS:
            raise LdmError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
        set_threads(cfg.hardware.get("threads"))
        module = importlib.import_module(f"ldm.tasks.{name}")
        result = module.run(cfg)
    except LdmError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.debug("task failed", exc_info=True)
        close_progress_bars()
        from ldm.tasks.common import discard_new_run_folder

        discard_new_run_folder()
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    return float(result) if result is not None else 0.0
