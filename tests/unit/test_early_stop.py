"""Training that stops at a held-out target or a time cap: the stop is a finished run (checkpoint,
export that says why, a rerun that trains no further); an unreached target says so plainly.

Layer: unit, the training loop's stop rules in-process; three tests run `run.py` as processes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForMaskedLM

from conftest import run_cli
from ldm.errors import ConfigError
from ldm.tasks.chain_summary import goal_line, training_line
from ldm.train import checkpoint as ckpt
from ldm.train.data import packed_collate
from ldm.train.loop import train, validate
from ldm.train.settings import LoopConfig


class Recorder:
    def __init__(self):
        self.metrics = []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))


def _model():
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=32,
                                      max_position_embeddings=32))


def _rows():
    return Dataset.from_dict(
        {"input_ids": np.random.default_rng(0).integers(2, 40, (16, 16)).tolist()})


def _train(tmp_path, on_eval=None, **overrides):
    from accelerate import Accelerator

    settings = dict(max_steps=10, global_batch_size=2, micro_batch_size=2, accumulation=1,
                    mask_id=1, lr=1e-3, warmup_steps=0, progress=False, eval_every=2,
                    eval_batches=1, log_every=1)
    settings.update(overrides)
    cfg = LoopConfig(**settings)
    exports = []

    def export(mlm, step, stopped=""):
        exports.append((step, stopped))

    final = train(_model(), None, _rows(), _rows(), packed_collate, cfg,
                  accelerator=Accelerator(cpu=True), run_dir=tmp_path / "run", tracker=Recorder(),
                  export=export, on_eval=on_eval)
    return final, exports


def test_an_evaluation_that_reports_its_target_stops_training_there_as_a_finished_run(tmp_path):
    seen = []

    def on_eval(mlm, step):
        seen.append(step)
        return "target reached: copy 100%" if step == 4 else None

    final, exports = _train(tmp_path, on_eval)
    assert seen == [2, 4] and final["stopped"] == "target reached: copy 100%"
    assert exports == [(4, "target reached: copy 100%")]
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    assert latest.name == "step-0000004"
    assert ckpt.read_state(latest)["stopped"] == "target reached: copy 100%"
    # the same run again trains no further: it exports the stopped checkpoint, saying why
    final, exports = _train(tmp_path, lambda mlm, step: pytest.fail("trained again"))
    assert exports == [(4, "target reached: copy 100%")] and final["stopped"].startswith("target")
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-0000004"


def test_a_target_never_reached_trains_to_max_steps_and_exports_without_a_stop_reason(tmp_path):
    final, exports = _train(tmp_path, lambda mlm, step: None)
    assert final["stopped"] == "" and exports == [(10, "")]


def test_the_time_cap_stops_training_after_the_step_that_passes_it(tmp_path):
    final, exports = _train(tmp_path, max_minutes=1e-9)
    assert exports == [(1, final["stopped"])]
    assert final["stopped"] == "time cap: task.max_minutes=1e-09 passed"
    assert final["train_seconds"] > 0


def test_a_time_cap_that_is_not_positive_is_refused_before_training():
    with pytest.raises(ConfigError, match=r"task.max_minutes=0 must be > 0"):
        validate(LoopConfig(max_steps=1, global_batch_size=1, micro_batch_size=1,
                            accumulation=1, mask_id=1, max_minutes=0), 1)


# --- the summary's lines -------------------------------------------------------------------------

def test_the_goal_line_names_every_type_below_the_goal_and_only_those():
    metrics = {"exact_match": 0.5, "exact_match.copy": 1.0, "exact_match.reverse": 0.01}
    line = goal_line(metrics, 0.95)
    assert line.startswith("MISSED the goal of 95%") and "reverse 1.0%" in line
    assert "copy" not in line
    assert goal_line({"exact_match.copy": 0.95, "exact_match.reverse": 1.0}, 0.95) == \
        "goal met: every task type at >= 95% held-out exact match"


def _export_info(outputs, run, **info):
    folder = outputs / "models" / run
    folder.mkdir(parents=True)
    (folder / "ldm_export.json").write_text(json.dumps(info))


def test_the_training_line_tells_a_reached_target_from_a_cap(tmp_path):
    args = ["task=sft", "run_name=a", "task.target_exact_match=0.98"]
    _export_info(tmp_path, "a", step=700, max_steps=3000, stopped="target reached: copy 100%")
    assert training_line(tmp_path, args) == \
        "training stopped at step 700 of at most 3000: target reached: copy 100%"
    _export_info(tmp_path, "b", step=3000, max_steps=3000)
    line = training_line(tmp_path, ["task=sft", "run_name=b", "task.target_exact_match=0.98"])
    assert line.startswith("training HIT ITS STEP CAP (3000 steps) before its target")
    _export_info(tmp_path, "c", step=90, max_steps=3000, stopped="time cap: task.max_minutes=1 passed")
    line = training_line(tmp_path, ["task=sft", "run_name=c"])
    assert line.startswith("training HIT ITS CAP at step 90") and "max_minutes=1" in line


# --- task=sft with a target ------------------------------------------------------------------------

TINY = ["model=modernbert_tiny", "model.vocab_size=262", "model.arch.hidden_size=32",
        "model.arch.num_hidden_layers=1", "model.arch.num_attention_heads=2",
        "model.arch.intermediate_size=64", "context=ctx48", "dataset=synthetic_tasks",
        "dataset.max_documents=200", "dataset.task_types=[copy,reverse]", "dataset.padding=answer",
        "dataset.answer_positions=12", "sampler=fast", "sampler.max_new_tokens=12",
        "sampler.block_length=12"]


@pytest.mark.parametrize("override, message", [
    ("task.target_exact_match=1.5", "task.target_exact_match=1.5 must be in (0, 1]"),
    ("task.target_examples=0", "task.target_examples=0 must be >= 1"),
    ("task.eval_every=0", "set task.eval_every >= 1 (now 0)"),
])
def test_a_target_the_run_cannot_check_is_refused_before_anything_loads(tmp_path, override,
                                                                        message):
    proc = run_cli(["task=sft", *TINY, "task.target_exact_match=0.9", override, "tracking=off"],
                   tmp_path)
    assert proc.returncode != 0 and message in proc.stderr
    assert not (tmp_path / "models").exists() and not list((tmp_path / "runs").rglob("*.json"))


def test_a_target_on_data_without_exact_answers_is_refused(tmp_path):
    proc = run_cli(["task=sft", "dataset=construction_faq", "task.target_exact_match=0.9",
                    "tracking=off"], tmp_path)
    assert proc.returncode != 0
    assert "dataset.source=synthetic" in proc.stderr and "dataset=construction_faq" in proc.stderr


@pytest.mark.slow
def test_sft_checks_its_target_on_held_out_answers_and_logs_versions_and_machine(tmp_path):
    from mlflow.tracking import MlflowClient

    from ldm.runs import find_runs
    from ldm.tracking import local_store_uri

    proc = run_cli(["task=prepare", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(["task=sft", *TINY, "run_name=t", "task.max_steps=4", "task.eval_every=2",
                    "task.global_batch_size=8", "hardware.micro_batch_size=8",
                    "task.target_exact_match=1.0", "task.target_examples=16",
                    "task.eval_samples=0"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out exact match (16 prompts, target 100% on every type): copy" in \
        proc.stdout + proc.stderr
    info = json.loads((tmp_path / "models" / "t" / "ldm_export.json").read_text())
    assert info["step"] == 4 and info["max_steps"] == 4 and "stopped" not in info
    run = find_runs(local_store_uri(tmp_path), "sft")[0]
    history = MlflowClient(local_store_uri(tmp_path)).get_metric_history(
        run.info.run_id, "heldout_exact_match.reverse")
    assert [m.step for m in history] == [2, 4]
    import importlib.metadata as md

    tags = run.data.tags
    for name in ("torch", "transformers", "accelerate", "datasets", "tokenizers"):
        assert tags[f"version.{name}"] == md.version(name)
    assert tags["machine.cpu"] and tags["machine.gpu"] == "none"
    assert int(tags["machine.torch_threads"]) >= 1 and int(tags["machine.cores"]) >= 1
