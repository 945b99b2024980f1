"""Several processes (gloo on CPU): same training as one process, one run folder, exact resume.

Launchers that start 2 CPU processes with accelerate 1.15: `accelerate launch --multi_gpu
--num_processes 2 run.py hardware=cpu ...` (torchrun underneath; hardware=cpu keeps the
Accelerator on the CPU with gloo) and `torchrun --standalone --nproc_per_node 2`.
`accelerate launch --cpu --num_processes 2` starts a single process without MPI; the
hardware.num_processes check refuses that run.

Layer: cli, `run.py` under torchrun and accelerate launch as processes; one data-order check
in-process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, prepare_tiny_text, run_cli
from ldm.runs import find_runs
from ldm.tracking import local_store_uri
from ldm.train.data import BatchPlan

TINY = ["model=modernbert_tiny", "model.vocab_size=320", "model.arch.hidden_size=32",
        "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=2",
        "model.arch.intermediate_size=64", "model.max_positions=128", "context=ctx64",
        "dataset=local_text"]
# global batch 4 = 2 processes x 2 rows, or 1 process x 2 rows x 2 accumulation steps
TRAIN = ["task=pretrain", *TINY, "task.global_batch_size=4", "hardware.micro_batch_size=2",
         "task.warmup_steps=2", "task.lr=3e-3", "task.log_every=1", "task.eval_every=3",
         "task.eval_batches=2", "task.eval_t_grid=4", "task.max_steps=6", "task.save_every=2"]
TWO = ["hardware.num_processes=2", "hardware.gradient_accumulation_steps=1"]
ONE = ["hardware.num_processes=1", "hardware.gradient_accumulation_steps=2"]


def _env(outputs: Path) -> dict:
    env = dict(os.environ, LDM_OUTPUTS=str(outputs), HF_HUB_DISABLE_TELEMETRY="1",
               OMP_NUM_THREADS="1")
    for name in ("HYDRA_FULL_ERROR", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(args) -> list:
    """Return the command that runs run.py ARGS as 2 CPU processes through accelerate launch."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), str(REPO / "run.py"), *args]


def torchrun(args) -> list:
    """Return the command that runs run.py ARGS as 2 CPU processes through torchrun."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(REPO / "run.py"), *args]


def _run(command, outputs: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=REPO, env=_env(outputs), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _weights(outputs: Path, run_name: str) -> dict:
    return load_file(str(outputs / "models" / run_name / "model.safetensors"))


def _history(outputs: Path, run_name: str, metric: str = "loss") -> list:
    from mlflow.tracking import MlflowClient

    runs = [r for r in find_runs(local_store_uri(outputs), "pretrain") if r.info.run_name == run_name]
    assert len(runs) == 1, f"{len(runs)} mlflow runs named {run_name}"
    history = MlflowClient(local_store_uri(outputs)).get_metric_history(runs[0].info.run_id, metric)
    return [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Outputs folder with tiny prepared data, and the dataset.paths override that names it."""
    return prepare_tiny_text(tmp_path_factory.mktemp("distributed"), TINY)


@pytest.fixture(scope="module")
def two_processes(prepared):
    """An uninterrupted 2-process run (accelerate launch) named `two`, tracked in mlflow."""
    outputs, paths = prepared
    _run(accelerate_launch([*TRAIN, *TWO, paths, "run_name=two"]), outputs)
    return outputs, paths


@pytest.mark.slow
def test_two_processes_train_exactly_like_one_process_with_twice_the_accumulation(two_processes):
    outputs, paths = two_processes
    _run([sys.executable, str(REPO / "run.py"), *TRAIN, *ONE, paths, "run_name=one"], outputs)
    a, b = _weights(outputs, "one"), _weights(outputs, "two")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    one, two = _history(outputs, "one"), _history(outputs, "two")
    assert [s for s, _ in two] == list(range(1, 7)), "rank 0 alone logs each step once"
    assert [s for s, _ in one] == [s for s, _ in two]
    for (_, x), (_, y) in zip(one, two):
        assert x == pytest.approx(y, rel=1e-5)
    assert _history(outputs, "one", "tokens_seen")[-1] == _history(outputs, "two", "tokens_seen")[-1]


