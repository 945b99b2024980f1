"""task=pretrain end to end on a tiny ModernBERT: resume exactness, export, tracking, bad input."""

from __future__ import annotations

import os
import signal
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

TINY = ["model=modernbert_tiny", "model.vocab_size=320", "model.arch.hidden_size=32",
        "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=2",
        "model.arch.intermediate_size=64", "model.max_positions=128", "context=ctx64",
        "dataset=local_text"]
TRAIN = ["task=pretrain", *TINY, "task.global_batch_size=4", "hardware.micro_batch_size=2",
         "hardware.gradient_accumulation_steps=2", "task.warmup_steps=2", "task.lr=3e-3",
         "task.log_every=1", "task.eval_every=3", "task.eval_batches=2", "task.eval_t_grid=4"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Outputs folder with tiny prepared data, and the dataset.paths override that names it."""
    return prepare_tiny_text(tmp_path_factory.mktemp("pretrain"), TINY)


def _weights(outputs: Path, run_name: str) -> dict:
    return load_file(str(outputs / "models" / run_name / "model.safetensors"))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights_and_metrics_are_not_duplicated(prepared, tmp_path):
    outputs, paths = prepared
    common = [*TRAIN, paths, "task.max_steps=8", "task.save_every=2"]
    clean = run_cli([*common, "run_name=clean", "tracking=off"], outputs)
    assert clean.returncode == 0, clean.stderr

    env = dict(os.environ, LDM_OUTPUTS=str(outputs))
    args = [sys.executable, str(REPO / "run.py"), *common, "run_name=killed"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = outputs / "runs" / "pretrain" / "killed" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (ckpts / "step-0000004" / "trainer_state.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint at step 4"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (outputs / "models" / "killed").exists()

    resumed = run_cli([*common, "run_name=killed"], outputs)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(outputs, "clean"), _weights(outputs, "killed")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)

    runs = find_runs(local_store_uri(outputs), "pretrain")
    killed = [r for r in runs if r.info.run_name == "killed"]
    assert len(killed) == 1, "the resumed run continues the same mlflow run"
    from mlflow.tracking import MlflowClient

    history = MlflowClient(local_store_uri(outputs)).get_metric_history(killed[0].info.run_id, "loss")
    steps = [m.step for m in history]
    assert sorted(steps) == list(range(1, 9)), steps


@pytest.mark.slow
def test_export_reloads_with_auto_classes_and_gives_the_same_logits(prepared):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    outputs, paths = prepared
    proc = run_cli([*TRAIN, paths, "task.max_steps=3", "run_name=exp", "tracking=off"], outputs)
    assert proc.returncode == 0, proc.stderr
    folder = outputs / "models" / "exp"
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("the king spoke to the queen", return_tensors="pt")["input_ids"]
    again = AutoModelForMaskedLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, again(ids).logits)
    state = load_file(str(folder / "model.safetensors"))
    for key, value in model.state_dict().items():
        if key in state:
            torch.testing.assert_close(value, state[key])
    assert (folder / "ldm_config.yaml").is_file() and (folder / "ldm_export.json").is_file()
    assert "held-out NELBO/token" in proc.stdout


def _error(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_missing_prepared_data_names_the_prepare_command(tmp_path):
    text = tmp_path / "x.txt"
    text.write_text("never prepared\n")
    line = _error(run_cli([*TRAIN, f"dataset.paths=[{text}]", "tracking=off"], tmp_path))
    assert "no prepared data" in line
    assert (f"task=prepare dataset=local_text model=modernbert_tiny context=ctx64 "
            f"'dataset.paths=[{text}]'") in line
    line = _error(run_cli([*TRAIN, "dataset.paths=[/x.txt]", "tracking=off"], tmp_path))
    assert "dataset.paths file '/x.txt' does not exist" in line


def test_batch_numbers_that_disagree_are_refused_before_training(prepared):
    outputs, paths = prepared
    line = _error(run_cli([*TRAIN, paths, "task.global_batch_size=6", "tracking=off"], outputs))
    assert "task.global_batch_size=6" in line and "hardware.micro_batch_size=2" in line


def test_context_longer_than_model_positions_is_refused(prepared):
    outputs, paths = prepared
    line = _error(run_cli([*TRAIN, paths, "model.max_positions=32", "tracking=off"], outputs))
    assert "context.length=64" in line


@pytest.mark.slow
def test_non_finite_loss_stops_at_that_step_and_names_the_resume_point(prepared):
    outputs, paths = prepared
    proc = run_cli([*TRAIN, paths, "task.max_steps=6", "task.save_every=1", "task.warmup_steps=0",
                    "task.lr=1e30", "task.grad_clip=0", "run_name=nan", "tracking=off"], outputs)
    line = _error(proc)
    assert "non-finite" in line and "step-000000" in line
    assert not (outputs / "models" / "nan").exists()


@pytest.mark.slow
def test_checkpoint_of_another_architecture_is_refused(prepared):
    outputs, paths = prepared
    first = run_cli([*TRAIN, paths, "task.max_steps=1", "run_name=arch_a", "tracking=off"], outputs)
    assert first.returncode == 0, first.stderr
    ckpt = outputs / "runs" / "pretrain" / "arch_a" / "checkpoints" / "step-0000001"
    line = _error(run_cli([*TRAIN, paths, "task.max_steps=2", "model.arch.hidden_size=48",
                           f"task.resume_from={ckpt}", "run_name=arch_b", "tracking=off"], outputs))
    assert str(ckpt) in line


def test_unwritable_export_folder_is_refused(prepared, tmp_path):
    outputs, paths = prepared
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    line = _error(run_cli([*TRAIN, paths, f"paths.models={blocker}/models", "tracking=off"], outputs))
    assert "not writable" in line
