"""What makes a recipe one command: epochs as steps, an early hub check, starting the processes.

`python run.py experiment=bert_chat_large` names an 8-process layout (hardware.num_processes=8).
Started as one plain process, the training task checks everything cheap first (config, hub,
prepared data, batch layout) and then starts the layout itself: `accelerate launch` with the
preset's accelerate config on GPUs, `torchrun --standalone` on CPU, passing the same overrides.
Under a launcher (WORLD_SIZE set) nothing is started again.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from ldm.errors import ConfigError

log = logging.getLogger("ldm")

LAUNCHER_ENV = ("WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_PROCESS_ID")


def check_init_from(cfg: DictConfig) -> None:
    """Fail fast when init_from is a hub id that is neither cached nor reachable."""
    init = cfg.init_from
    if not init or Path(str(init)).expanduser().exists():
        return
    from huggingface_hub import try_to_load_from_cache

    from ldm.hub import require_hub
    from ldm.model import OFFLINE_MODELS

    try:
        cached = try_to_load_from_cache(str(init), "config.json")
    except Exception as err:  # noqa: BLE001 - a malformed id; loading names it precisely later
        log.debug("cache lookup of %s failed: %s", init, err)
        cached = None
    if not isinstance(cached, str):
        require_hub(f"init_from={init} (a hub model, not in the local cache)",
                    f"{OFFLINE_MODELS}, or init_from=<an export folder>")


def steps_for_epochs(epochs: float, rows: int, global_batch: int) -> int:
    """Return the optimizer steps that make `epochs` passes over `rows` rows."""
    return max(1, math.ceil(epochs * rows / global_batch))


def command_line_keys() -> set:
    """Return the config keys given on this run's command line (empty outside a Hydra run)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):  # not inside @hydra.main (tests, library use)
        return set()
    return {item.split("=", 1)[0].lstrip("+~") for item in overrides}


def schedule_source(cfg: DictConfig, given: set | None = None) -> str:
    """Return which setting fixes the number of steps: "max_steps" or "epochs".

    `task.epochs` with `task.max_steps: null` (the epoch recipes) trains by epochs. When both
    are set, the one given on the command line wins (an explicit task.max_steps wins, as in the
    Hugging Face Trainer); both or neither given there is an error naming both.
    """
    task = cfg.task
    if task.get("epochs") is None:
        if task.max_steps is None:
            raise ConfigError("task.max_steps=null needs task.epochs (passes over the training "
                              "rows); set one of them")
        return "max_steps"
    if not task.epochs > 0:
        raise ConfigError(f"task.epochs={task.epochs} must be > 0 (or null for max_steps)")
    if task.max_steps is None:
        return "epochs"
    given = command_line_keys() if given is None else given
    steps, epochs = "task.max_steps" in given, "task.epochs" in given
    if steps != epochs:
        return "max_steps" if steps else "epochs"
    raise ConfigError(f"task.max_steps={task.max_steps} and task.epochs={task.epochs:g} are both "
                      "set and either could fix the length of training; set the other to null "
                      "(task.max_steps=null trains by epochs, task.epochs=null by steps)")


def resolve_schedule(cfg: DictConfig, train_rows: int, given: set | None = None) -> None:
    """Set task.max_steps (from task.epochs where they fix it) and task.warmup_steps (from
    task.warmup_ratio); say in the log which setting won when both were set."""
    task = cfg.task
    source = schedule_source(cfg, given)
    if task.get("epochs") is not None:
        from_epochs = steps_for_epochs(task.epochs, train_rows, task.global_batch_size)
        if source == "epochs":
            if task.max_steps is not None:
                log.warning("task.epochs=%g given on the command line wins over task.max_steps=%d",
                            task.epochs, task.max_steps)
            task.max_steps = from_epochs
            log.info("task.epochs=%g over %d training rows at %d per step: max_steps=%d",
                     task.epochs, train_rows, task.global_batch_size, task.max_steps)
        else:
            log.warning("task.max_steps=%d given on the command line wins over task.epochs=%g "
                        "(which would make %d steps)", task.max_steps, task.epochs, from_epochs)
    if task.get("warmup_ratio") is not None:
        if not 0 <= task.warmup_ratio < 1:
            raise ConfigError(f"task.warmup_ratio={task.warmup_ratio} must be in [0, 1)")
        task.warmup_steps = int(round(task.warmup_ratio * task.max_steps))
        log.info("task.warmup_ratio=%g: warmup_steps=%d", task.warmup_ratio, task.warmup_steps)


def under_launcher() -> bool:
    """True when this process was started by accelerate launch / torchrun."""
    return any(name in os.environ for name in LAUNCHER_ENV)


def needs_launch(cfg: DictConfig) -> bool:
    """True when the layout wants several processes and this one was started on its own."""
    return cfg.hardware.num_processes > 1 and not under_launcher()


def launch_command(cfg: DictConfig, argv: list) -> list:
    """Return the command that starts hardware.num_processes copies of `run.py argv`."""
    hw = cfg.hardware
    run_py = str(Path(cfg.paths.root) / "run.py")
    if hw.accelerator == "cpu":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(hw.num_processes), run_py, *argv]
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if hw.accelerate_config:
        config = Path(hw.accelerate_config)
        cmd += ["--config_file", str(config if config.is_absolute() else Path(cfg.paths.root) / config)]
    return [*cmd, "--num_processes", str(hw.num_processes), run_py, *argv]


def relaunch(cfg: DictConfig) -> float:
    """Run this command again as hardware.num_processes processes; exit with their status."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ldm.tasks.common import run_dir, unlock_run_folder

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError(
            f"hardware.num_processes={cfg.hardware.num_processes} in a multirun: each job would "
            "start the whole sweep again; launch the sweep itself with `accelerate launch "
            f"--config_file {cfg.hardware.accelerate_config} run.py -m ...`")
    cmd = launch_command(cfg, sys.argv[1:])
    # rank 0 of the launch takes the run folder's lock; this process only waits for the ranks
    unlock_run_folder(run_dir(cfg))
    print(f"hardware={cfg.hardware.name} runs {cfg.hardware.num_processes} processes; starting: "
          f"{shlex.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=cfg.paths.root, env=dict(os.environ))
    if proc.returncode != 0:
        # the processes printed their own error; one more line would repeat it
        raise SystemExit(proc.returncode)
    return float("nan")
