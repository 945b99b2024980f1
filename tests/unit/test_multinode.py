"""One run over several machines: presets, rendezvous from the environment or SLURM, the
per-machine commands, and 2 "machines" on this one (two launchers, machine ranks 0 and 1, one
gloo process each, rendezvous on localhost) that train, save and resume like one machine.

Layer: unit by count, presets, rendezvous and commands in-process; the dry runs and the two
"machines" are processes (`run.py`, torchrun), with test_distributed.py's helpers.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, compose_config, prepare_tiny_text, run_cli
from ldm.errors import ConfigError
from ldm.tasks.launch import launch_command, machine_rendezvous
from ldm.tasks.nodes import Rendezvous, first_host, machine_command, rendezvous
from test_distributed import (FSDP_VS_DDP_ATOL, TINY, TRAIN, _env, _free_port, _history, _run,
                              _weights, accelerate_launch, fsdp_torchrun)

NODES2 = ["h100x8_nodes2_ddp", "h100x8_nodes2_fsdp", "h100x8_nodes2_zero2"]
# 2 machines x 1 process = the world size of test_distributed's 2-process runs
MACHINES = ["hardware.num_processes=2", "hardware.num_machines=2",
            "hardware.gradient_accumulation_steps=1"]
ONE_MACHINE = ["hardware.num_processes=2", "hardware.gradient_accumulation_steps=1"]


# ---- presets and commands (fast) -------------------------------------------------------------

@pytest.mark.parametrize("name", NODES2)
def test_bert_chat_large_composes_on_every_two_machine_preset(name):
    cfg = compose_config(["experiment=bert_chat_large", f"hardware={name}"])
    assert cfg.hardware.num_machines == 2 and cfg.hardware.num_processes == 16
    assert cfg.hardware.gradient_accumulation_steps == "auto"


@pytest.mark.parametrize("name", NODES2)
def test_two_machine_presets_keep_the_one_machine_global_batch(name):
    hw = compose_config([f"hardware={name}"]).hardware
    one = compose_config([f"hardware={name.replace('nodes2_', '').replace('zero2', 'fsdp')}"]).hardware
    assert hw.num_processes * hw.micro_batch_size * hw.gradient_accumulation_steps == \
        one.num_processes * one.micro_batch_size * one.gradient_accumulation_steps


def test_machine_rank_and_main_address_come_from_the_environment():
    env = {"NODE_RANK": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29555"}
    assert rendezvous(2, env=env) == Rendezvous(1, "10.1.2.3", 29555)
    assert rendezvous(2, machine_rank=0, main_port=40000, env=env) == Rendezvous(0, "10.1.2.3", 40000)


def test_slurm_step_gives_the_machine_rank_and_its_first_host_is_the_main_address():
    env = {"SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[007-008,012],cpu1", "SLURM_NNODES": "2"}
    assert rendezvous(2, env=env) == Rendezvous(1, "gpu007", 29500)
    with pytest.raises(ConfigError, match="SLURM_NNODES=2 nodes but hardware.num_machines=4"):
        rendezvous(4, env=env)


@pytest.mark.parametrize("nodelist, host", [("node1", "node1"), ("a[01-04]", "a01"),
                                            ("rack[2-3]-n[10,12]", "rack2-n10"),
                                            ("x[5],y[1-2]", "x5"), ("h1,h2", "h1")])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_missing_machine_rank_or_address_is_named():
    with pytest.raises(ConfigError, match="NODE_RANK"):
        rendezvous(2, env={"MASTER_ADDR": "h"})
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        rendezvous(2, env={"NODE_RANK": "0"})
    with pytest.raises(ConfigError, match="outside 0..1"):
        rendezvous(2, env={"NODE_RANK": "2", "MASTER_ADDR": "h"})


def test_each_machine_starts_its_share_with_its_rank_and_the_main_address():
    cfg = compose_config(["hardware=h100x8_nodes2_fsdp", "launcher.main_port=29601"])
    where = machine_rendezvous(cfg, env={"NODE_RANK": "1", "MASTER_ADDR": "main-host"})
    cmd = launch_command(cfg, ["task=pretrain"], where)
    joined = " ".join(cmd)
    assert "accelerate.commands.launch --config_file" in joined
    assert "--num_processes 16 --num_machines 2 --machine_rank 1 --main_process_ip main-host " \
           "--main_process_port 29601" in joined
    cpu = machine_command(accelerator="cpu", num_processes=4, num_machines=2, accelerate_config=None,
                          script="run.py", argv=["x=1"], where=Rendezvous(0, "127.0.0.1", 5))
    assert cpu[2:] == ["torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "2",
                       "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", "5",
                       "run.py", "x=1"]


def test_dry_run_prints_the_slurm_request_and_one_command_per_node(tmp_path):
    proc = run_cli(["experiment=bert_chat_large", "hardware=h100x8_nodes2_zero2",
                    "hardware.micro_batch_size=24", "launcher=slurm", "launcher.partition=gpu",
                    "launcher.dry_run=true", "tracking=off"], tmp_path / "outputs")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "2 machine(s) x 8 process(es) x 24 rows x 1 accumulation = 384 rows per step" in out
    assert "nodes=2, tasks_per_node=1" in out and "gpus_per_node=8, slurm_partition=gpu" in out
    for rank in (0, 1):
        assert re.search(rf"machine {rank}: .*--machine_rank {rank} --main_process_ip \$MASTER_ADDR",
                         out), out
    assert not (tmp_path / "outputs" / "runs").exists() or \
        not any((tmp_path / "outputs" / "runs").rglob("bert_chat_large")), "a dry run leaves no folder"


def test_process_count_that_does_not_spread_over_the_machines_is_refused(tmp_path):
    proc = run_cli(["task=pretrain", "hardware.num_processes=3", "hardware.num_machines=2",
                    "launcher.dry_run=true", "tracking=off"], tmp_path / "outputs")
    assert proc.returncode != 0
    assert "hardware.num_processes=3 (all machines together) must be a whole multiple of " \
           "hardware.num_machines=2" in proc.stderr


# ---- 2 machines on this one (slow) -----------------------------------------------------------

def _start(command, outputs: Path, log: Path, env_extra=None) -> subprocess.Popen:
    env = dict(_env(outputs), **(env_extra or {}))
    with open(log, "a") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _run_py(args) -> list:
    return [sys.executable, str(REPO / "run.py"), *args]


def _fsdp_machine(args, rank: int, port: int) -> list:
    """Return machine `rank`'s command for a 2-machine FSDP2 CPU run (tests/fsdp_cpu_run.py)."""
    return machine_command(accelerator="cpu", num_processes=2, num_machines=2, accelerate_config=None,
                           script=str(REPO / "tests" / "fsdp_cpu_run.py"), argv=args,
                           where=Rendezvous(rank, "127.0.0.1", port))


