"""Which process of a distributed launch this is, from the launcher's environment alone."""

from __future__ import annotations

import os


def node_rank() -> int:
    """Return this machine's rank in a several-machine run (NODE_RANK, else SLURM_NODEID of a
    SLURM step over several nodes; 0 otherwise or when unreadable)."""
    value = os.environ.get("NODE_RANK")
    step_nodes = os.environ.get("SLURM_STEP_NUM_NODES", os.environ.get("SLURM_NNODES", "1"))
    if value is None and step_nodes.isdigit() and int(step_nodes) > 1:
        value = os.environ.get("SLURM_NODEID")
    return int(value) if value is not None and value.strip().isdigit() else 0


def is_main_process() -> bool:
    """Return True on global rank 0 (or without a distributed launcher, on machine 0).

    A launched process has RANK (global over every machine); the plain `python run.py` that
    starts a machine's processes has only the machine rank: on machine 1 it is not the main
    process, so it neither writes the run folder's Hydra files nor takes its lock.
    """
    local_main = os.environ.get("LOCAL_RANK", "0") in ("0", "")
    if "RANK" in os.environ:
        return os.environ["RANK"] == "0" and local_main
    return node_rank() == 0 and local_main
