"""launcher=slurm: one training run over several SLURM nodes, submitted through submitit.

submitit asks for hardware.num_machines nodes with one task each; every task runs
`run_machine`, which reads its rendezvous from SLURM's environment (SLURM_NODEID, the first host
of SLURM_JOB_NODELIST) and starts its node's launcher (accelerate launch; torchrun on CPU).
No scheduling of our own: SLURM places the tasks, torch's rendezvous joins them.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from omegaconf import DictConfig

from ldm.errors import ConfigError

log = logging.getLogger("ldm")


def slurm_parameters(cfg: DictConfig) -> dict:
    """Return submitit's parameters for the allocation this run needs (one task per node)."""
    hw, lc = cfg.hardware, cfg.launcher
    per_machine = hw.num_processes // hw.num_machines
    gpus = lc.gpus_per_node if lc.gpus_per_node is not None else (
        per_machine if hw.accelerator == "gpu" else 0)
    params = {"nodes": hw.num_machines, "tasks_per_node": 1, "timeout_min": lc.time_min,
              "name": cfg.run_name}
    if gpus:
        params["gpus_per_node"] = gpus
    for key in ("cpus_per_task", "mem_gb"):
        if lc[key] is not None:
            params[key] = lc[key]
    for key in ("partition", "account", "qos", "constraint"):
        if lc[key]:
            params[f"slurm_{key}"] = lc[key]
    if lc.additional:
        params["slurm_additional_parameters"] = dict(lc.additional)
    return params


def run_machine(spec: dict) -> None:
    """Start this node's processes of the run (inside the SLURM job; every node calls this)."""
    from ldm.tasks.nodes import machine_command, rendezvous

    where = rendezvous(spec["num_machines"], spec["machine_rank"], spec["main_address"],
                       spec["main_port"])
    cmd = machine_command(accelerator=spec["accelerator"], num_processes=spec["num_processes"],
                          num_machines=spec["num_machines"],
                          accelerate_config=spec["accelerate_config"], script=spec["script"],
                          argv=spec["argv"], where=where)
    print(f"node {where.machine_rank} of {spec['num_machines']} (rendezvous "
          f"{where.main_address}:{where.main_port}): {' '.join(cmd)}", flush=True)
    env = dict(os.environ, NODE_RANK=str(where.machine_rank), MASTER_ADDR=where.main_address,
               MASTER_PORT=str(where.main_port))
    proc = subprocess.run(cmd, cwd=spec["root"], env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"node {where.machine_rank}: the launcher exited with {proc.returncode}")


def submit(cfg: DictConfig, argv: list) -> float:
    """Submit the run to SLURM; print the job id and where its logs go."""
    from ldm.tasks.common import run_dir
    from ldm.tasks.nodes import resolve_config_path

    if shutil.which("sbatch") is None:
        raise ConfigError("launcher=slurm needs SLURM's sbatch on PATH (run it on the cluster's "
                          "login node); launcher.dry_run=true prints what it would submit")
    try:
        import submitit
    except ImportError as err:
        raise ConfigError("launcher=slurm needs submitit: pip install -e \".[slurm]\" (or use "
                          "examples/slurm_two_nodes.sbatch)") from err

    hw, lc = cfg.hardware, cfg.launcher
    folder = run_dir(cfg) / "slurm"
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm")
    executor.update_parameters(**slurm_parameters(cfg))
    spec = {"accelerator": hw.accelerator, "num_processes": hw.num_processes,
            "num_machines": hw.num_machines, "root": str(cfg.paths.root),
            "accelerate_config": resolve_config_path(cfg.paths.root, hw.accelerate_config),
            "script": str(Path(cfg.paths.root) / "run.py"), "argv": list(argv),
            "machine_rank": lc.machine_rank, "main_address": lc.main_address,
            "main_port": lc.main_port}
    job = executor.submit(run_machine, spec)
    print(f"submitted SLURM job {job.job_id}: {hw.num_machines} nodes x "
          f"{hw.num_processes // hw.num_machines} processes; logs: {folder / str(job.job_id)}",
          flush=True)
    return float("nan")
