"""Where a several-machine run meets: machine rank, main address and port, from the config or
the environment (NODE_RANK / MASTER_ADDR / MASTER_PORT, or SLURM's SLURM_NODEID,
SLURM_JOB_NODELIST and SLURM_NNODES), and the one command each machine runs."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from ldm.errors import ConfigError

DEFAULT_PORT = 29500
_BRACKET = re.compile(r"\[([^\]]*)\]")


@dataclass(frozen=True)
class Rendezvous:
    """One machine's place in a run: its rank and where machine 0 listens."""
    machine_rank: int
    main_address: str
    main_port: int


def first_host(nodelist: str) -> str:
    """Return the first host of a SLURM node list ("gpu[003-004,010],cpu1" -> "gpu003")."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # the first entry: up to a comma outside brackets
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end].strip()
    host = _BRACKET.sub(lambda m: m.group(1).split(",")[0].split("-")[0], entry)
    if not host or "[" in host or "]" in host:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r} is not a SLURM node list; set "
                          "MASTER_ADDR (or launcher.main_address) to machine 0's address")
    return host


def _int(value: str, name: str) -> int:
    if not str(value).strip().isdigit():
        raise ConfigError(f"{name}={value!r} is not a whole number >= 0")
    return int(value)


def rendezvous(num_machines: int, machine_rank: Optional[int] = None,
               main_address: Optional[str] = None, main_port: Optional[int] = None,
               env: Optional[Mapping[str, str]] = None) -> Rendezvous:
    """Return this machine's Rendezvous: a given value wins, else the environment's.

    Machine rank: NODE_RANK, else SLURM_NODEID; address: MASTER_ADDR, else the first host of
    SLURM_JOB_NODELIST; port: MASTER_PORT, else 29500. SLURM_NNODES, where set, must equal
    `num_machines`. ConfigError names what is missing.
    """
    env = os.environ if env is None else env
    where = "launcher.{} or {}"
    from_slurm = False
    if machine_rank is None:
        for name in ("NODE_RANK", "SLURM_NODEID"):
            if env.get(name, "").strip():
                machine_rank, from_slurm = _int(env[name], name), name == "SLURM_NODEID"
                break
        else:
            raise ConfigError(
                f"hardware.num_machines={num_machines} needs this machine's rank: set "
                f"{where.format('machine_rank', 'NODE_RANK')}=0..{num_machines - 1} (SLURM sets "
                "SLURM_NODEID under srun), or start it with launcher=slurm")
    if not 0 <= machine_rank < num_machines:
        raise ConfigError(f"machine rank {machine_rank} is outside 0..{num_machines - 1} "
                          f"(hardware.num_machines={num_machines})")
    if main_address is None:
        if env.get("MASTER_ADDR", "").strip():
            main_address = env["MASTER_ADDR"].strip()
        elif env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")).strip():
            main_address = first_host(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])
        else:
            raise ConfigError(f"hardware.num_machines={num_machines} needs machine 0's address: "
                              f"set {where.format('main_address', 'MASTER_ADDR')}=<host>")
    if main_port is None:
        port = env.get("MASTER_PORT", "").strip()
        main_port = _int(port, "MASTER_PORT") if port else DEFAULT_PORT
    nodes = env.get("SLURM_NNODES", "")
    if from_slurm and nodes.isdigit() and int(nodes) != num_machines:
        raise ConfigError(f"this SLURM job has SLURM_NNODES={env['SLURM_NNODES']} nodes but "
                          f"hardware.num_machines={num_machines}; ask for {num_machines} nodes")
    return Rendezvous(machine_rank, main_address, int(main_port))


def machine_command(*, accelerator: str, num_processes: int, num_machines: int,
                    accelerate_config: Optional[str], script: str, argv: list,
                    where: Optional[Rendezvous] = None) -> list:
    """Return the command that starts this machine's share of `num_processes` copies of
    `script argv`: torchrun on CPU, accelerate launch on GPUs; `where` places it among
    `num_machines` machines (None: one machine)."""
    per_machine = num_processes // num_machines
    if accelerator == "cpu":
        cmd = [sys.executable, "-m", "torch.distributed.run"]
        if where is None:
            return [*cmd, "--standalone", "--nproc_per_node", str(per_machine), script, *argv]
        return [*cmd, "--nproc_per_node", str(per_machine), "--nnodes", str(num_machines),
                "--node_rank", str(where.machine_rank), "--master_addr", where.main_address,
                "--master_port", str(where.main_port), script, *argv]
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        cmd += ["--config_file", accelerate_config]
    cmd += ["--num_processes", str(num_processes)]
    if where is not None:
        cmd += ["--num_machines", str(num_machines), "--machine_rank", str(where.machine_rank),
                "--main_process_ip", where.main_address, "--main_process_port", str(where.main_port)]
    return [*cmd, script, *argv]


def resolve_config_path(root: str | Path, name: Optional[str]) -> Optional[str]:
    """Return the accelerate config path `name` made absolute against the repository `root`."""
    if not name:
        return None
    path = Path(name)
    return str(path if path.is_absolute() else Path(root) / path)
