"""task=evaluate on a tiny SFT export: held-out NELBO, scored answers, determinism; bad input.

Layer: cli, mostly `run.py task=evaluate` as processes; the answer metrics and a few refusals
in-process (the scoring functions alone: unit/test_evaluate.py).
"""

from __future__ import annotations

import json
import shutil

import pytest
from mlflow.tracking import MlflowClient

from conftest import compose_config, local_text_dir, run_cli, write_corpus
from ldm.errors import ConfigError, DataError
from ldm.scoring import answer_metrics, token_f1
from ldm.runs import find_runs
from ldm.tracking import local_store_uri

TINY = ["model=modernbert_tiny", "model.vocab_size=320", "model.arch.hidden_size=48",
        "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=2",
        "model.arch.intermediate_size=96", "model.max_positions=128", "context=ctx64"]
CHAT = ["dataset=synthetic_tasks", "dataset.max_documents=240", "dataset.task_types=[copy,max]"]
QUICK = ["task.t_grid=4", "task.mc_samples=1", "task.max_rows=16", "task.max_examples=6",
         "task.batch_size=4", "sampler.max_new_tokens=8", "sampler.block_length=8"]


def _config(outputs, *overrides):
    return compose_config(["task=evaluate", "tracking=off", *overrides], outputs=outputs)


