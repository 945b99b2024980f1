"""task=sft end to end on a tiny ModernBERT: the held-out answer NELBO falls; bad input.

Layer: cli, `run.py task=sft` as processes; one sampling check in-process.
"""

from __future__ import annotations

import json
import shutil

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_cli, write_corpus
from ldm.runs import find_runs
from ldm.tracking import local_store_uri

TINY = ["model=modernbert_tiny", "model.vocab_size=320", "model.arch.hidden_size=48",
        "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=2",
        "model.arch.intermediate_size=96", "model.max_positions=128", "context=ctx64"]
CHAT = ["dataset=synthetic_tasks", "dataset.max_documents=240", "dataset.task_types=[copy]"]


@pytest.fixture(scope="module")
def base_export(tmp_path_factory):
    """A tiny pretraining export and its outputs folder."""
    root = tmp_path_factory.mktemp("sft")
    corpus = write_corpus(root / "corpus", n_docs=12, words=200)
    outputs = root / "outputs"
    text = [*TINY, "dataset=local_text", f"dataset.paths=[{corpus}/*.txt]", "tracking=off"]
    proc = run_cli(["task=prepare", *text, "dataset.test_split_pct=0.25"], outputs)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(["task=pretrain", *text, "task.max_steps=2", "task.global_batch_size=4",
                    "hardware.micro_batch_size=4", "task.eval_batches=1", "run_name=base"], outputs)
    assert proc.returncode == 0, proc.stderr
    return outputs, outputs / "models" / "base"


@pytest.mark.slow
def test_tiny_sft_run_lowers_the_heldout_answer_nelbo(base_export):
    outputs, base = base_export
    proc = run_cli(["task=prepare", *TINY, *CHAT, f"init_from={base}", "tracking=off"], outputs)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((outputs / "data" / "synthetic_tasks" / "bpe320" / "ctx64" /
                           "manifest.json").read_text())
    assert manifest["kind"] == "chat" and manifest["padding"] == "eos"
    proc = run_cli(["task=sft", *TINY, *CHAT, f"init_from={base}", "task.max_steps=40",
                    "task.global_batch_size=8", "hardware.micro_batch_size=8", "task.lr=3e-3",
                    "task.warmup_steps=4", "task.eval_every=20", "task.eval_batches=2",
                    "task.eval_samples=2", "sampler.max_new_tokens=8", "sampler.block_length=8",
                    "run_name=chat"], outputs)
    assert proc.returncode == 0, proc.stderr
    run = next(r for r in find_runs(local_store_uri(outputs), "sft") if r.info.run_name == "chat")
    client = MlflowClient(local_store_uri(outputs))
    history = sorted(client.get_metric_history(run.info.run_id, "eval_nelbo"), key=lambda m: m.step)
    assert [m.step for m in history] == [20, 40]
    assert history[-1].value < history[0].value
    # one source for the normaliser: masking.normalizer, null = the chat data's "sequence"
    assert run.data.params["masking.normalizer"] == "None" and "task.normalizer" not in run.data.params
    artifacts = client.list_artifacts(run.info.run_id, "samples")
    assert [a.path for a in artifacts] == ["samples/step-0000020.jsonl", "samples/step-0000040.jsonl"]
    export = outputs / "models" / "chat"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export)
    assert "<|assistant|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                      add_generation_prompt=True, tokenize=False)


def _error(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_init_from_a_folder_without_tokenizer_is_refused(base_export, tmp_path):
    outputs, base = base_export
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(base / "config.json", bare / "config.json")
    line = _error(run_cli(["task=prepare", *TINY, *CHAT, f"init_from={bare}", "tracking=off"], outputs))
    assert str(bare) in line and "tokenizer" in line


def test_chat_data_for_a_model_from_scratch_trains_its_own_bpe(tmp_path):
    proc = run_cli(["task=prepare", *TINY, *CHAT, "tracking=off"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "data" / "synthetic_tasks" / "bpe320" / "ctx64"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
    assert len(tok) <= 320 + 4 and "<|assistant|>" in tok.get_vocab()


def test_sft_on_a_text_dataset_is_refused(base_export):
    outputs, base = base_export
    line = _error(run_cli(["task=sft", *TINY, "dataset=shakespeare", f"init_from={base}",
                           "tracking=off"], outputs))
    assert "kind 'chat'" in line and "dataset=shakespeare" in line


def test_sft_samples_ask_the_last_question_of_a_multi_turn_conversation_as_evaluate_does():
    from datasets import Dataset

    import ldm.scoring
    import ldm.tasks.sft as sft

    # user 1 | answer 1 | user 2 | answer 2 + EOS | padding
    ids = [10, 11, 20, 21, 30, 31, 40, 41, 9, 9, 9]
    answer = [0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1]
    split = Dataset.from_dict({"input_ids": [ids], "answer_mask": [answer], "length": [9]})
    assert sft.heldout_answers is ldm.scoring.heldout_answers  # one helper for both tasks
    prompt, reference = sft.heldout_answers(split, 1)[0]
    assert prompt == [10, 11, 20, 21, 30, 31] and reference == [40, 41, 9]