def _wait(procs, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            codes.append("killed")
    return codes


def two_machines_killed_and_resumed(commands, outputs: Path, run_name: str, logs: Path) -> list:
    """Start machines 0 and 1 (`commands(rank, port)`); machine 1's process kills itself in the
    middle of step 3 (after the step-2 checkpoint) and its launcher is killed too; machine 0
    fails; then both start again. Return the logs of (first, second) start, per machine."""
    logs.mkdir(parents=True, exist_ok=True)
    first = [logs / f"first{rank}.log" for rank in (0, 1)]
    port = _free_port()
    rendezvous_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [_start(commands(rank, port), outputs, first[rank],
                    {**rendezvous_env, "NODE_RANK": str(rank),
                     **({"LDM_KILL_AT": "forward:3"} if rank == 1 else {})})
             for rank in (0, 1)]
    try:
        _wait(procs[1:], 240)
    finally:
        try:
            os.killpg(procs[1].pid, signal.SIGKILL)  # whatever is left of machine 1
        except ProcessLookupError:
            pass
    assert _wait(procs[:1], 60)[0] != 0, "machine 0 cannot finish without machine 1"
    ckpts = outputs / "runs" / "pretrain" / run_name / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002"], \
        first[0].read_text()[-3000:] + first[1].read_text()[-3000:]
    assert not (outputs / "models" / run_name).exists()

    second = [logs / f"second{rank}.log" for rank in (0, 1)]
    port = _free_port()
    procs = [_start(commands(rank, port), outputs, second[rank],
                    {"NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in (0, 1)]
    codes = _wait(procs, 300)
    assert codes == [0, 0], f"{codes}: " + second[0].read_text()[-4000:] + second[1].read_text()[-4000:]
    return [p.read_text() for p in first], [p.read_text() for p in second]


def _joined(text: str) -> dict:
    """Return {(rank, machine): (step, rows)} from the 'rank R of W joined' lines of a log."""
    found = {}
    for m in re.finditer(r"rank (\d+) of 2 joined \(machine (\d+), local rank (\d+), host [^)]*\); "
                         r"step (\d+) reads rows (\[[\d, ]*\])", text):
        found[(int(m.group(1)), int(m.group(2)))] = (int(m.group(4)), eval(m.group(5)))  # noqa: S307
    return found


def _max_difference(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_tiny_text(tmp_path_factory.mktemp("multinode"), TINY)


@pytest.fixture(scope="module")
def one_machine(prepared):
    """The reference: 2 processes on one machine (accelerate launch, DDP), uninterrupted."""
    outputs, paths = prepared
    proc = _run(accelerate_launch([*TRAIN, *ONE_MACHINE, paths, "run_name=one_machine"]), outputs)
    return outputs, paths, proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_machines_ddp_killed_and_resumed_train_exactly_like_one_machine(one_machine, tmp_path):
    outputs, paths, reference_log = one_machine
    args = [*TRAIN, *MACHINES, paths, "run_name=two_machines"]
    first, second = two_machines_killed_and_resumed(lambda rank, port: _run_py(args), outputs,
                                                    "two_machines", tmp_path / "logs")
    # each machine's plain `python run.py` started its own torchrun with its machine rank
    for rank in (0, 1):
        assert f"on 2 machines; machine {rank} (rendezvous 127.0.0.1:" in first[rank]
        assert f"--nnodes 2 --node_rank {rank}" in first[rank]
    # every global rank joined, from its machine, and read its own rows: those of the same
    # global rank on one machine
    reference = _joined(reference_log)
    assert set(reference) == {(0, 0), (1, 0)}
    for rank in (0, 1):
        assert _joined(first[rank]) == {(rank, rank): reference[(rank, 0)]}
        step, rows = _joined(second[rank])[(rank, rank)]
        assert step == 3, "resumed after the step-2 checkpoint"
    assert not set(reference[(0, 0)][1]) & set(reference[(1, 0)][1])
    # the export and the checkpoints: written once, by global rank 0 on machine 0
    assert "export: " in second[0] and "export: " not in second[1]
    assert "exported step 6" not in second[1] and "mlflow run" not in second[1] + first[1]
    folder = outputs / "runs" / "pretrain" / "two_machines" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000004", "step-0000006"]
    assert {p.name for p in (folder / "step-0000006").iterdir()} == \
        {p.name for p in (outputs / "runs" / "pretrain" / "one_machine" / "checkpoints" /
                          "step-0000006").iterdir()}
    a, b = _weights(outputs, "one_machine"), _weights(outputs, "two_machines")
    assert a.keys() == b.keys()
    print(f"DDP 2 machines vs 1 machine: max weight difference {_max_difference(a, b):.3g}")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    # one mlflow run, continued after the restart, each step logged once
    assert [s for s, _ in _history(outputs, "two_machines")] == list(range(1, 7))
    for (_, x), (_, y) in zip(_history(outputs, "one_machine"), _history(outputs, "two_machines")):
        assert x == y


@pytest.mark.slow
def test_two_machines_fsdp_killed_and_resumed_export_the_one_machine_fsdp_weights(one_machine,
                                                                                   tmp_path):
    outputs, paths, _ = one_machine
    _run(fsdp_torchrun([*TRAIN, *ONE_MACHINE, paths, "run_name=fsdp_one_machine"]), outputs)
    args = [*TRAIN, *MACHINES, paths, "run_name=fsdp_two_machines"]
    first, second = two_machines_killed_and_resumed(lambda rank, port: _fsdp_machine(args, rank, port),
                                                    outputs, "fsdp_two_machines", tmp_path / "logs")
    for rank in (0, 1):
        assert (rank, rank) in _joined(first[rank]) and (rank, rank) in _joined(second[rank])
    ckpt = outputs / "runs" / "pretrain" / "fsdp_two_machines" / "checkpoints" / "step-0000006"
    assert (ckpt / "pytorch_model_fsdp_0").is_dir() and (ckpt / "optimizer_0").is_dir()
    assert "export: " in second[0] and "export: " not in second[1]
    one, two = _weights(outputs, "fsdp_one_machine"), _weights(outputs, "fsdp_two_machines")
    ddp = _weights(outputs, "one_machine")
    assert one.keys() == two.keys()
    print(f"FSDP2 2 machines vs 1 machine: max weight difference {_max_difference(one, two):.3g}; "
          f"vs DDP on 1 machine: {_max_difference({k: two[k] for k in ddp}, ddp):.3g}")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=FSDP_VS_DDP_ATOL, msg=key)
    for key in ddp:
        torch.testing.assert_close(two[key], ddp[key], rtol=0, atol=FSDP_VS_DDP_ATOL, msg=key)
    assert [s for s, _ in _history(outputs, "fsdp_two_machines")] == list(range(1, 7))