def prepare(outputs, *overrides):
    """Run task=prepare in-process (tracking off)."""
    from ldm.tasks import prepare as task

    task.run(compose_config(["task=prepare", "tracking=off", *overrides], outputs=outputs))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(outputs, pretraining export, SFT export, corpus): text and synthetic data prepared."""
    root = tmp_path_factory.mktemp("evaluate")
    corpus = write_corpus(root / "corpus", n_docs=12, words=200)
    outputs = root / "outputs"
    text = [*TINY, "dataset=local_text", f"dataset.paths=[{corpus}/*.txt]"]
    base = outputs / "models" / "base"
    prepare(outputs, *text, "dataset.test_split_pct=0.25")
    proc = run_cli(["task=pretrain", *text, "task.max_steps=1", "task.global_batch_size=4",
                    "hardware.micro_batch_size=4", "task.eval_batches=1", "run_name=base",
                    "tracking=off"], outputs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prepare(outputs, *TINY, *CHAT, f"init_from={base}")
    proc = run_cli(["task=sft", *TINY, *CHAT, f"init_from={base}", "task.max_steps=2",
                    "task.global_batch_size=8", "hardware.micro_batch_size=8", "task.eval_every=0",
                    "task.eval_batches=1", "task.eval_samples=0", "task.save_every=0",
                    "tracking=off", "run_name=chat"], outputs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outputs, base, outputs / "models" / "chat", corpus


@pytest.fixture(scope="module")
def two_evaluations(exports):
    """The SFT export evaluated twice on held-out synthetic tasks: CLI (with mlflow), in-process."""
    from ldm.tasks.evaluate import run

    outputs, _, chat, _ = exports
    proc = run_cli(["task=evaluate", *TINY, *CHAT, *QUICK, f"checkpoint={chat}", "run_name=eval-a"],
                   outputs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run(_config(outputs, *TINY, *CHAT, *QUICK, f"checkpoint={chat}", "run_name=eval-b"))
    folders = [outputs / "runs" / "evaluate" / name / "eval" for name in ("eval-a", "eval-b")]
    return outputs, proc.stdout, folders


def _results(folder):
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_synthetic_evaluation_logs_one_result_per_example_and_exact_match_per_type(two_evaluations):
    outputs, stdout, (folder, _) = two_evaluations
    results = _results(folder)
    assert len(results) == 6
    for r in results:
        assert {"prompt", "reference", "answer", "correct", "task", "nfe", "seconds"} <= set(r)
        assert r["task"] in ("copy", "max") and "<|assistant|>" in r["prompt"]
        assert r["nfe"] >= 1 and r["seconds"] > 0
    run = next(r for r in find_runs(local_store_uri(outputs), "evaluate")
               if r.info.run_name == "eval-a")
    metrics = run.data.metrics
    types = {r["task"] for r in results}
    per_type = {k for k in metrics if k.startswith("exact_match.")}
    assert per_type == {f"exact_match.{t}" for t in types}
    assert metrics["exact_match"] == sum(r["correct"] for r in results) / 6
    for key in ("nelbo", "ppl_bound", "mean_nfe", "seconds_per_answer", "tokens_per_second"):
        assert key in metrics
    params = run.data.params
    assert params["sampler.max_new_tokens"] == "8" and params["sampler.name"] == "llada"
    assert run.data.tags["ldm.headline_metric"] == "exact_match"
    client = MlflowClient(local_store_uri(outputs))
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/results.jsonl", "eval/metrics.json"} <= logged
    assert "headline exact_match" in stdout and "higher is better" in stdout


@pytest.mark.slow
def test_evaluating_twice_gives_the_same_nelbo_and_the_same_answers(two_evaluations):
    _, _, (first, second) = two_evaluations
    a, b = (json.loads((f / "metrics.json").read_text()) for f in (first, second))
    assert a["nelbo"] == b["nelbo"] and a["exact_match"] == b["exact_match"]
    assert {k: v for k, v in a.items() if k.startswith("acc_t")} == \
        {k: v for k, v in b.items() if k.startswith("acc_t")}
    timing = ("seconds", "tokens_per_second")
    untimed = [[{k: v for k, v in r.items() if k not in timing} for r in _results(f)]
               for f in (first, second)]
    assert untimed[0] == untimed[1]
    assert any(r["answer"] for r in _results(first)), "answers worth comparing"


def _no_model_loads(monkeypatch):
    import ldm.model

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(ldm.model, "load_model", refuse)


@pytest.mark.slow
def test_text_data_evaluation_gives_the_nelbo_and_its_perplexity_bound(exports):
    from ldm.tasks.evaluate import run

    outputs, _, chat, corpus = exports
    # the SFT export knows the chat tokens too; text data prepared without them still agrees
    cfg = _config(outputs, *TINY, "dataset=local_text", f"dataset.paths=[{corpus}/*.txt]", *QUICK,
                  f"checkpoint={chat}", "run_name=text")
    nelbo = run(cfg)
    folder = outputs / "runs" / "evaluate" / "text" / "eval"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert nelbo == metrics["nelbo"] > 0 and metrics["rows"] == 16
    assert metrics["ppl_bound"] == pytest.approx(2.718281828 ** nelbo)
    assert not (folder / "results.jsonl").exists()


def test_token_f1_is_one_for_the_same_answer_zero_for_disjoint_and_partial_in_between():
    assert token_f1("The Fire wall, 60 mm.", "fire wall 60 mm") == 1.0
    assert token_f1("red brick", "concrete block") == 0.0
    # normalised: [cat, sat, on, mat] vs [cat, on, mat]: precision 3/4, recall 1
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    assert token_f1("", "") == 1.0 and token_f1("", "answer") == 0.0


def test_answer_metrics_give_exact_match_per_task_type_and_mean_costs():
    records = [{"task": "copy", "correct": True, "nfe": 2, "seconds": 0.5, "tokens": 4},
               {"task": "copy", "correct": False, "nfe": 4, "seconds": 0.5, "tokens": 2},
               {"task": "max", "correct": True, "nfe": 3, "seconds": 1.0, "tokens": 2}]
    m = answer_metrics(records)
    assert m["exact_match"] == pytest.approx(2 / 3)
    assert m["exact_match.copy"] == 0.5 and m["exact_match.max"] == 1.0
    assert m["mean_nfe"] == 3 and m["tokens_per_second"] == 4.0


def _error(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_a_missing_checkpoint_is_one_error_line(tmp_path):
    line = _error(run_cli(["task=evaluate", *TINY, *CHAT, "tracking=off"], tmp_path))
    assert "checkpoint=" in line and "outputs/models" in line


def test_an_unknown_sampler_preset_fails_cleanly_at_compose_time(tmp_path):
    proc = run_cli(["task=evaluate", *CHAT, "sampler=fastest", "tracking=off"], tmp_path)
    assert proc.returncode != 0 and "fastest" in proc.stderr and "fast" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_sampler_threshold_out_of_range_is_refused_before_anything_loads(tmp_path, monkeypatch):
    from ldm.tasks.evaluate import run

    _no_model_loads(monkeypatch)
    # checked before the checkpoint, so even a missing one is not what gets reported
    with pytest.raises(ConfigError, match=r"sampler.threshold=2"):
        run(_config(tmp_path, *TINY, *CHAT, f"checkpoint={tmp_path}/nowhere",
                    "sampler.threshold=2"))


@pytest.mark.slow
@pytest.mark.parametrize("missing,needle", [("config.json", "config.json"),
                                            ("model.safetensors", "model weights"),
                                            ("tokenizer.json", "tokenizer")])
def test_a_folder_that_is_not_an_export_is_refused(exports, tmp_path, monkeypatch, missing, needle):
    from ldm.tasks.evaluate import run

    outputs, _, chat, _ = exports
    broken = tmp_path / "broken"
    shutil.copytree(chat, broken)
    (broken / missing).unlink()
    _no_model_loads(monkeypatch)
    with pytest.raises(ConfigError, match="is not an export") as err:
        run(_config(outputs, *TINY, *CHAT, f"checkpoint={broken}"))
    assert needle in str(err.value) and str(broken) in str(err.value)


def test_a_checkpoint_path_that_does_not_exist_is_refused(tmp_path):
    from ldm.tasks.evaluate import run

    with pytest.raises(ConfigError, match="neither an export folder nor a hub id"):
        run(_config(tmp_path, *TINY, *CHAT, f"checkpoint={tmp_path}/nowhere"))


@pytest.mark.slow
def test_missing_prepared_data_names_the_prepare_command(exports, monkeypatch):
    from ldm.tasks.evaluate import run

    outputs, _, chat, _ = exports
    _no_model_loads(monkeypatch)
    with pytest.raises(DataError, match="no prepared data") as err:
        run(_config(outputs, *TINY, "dataset=construction_faq", f"checkpoint={chat}"))
    assert "python run.py task=prepare dataset=construction_faq model=modernbert_tiny " \
           f"context=ctx64 init_from={chat}" in str(err.value)


@pytest.mark.slow
def test_evaluate_and_sample_need_nothing_but_the_export(exports):
    outputs, _, chat, _ = exports
    proc = run_cli(["task=evaluate", f"checkpoint={chat}", *QUICK, "run_name=only-export",
                    "tracking=off"], outputs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((outputs / "runs" / "evaluate" / "only-export" / "eval" /
                          "metrics.json").read_text())
    assert metrics["nelbo"] > 0 and "exact_match" in metrics  # the synthetic data it trained on
    proc = run_cli(["task=sample", f"checkpoint={chat}", "prompt='copy: a b c'",
                    "sampler.max_new_tokens=8", "sampler.block_length=8", "run_name=only-export",
                    "tracking=off"], outputs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (outputs / "runs" / "sample" / "only-export" / "samples.jsonl").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("override, named", [
    ("model=minilm", "model=minilm contradicts checkpoint="),
    ("context=ctx128", "context=ctx128 contradicts checkpoint="),
    ("model.max_positions=64", "model.max_positions=64 contradicts checkpoint="),
])
def test_a_model_or_context_that_contradicts_the_export_is_one_error_naming_both(
        exports, override, named):
    outputs, _, chat, _ = exports
    line = _error(run_cli(["task=evaluate", f"checkpoint={chat}", override, "tracking=off"],
                          outputs))
    assert named in line and str(chat) in line and "trained with" in line


@pytest.mark.slow
def test_chat_data_on_a_pretraining_export_without_chat_tokens_is_refused(exports, monkeypatch):
    from ldm.tasks.evaluate import run

    outputs, base, _, _ = exports
    _no_model_loads(monkeypatch)
    with pytest.raises(DataError, match="no chat tokens") as err:
        run(_config(outputs, *TINY, *CHAT, f"checkpoint={base}"))
    assert "<|user|>" in str(err.value) and "SFT export" in str(err.value)


@pytest.mark.slow
def test_data_prepared_with_another_tokenizer_is_refused(exports, monkeypatch, tmp_path):
    from ldm.tasks.evaluate import run

    outputs, _, chat, corpus = exports
    text = ["dataset=local_text", f"dataset.paths=[{corpus}/*.txt]"]
    prepare(outputs, *text, "model=minilm", "context=ctx64")
    # minilm's data sits where this export's data is looked for, as if prepared by mistake
    elsewhere = tmp_path / "outputs"
    shutil.copytree(local_text_dir(outputs, text[1], "minilm-wordpiece", "ctx64"),
                    local_text_dir(elsewhere, text[1], "bpe320", "ctx64"))
    _no_model_loads(monkeypatch)
    with pytest.raises(DataError, match="does not share") as err:
        run(_config(elsewhere, *TINY, *text, f"checkpoint={chat}"))
    assert "task=prepare dataset=local_text model=modernbert_tiny context=ctx64" in str(err.value)


@pytest.mark.slow
def test_the_last_training_evaluation_equals_task_evaluate_on_its_export(exports):
    from ldm.tasks.evaluate import run

    outputs, _, _, corpus = exports
    text = [*TINY, "dataset=local_text", f"dataset.paths=[{corpus}/*.txt]"]
    proc = run_cli(["task=pretrain", *text, "task.max_steps=2", "task.global_batch_size=4",
                    "hardware.micro_batch_size=4", "task.eval_batches=2", "task.eval_every=0",
                    "task.save_every=0", "run_name=agree"], outputs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = next(r for r in find_runs(local_store_uri(outputs), "pretrain")
                   if r.info.run_name == "agree").data.metrics["eval_nelbo"]
    # the same 8 held-out rows, in batches of 3 instead of 4; t strata and masks by default
    evaluated = run(_config(outputs, *text, f"checkpoint={outputs / 'models' / 'agree'}",
                            "task.max_rows=8", "task.batch_size=3", "run_name=agree-eval"))
    assert evaluated == pytest.approx(trained, rel=1e-5)
