"""Every setting is checked before anything is written; a failure after training began keeps the
weights (the last state is checkpointed first).

Layer: unit, the tasks' checks called in-process; one test runs `run.py` as a process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import compose_config, run_cli, write_corpus
from ldm.errors import ConfigError, LdmError

TINY = ["model=modernbert_tiny", "model.vocab_size=320", "model.arch.hidden_size=32",
        "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=2",
        "model.arch.intermediate_size=64", "model.max_positions=128", "context=ctx64"]
TRAIN = ["task.max_steps=2", "task.global_batch_size=2", "hardware.micro_batch_size=2",
         "task.eval_every=0", "task.eval_batches=1", "task.eval_t_grid=2", "task.warmup_steps=0"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Tiny prepared text data: (outputs, dataset.paths override)."""
    from ldm.tasks import prepare

    root = tmp_path_factory.mktemp("lost")
    corpus = write_corpus(root / "corpus", n_docs=10, words=150)
    paths = f"dataset.paths=[{corpus}/*.txt]"
    outputs = root / "outputs"
    prepare.run(compose_config(["task=prepare", *TINY, "dataset=local_text", paths,
                                "dataset.test_split_pct=0.25", "tracking=off"], outputs=outputs))
    return outputs, paths


def nothing_written(outputs: Path, task: str) -> None:
    from ldm.runs import find_runs
    from ldm.tracking import local_store_uri

    assert not (outputs / "runs" / task).exists()
    assert not (outputs / "models").exists()
    assert not (outputs / "mlflow.db").exists() or not find_runs(local_store_uri(outputs), task)


@pytest.mark.parametrize("bad, named", [
    ("masking.eps=2", "masking.eps=2"), ("masking.time_sampling=stratified", "'stratified'"),
    ("hardware.micro_batch_size=0", "hardware.micro_batch_size=0"),
])
def test_bad_training_settings_are_refused_before_model_mlflow_or_folders(prepared, bad, named):
    from ldm.tasks import pretrain

    outputs, paths = prepared
    cfg = compose_config(["task=pretrain", *TINY, "dataset=local_text", paths, *TRAIN,
                          "tracking=mlflow_local", bad], outputs=outputs)
    with pytest.raises(ConfigError, match=named.replace("[", r"\[")):
        pretrain.run(cfg)
    nothing_written(outputs, "pretrain")


@pytest.mark.parametrize("bad, named", [
    (["sampler.threshold=1.5"], "sampler.threshold=1.5"),
    (["sampler.max_new_tokens=16"], "divide sampler.max_new_tokens=16"),
])
def test_sft_sampler_settings_for_its_evaluations_are_refused_before_training(tmp_path, bad, named):
    from ldm.tasks import sft

    outputs = tmp_path / "outputs"
    cfg = compose_config(["task=sft", *TINY, "dataset=synthetic_tasks", *TRAIN,
                          "task.eval_samples=2", "tracking=mlflow_local", *bad], outputs=outputs)
    with pytest.raises(ConfigError, match=named):
        sft.run(cfg)
    nothing_written(outputs, "sft")


def test_a_failing_run_leaves_no_run_folder_behind(prepared):
    outputs, paths = prepared
    proc = run_cli(["task=pretrain", *TINY, "dataset=local_text", paths, *TRAIN, "tracking=off",
                    "hardware.micro_batch_size=0", "run_name=never"], outputs)
    assert proc.returncode == 2 and "hardware.micro_batch_size=0" in proc.stderr
    assert not (outputs / "runs" / "pretrain" / "never").exists()


def test_a_failing_final_evaluation_keeps_the_trained_weights_in_a_checkpoint(prepared):
    from ldm.tasks.train_common import run_training
    from ldm.train.checkpoint import latest_checkpoint
    from ldm.train.data import packed_collate

    outputs, paths = prepared
    cfg = compose_config(["task=pretrain", *TINY, "dataset=local_text", paths, *TRAIN,
                          "tracking=off", "run_name=boom"], outputs=outputs)

    def failing(tokenizer, test, *context):
        def on_eval(model, step):
            raise LdmError(f"evaluation failed at step {step}")
        return on_eval

    with pytest.raises(LdmError, match="evaluation failed at step 2"):
        run_training(cfg, kind="text", collate_for=lambda tok, manifest, heldout: packed_collate, on_eval_for=failing)
    run = outputs / "runs" / "pretrain" / "boom"
    assert latest_checkpoint(run).name == "step-0000002"
    # the same command without the failure evaluates and exports that checkpoint, no step redone
    nelbo = run_training(cfg, kind="text", collate_for=lambda tok, manifest, heldout: packed_collate)
    assert nelbo == nelbo and (outputs / "models" / "boom" / "model.safetensors").is_file()