@pytest.mark.slow
def test_ranks_share_one_run_folder_and_checkpoints_hold_every_ranks_rng_state(two_processes):
    outputs, _ = two_processes
    folder = outputs / "runs" / "pretrain" / "two"
    assert (folder / ".hydra" / "config.yaml").is_file() and (folder / "run.log").is_file()
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]
    last = folder / "checkpoints" / "step-0000006"
    assert (last / "random_states_0.pkl").is_file() and (last / "random_states_1.pkl").is_file()
    assert json.loads((last / "trainer_state.json").read_text())["tokens_seen"] == 6 * 4 * 64
    assert not list((folder / "checkpoints").glob(".step-*")), "no partial checkpoint left"


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_same_weights(two_processes):
    outputs, paths = two_processes
    command = torchrun([*TRAIN, *TWO, paths, "run_name=killed"])
    proc = subprocess.Popen(command, cwd=REPO, env=_env(outputs), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = outputs / "runs" / "pretrain" / "killed" / "checkpoints"
    deadline = time.monotonic() + 180
    try:
        while not (ckpts / "step-0000002" / "trainer_state.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint at step 2"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks: a lost machine
        proc.wait()
    assert not (outputs / "models" / "killed").exists()

    _run(command, outputs)
    a, b = _weights(outputs, "two"), _weights(outputs, "killed")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    steps = [s for s, _ in _history(outputs, "killed")]
    assert steps == list(range(1, 7)), "the resumed run continues the same mlflow run"


def fsdp_torchrun(args) -> list:
    """Return the command that runs run.py ARGS as 2 CPU processes under FSDP2 (gloo)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(REPO / "tests" / "fsdp_cpu_run.py"), *args]


def _kill_after_checkpoint(command, outputs: Path, run_name: str, step: int) -> None:
    """Start `command`, SIGKILL the launcher and every rank once checkpoint `step` is complete."""
    proc = subprocess.Popen(command, cwd=REPO, env=_env(outputs), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    done = outputs / "runs" / "pretrain" / run_name / "checkpoints" / f"step-{step:07d}"
    deadline = time.monotonic() + 180
    try:
        while not (done / "trainer_state.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, f"no checkpoint at step {step}"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a lost machine
        proc.wait()


# FSDP2 and DDP sum the same fp32 gradients in another order (reduce-scatter vs all-reduce);
# after 6 AdamW steps at lr 3e-3 the weights measured 6e-8 apart at most
FSDP_VS_DDP_ATOL = 1e-6


@pytest.mark.slow
def test_fsdp_run_killed_and_resumed_from_sharded_checkpoints_exports_the_ddp_weights(two_processes):
    outputs, paths = two_processes
    command = fsdp_torchrun([*TRAIN, *TWO, paths, "run_name=fsdp"])
    _kill_after_checkpoint(command, outputs, "fsdp", 2)
    assert not (outputs / "models" / "fsdp").exists()
    ckpt = outputs / "runs" / "pretrain" / "fsdp" / "checkpoints" / "step-0000002"
    assert (ckpt / "pytorch_model_fsdp_0").is_dir() and (ckpt / "optimizer_0").is_dir(), \
        "FSDP checkpoints are sharded (every rank writes its part)"
    assert not (ckpt / "model.safetensors").exists()

    _run(command, outputs)
    ddp, fsdp = _weights(outputs, "two"), _weights(outputs, "fsdp")
    assert set(ddp) <= set(fsdp)
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=0, atol=FSDP_VS_DDP_ATOL, msg=key)
        assert fsdp[key].dtype == torch.float32, key
    if "decoder.weight" in fsdp:  # the gathered export names the tied decoder too
        torch.testing.assert_close(fsdp["decoder.weight"],
                                   fsdp["model.embeddings.tok_embeddings.weight"], rtol=0, atol=0)
    steps = [s for s, _ in _history(outputs, "fsdp")]
    assert steps == list(range(1, 7)), "the resumed run continues the same mlflow run"
    ddp_loss, fsdp_loss = _history(outputs, "two"), _history(outputs, "fsdp")
    for (_, x), (_, y) in zip(ddp_loss, fsdp_loss):
        assert x == pytest.approx(y, rel=1e-5)
    # the attention implementation "auto" chose is in the run log and the mlflow params
    assert "attention: sdpa (model.attn_implementation=auto" in \
        (outputs / "runs" / "pretrain" / "fsdp" / "run.log").read_text()
    run = [r for r in find_runs(local_store_uri(outputs), "pretrain") if r.info.run_name == "fsdp"][0]
    assert run.data.params["attention"] == "sdpa" and run.data.tags["ldm.attention"] == "sdpa"


ACCUMULATION_PROBE = '''
import json, sys
from pathlib import Path

import numpy as np
from datasets import Dataset
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from transformers import BertConfig, BertForMaskedLM

from ldm.tracking import Tracker
from ldm.train.data import packed_collate
from ldm.train.loop import make_accelerator, train
from ldm.train.settings import LoopConfig

out = Path(sys.argv[1])
cfg = LoopConfig(max_steps=3, global_batch_size=8, micro_batch_size=2, accumulation=2, mask_id=1,
                 lr_schedule="constant", progress=False)
accelerator = make_accelerator(cfg)
model = BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32,
                                   max_position_embeddings=32))
rows = Dataset.from_dict({"input_ids": np.random.default_rng(0).integers(2, 40, (32, 16)).tolist()})
syncs = []
prepare = accelerator.prepare

def counting_prepare(*objects):
    wrapped, optimizer = prepare(*objects)

    def hook(state, bucket):
        syncs.append(bucket.index())
        return allreduce_hook(None, bucket)

    wrapped.register_comm_hook(None, hook)
    return wrapped, optimizer

accelerator.prepare = counting_prepare
train(model, None, rows, None, packed_collate, cfg, accelerator=accelerator, run_dir=out / "run",
      tracker=Tracker(enabled=False), export=lambda mlm, step: None)

# then a checkpoint whose write fails on rank 1 only (a full disk on one machine)
from ldm.errors import LdmError
from ldm.train.checkpoint import save_checkpoint

if accelerator.process_index == 1:
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    accelerator.save_state = full_disk
try:
    save_checkpoint(accelerator, out / "run", 9, {}, keep_last=5)
    outcome = "saved"
except LdmError as err:
    outcome = str(err)
(out / f"probe{accelerator.process_index}.json").write_text(json.dumps(
    {"syncs": syncs, "save": outcome}))
'''


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """Run ACCUMULATION_PROBE as 2 processes; return what each rank saw."""
    folder = tmp_path_factory.mktemp("probe")
    script = folder / "probe.py"
    script.write_text(ACCUMULATION_PROBE)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", str(script), str(folder)]
    _run(command, folder / "outputs", timeout=180)
    return folder, [json.loads((folder / f"probe{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_gradient_accumulation_all_reduces_gradients_once_per_optimizer_step(probe):
    for rank, seen in enumerate(probe[1]):
        syncs = seen["syncs"]
        assert syncs.count(0) == 3, f"rank {rank}: bucket 0 reduced {syncs.count(0)} times in 3 steps"


@pytest.mark.slow
def test_checkpoint_that_one_process_cannot_write_fails_on_every_process(probe):
    folder, seen = probe
    for rank in (0, 1):
        assert "could not save the checkpoint of step 9" in seen[rank]["save"], seen[rank]
    assert "No space left" in seen[1]["save"]
    ckpts = folder / "run" / "checkpoints"
    assert not (ckpts / "step-0000009").exists() and not list(ckpts.glob(".step-*"))
    assert (ckpts / "step-0000003").is_dir(), "the previous checkpoint is intact"


def test_each_micro_batch_slot_reads_the_same_rows_whatever_the_process_count():
    # slot = micro * processes + rank: 2 processes x 2 accumulation steps read, slot by slot,
    # the rows 1 process x 4 accumulation steps reads; ranks never share a row within a step
    one = BatchPlan(48, 7, global_batch=8, micro_batch=2, accumulation=4, processes=1)
    two = BatchPlan(48, 7, global_batch=8, micro_batch=2, accumulation=2, processes=2)
    for step in range(30):  # five epochs
        by_rank = {0: set(), 1: set()}
        for micro in range(2):
            for rank in (0, 1):
                rows = two.indices(step, micro, rank).tolist()
                assert rows == one.indices(step, micro * 2 + rank, 0).tolist()
                by_rank[rank].update(rows)
        assert not by_rank[0] & by_rank[1]
        assert by_rank[0] | by_rank[1] == {int(r) for m in range(4) for r in one.indices(step, m, 0)}


def _error(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_launch_with_fewer_processes_than_hardware_num_processes_is_refused(prepared):
    # Under a launcher (WORLD_SIZE set) ldm starts nothing itself, so a launched world smaller
    # than the preset's layout is an error; a plain `python run.py` starts the layout instead
    # (tests/unit/test_recipes.py).
    outputs, paths = prepared
    launcher = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port())}
    line = _error(run_cli([*TRAIN, *TWO, paths, "tracking=off"], outputs, env_extra=launcher))
    assert "hardware.num_processes=2" in line and "launched as 1 process(es)" in line


def test_process_count_that_does_not_divide_the_global_batch_is_named(prepared):
    outputs, paths = prepared
    line = _error(run_cli([*TRAIN, paths, "hardware.num_processes=3",
                           "hardware.gradient_accumulation_steps=1", "tracking=off"], outputs))
    assert "task.global_batch_size=4" in line and "3 process(es) = 6" in line


def test_fsdp_config_that_wraps_no_layer_of_the_model_is_refused_before_training(prepared, tmp_path):
    outputs, paths = prepared
    config = tmp_path / "fsdp.yaml"
    config.write_text("distributed_type: FSDP\nnum_processes: 1\nmixed_precision: bf16\n"
                      "fsdp_config:\n  fsdp_version: 2\n  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
                      "  fsdp_transformer_layer_cls_to_wrap: BertLayer\n")
    line = _error(run_cli([*TRAIN, *ONE, paths, f"hardware.accelerate_config={config}",
                           "run_name=fsdp_bad", "tracking=off"], outputs))
    assert "fsdp_transformer_layer_cls_to_wrap=BertLayer" in line and str(config) in line
    assert "ModernBertEncoderLayer" in line, "names the layer class the model does have"
    assert not (outputs / "runs" / "pretrain" / "fsdp_bad" / "checkpoints").exists()


def test_missing_accelerate_config_file_is_refused(prepared):
    outputs, paths = prepared
    line = _error(run_cli([*TRAIN, *ONE, paths, "hardware.accelerate_config=accelerate_configs/nope.yaml",
                           "tracking=off"], outputs))
    assert "hardware.accelerate_config=accelerate_configs/nope.yaml" in line


def test_ranks_other_than_0_write_no_hydra_files_into_the_shared_run_folder(prepared):
    # a run folder is made only once every check passed, so these runs train (one step)
    outputs, paths = prepared
    short = [*TRAIN, *ONE, paths, "task.max_steps=1", "task.save_every=0", "tracking=off"]
    run_cli([*short, "run_name=rank1"], outputs, env_extra={"RANK": "1", "LOCAL_RANK": "1"})
    run_cli([*short, "run_name=rank0"], outputs)
    rank1, rank0 = (outputs / "runs" / "pretrain" / name for name in ("rank1", "rank0"))
    assert rank1.is_dir(), "every rank uses the one named run folder"
    assert (rank0 / ".hydra" / "config.yaml").is_file() and (rank0 / "run.log").is_file()
    assert not (rank1 / ".hydra").exists() and not (rank1 / "run.log").exists()
