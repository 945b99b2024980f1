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


def check_machines(cfg: DictConfig) -> None:
    """Raise ConfigError unless hardware.num_processes spreads evenly over hardware.num_machines."""
    hw = cfg.hardware
    if hw.num_machines < 1 or hw.num_processes % hw.num_machines:
        raise ConfigError(f"hardware.num_processes={hw.num_processes} (all machines together) "
                          f"must be a whole multiple of hardware.num_machines={hw.num_machines} "
                          ">= 1: every machine runs the same number of processes")
    if cfg.launcher.name == "slurm" and hw.num_machines == 1:
        raise ConfigError(f"launcher=slurm starts one run over several machines but hardware="
                          f"{hw.name} has hardware.num_machines=1; pick a several-machine preset "
                          "(e.g. hardware=h100x8_nodes2_fsdp), or submit one-machine jobs with "
                          "hydra/launcher=submitit_slurm")


def machine_rendezvous(cfg: DictConfig, env=None):
    """Return this machine's Rendezvous: launcher.* where set, else the environment's."""
    from ldm.tasks.nodes import rendezvous

    lc = cfg.launcher
    return rendezvous(cfg.hardware.num_machines, lc.machine_rank, lc.main_address, lc.main_port, env)


def launch_command(cfg: DictConfig, argv: list, where=None, script: str | None = None) -> list:
    """Return the command that starts this machine's processes of `run.py argv` (or `script`):
    all hardware.num_processes on one machine, or, placed by `where` (a Rendezvous), its share
    of them among hardware.num_machines machines."""
    from ldm.tasks.nodes import machine_command, resolve_config_path

    hw = cfg.hardware
    return machine_command(
        accelerator=hw.accelerator, num_processes=hw.num_processes, num_machines=hw.num_machines,
        accelerate_config=resolve_config_path(cfg.paths.root, hw.accelerate_config),
        script=script or str(Path(cfg.paths.root) / "run.py"), argv=argv, where=where)


def _shell(cmd: list) -> str:
    """Return `cmd` as a shell line that leaves $VARIABLE placeholders unquoted."""
    return " ".join(arg if arg.startswith("$") else shlex.quote(arg) for arg in cmd)


def launch_plan(cfg: DictConfig, argv: list) -> list:
    """Return the lines a dry run prints: the SLURM request (launcher=slurm), then each
    machine's command (rendezvous values not known yet stay $NODE_RANK-style placeholders)."""
    from ldm.tasks.nodes import DEFAULT_PORT, Rendezvous

    hw, lc = cfg.hardware, cfg.launcher
    lines = []
    if lc.name == "slurm":
        from ldm.tasks.slurm import slurm_parameters

        lines.append("launcher=slurm would submit (submitit, one task per node): " + ", ".join(
            f"{key}={value}" for key, value in slurm_parameters(cfg).items()))
        lines.append("each task runs its node's command with machine rank = SLURM_NODEID and main "
                     "address = the first host of SLURM_JOB_NODELIST:")
    argv = [arg for arg in argv if not arg.startswith("launcher.dry_run")]
    if hw.num_machines == 1:
        return [*lines, f"machine 0: {_shell(launch_command(cfg, argv))}"]
    address = lc.main_address or ("$MASTER_ADDR" if lc.name == "slurm"
                                  else os.environ.get("MASTER_ADDR") or "$MASTER_ADDR")
    port = lc.main_port or (None if lc.name == "slurm" else os.environ.get("MASTER_PORT"))
    port = port or (DEFAULT_PORT if lc.name == "slurm" else "$MASTER_PORT")
    for rank in range(hw.num_machines):
        where = Rendezvous(rank, address, port)
        lines.append(f"machine {rank}: {_shell(launch_command(cfg, argv, where))}")
    return lines


def dry_run(cfg: DictConfig) -> float:
    """Check the layout, print what launcher.dry_run=true would start, start nothing."""
    from ldm.train.data import check_batch_layout, resolve_accumulation

    check_machines(cfg)
    hw = cfg.hardware
    accumulation = resolve_accumulation(hw.gradient_accumulation_steps, cfg.task.global_batch_size,
                                        hw.micro_batch_size, hw.num_processes)
    check_batch_layout(cfg.task.global_batch_size, hw.micro_batch_size, accumulation,
                       hw.num_processes)
    print(f"hardware={hw.name}: {hw.num_machines} machine(s) x "
          f"{hw.num_processes // hw.num_machines} process(es) x {hw.micro_batch_size} rows x "
          f"{accumulation} accumulation = {cfg.task.global_batch_size} rows per step")
    for line in launch_plan(cfg, sys.argv[1:]):
        print(line)
    from ldm.tasks.common import discard_new_run_folder, run_dir, unlock_run_folder

    unlock_run_folder(run_dir(cfg))
    discard_new_run_folder()  # a dry run leaves no run folder behind
    return float("nan")


def relaunch(cfg: DictConfig) -> float:
    """Start this machine's processes of the run (or, with launcher=slurm outside a SLURM job,
    submit the run to SLURM); exit with their status."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ldm.tasks.common import run_dir, unlock_run_folder

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError(
            f"hardware.num_processes={cfg.hardware.num_processes} in a multirun: each job would "
            "start the whole sweep again; launch the sweep itself with `accelerate launch "
            f"--config_file {cfg.hardware.accelerate_config} run.py -m ...`")
    hw = cfg.hardware
    several = hw.num_machines > 1
    if several and cfg.launcher.name == "slurm" and "SLURM_JOB_ID" not in os.environ:
        from ldm.tasks.slurm import submit

        unlock_run_folder(run_dir(cfg))  # global rank 0, on the first node, takes it
        return submit(cfg, sys.argv[1:])
    where = machine_rendezvous(cfg) if several else None
    cmd = launch_command(cfg, sys.argv[1:], where)
    # rank 0 of the launch takes the run folder's lock; this process only waits for the ranks
    unlock_run_folder(run_dir(cfg))
    layout = f"{hw.num_processes} processes"
    if several:
        layout += (f" on {hw.num_machines} machines; machine {where.machine_rank} (rendezvous "
                   f"{where.main_address}:{where.main_port})")
    print(f"hardware={hw.name} runs {layout}; starting: {shlex.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=cfg.paths.root, env=dict(os.environ))
    if proc.returncode != 0:
        # the processes printed their own error; one more line would repeat it
        raise SystemExit(proc.returncode)
    return float("nan")
