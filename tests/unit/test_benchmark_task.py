"""task=benchmark and `lm_eval --model ldm` end to end on tiny exports; suite validation.

Layer: unit by count, suite validation and the synthetic suite in-process; the slow tests build
exports and run `run.py task=benchmark` and `lm_eval` as processes (the adapter and its ELBO:
test_benchmark_adapter.py, test_benchmark_elbo.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import REPO, compose_config, run_cli, write_corpus
from ldm.errors import ConfigError, HubUnavailableError

TINY = ["model=modernbert_tiny", "model.vocab_size=320", "model.arch.hidden_size=48",
        "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=2",
        "model.arch.intermediate_size=96", "model.max_positions=128", "context=ctx64"]
CHAT = ["dataset=synthetic_tasks", "dataset.max_documents=240", "dataset.task_types=[copy,max]"]
SMALL = ["benchmark.max_items=10", "benchmark.mc_num=2", "benchmark.context_words=16",
         "benchmark.continuation_words=4"]
SAMPLER = ["sampler.max_new_tokens=8", "sampler.block_length=8"]


def _prepare(outputs, *overrides):
    from ldm.tasks import prepare as task

    task.run(compose_config(["task=prepare", "tracking=off", *overrides], outputs=outputs))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(outputs, text overrides, pretraining export, SFT export), text and chat data prepared."""
    root = tmp_path_factory.mktemp("benchmark")
    corpus = write_corpus(root / "corpus", n_docs=12, words=200)
    outputs = root / "outputs"
    text = [*TINY, "dataset=local_text", f"dataset.paths=[{corpus}/*.txt]"]
    _prepare(outputs, *text, "dataset.test_split_pct=0.25")
    proc = run_cli(["task=pretrain", *text, "task.max_steps=1", "task.global_batch_size=4",
                    "hardware.micro_batch_size=4", "task.eval_batches=1", "run_name=base",
                    "tracking=off"], outputs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = outputs / "models" / "base"
    _prepare(outputs, *TINY, *CHAT, f"init_from={base}")
    proc = run_cli(["task=sft", *TINY, *CHAT, f"init_from={base}", "task.max_steps=2",
                    "task.global_batch_size=8", "hardware.micro_batch_size=8", "task.eval_every=0",
                    "task.eval_batches=1", "task.eval_samples=0", "task.save_every=0",
                    "tracking=off", "run_name=chat"], outputs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outputs, text, base, outputs / "models" / "chat"


@pytest.fixture(scope="module")
def offline_run(world):
    """task=benchmark benchmark=offline on the pretraining export, tracked in a local mlflow."""
    outputs, text, base, _ = world
    proc = run_cli(["task=benchmark", *text, *SMALL, f"checkpoint={base}", "run_name=offline"],
                   outputs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outputs / "runs" / "benchmark" / "offline", proc.stdout


@pytest.mark.slow
def test_offline_suite_logs_every_task_metric_to_mlflow_and_writes_the_results_json(world,
                                                                                   offline_run):
    from mlflow.tracking import MlflowClient

    from ldm.tracking import local_store_uri

    outputs = world[0]
    folder, stdout = offline_run
    results = json.loads((folder / "results.json").read_text())
    assert set(results["results"]) == {"ldm_cloze", "ldm_choice"}
    assert results["results"]["ldm_choice"]["acc,none"] >= 0
    assert "ldm_cloze" in stdout and "lm_eval --model ldm" in stdout
    client = MlflowClient(tracking_uri=local_store_uri(str(outputs)))
    (run,) = client.search_runs([client.get_experiment_by_name("benchmark").experiment_id])
    metrics = run.data.metrics
    for key in ("ldm_cloze.acc", "ldm_cloze.perplexity", "ldm_choice.acc", "ldm_choice.acc_norm",
                "seconds_per_loglikelihood"):
        assert key in metrics, sorted(metrics)
    assert metrics["ldm_choice.acc"] == results["results"]["ldm_choice"]["acc,none"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "benchmark")}
    assert "benchmark/results.json" in artifacts and "benchmark/samples" in artifacts


@pytest.mark.slow
def test_lm_eval_command_line_with_model_ldm_gives_the_same_numbers(world, offline_run, tmp_path):
    _, _, base, _ = world
    folder, _ = offline_run
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "ldm", "--model_args",
         f"pretrained={base},mc_num=2", "--tasks", "ldm_cloze", "--include_path",
         str(folder / "tasks"), "--batch_size", "7", "--output_path", str(tmp_path / "out")],
        cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ldm_cloze" in proc.stdout and "perplexity" in proc.stdout
    (written,) = list((tmp_path / "out").rglob("results_*.json"))
    theirs = json.loads(written.read_text())["results"]["ldm_cloze"]
    ours = json.loads((folder / "results.json").read_text())["results"]["ldm_cloze"]
    # another batch size, another process: the same estimates
    assert theirs["perplexity,none"] == pytest.approx(ours["perplexity,none"], rel=1e-6)
    assert theirs["acc,none"] == ours["acc,none"]


@pytest.mark.slow
def test_synthetic_suite_gives_the_answers_and_exact_match_of_task_evaluate(world):
    from ldm.tasks import benchmark, evaluate

    outputs, _, _, chat = world
    common = [*TINY, *CHAT, *SAMPLER, f"checkpoint={chat}", "tracking=off"]
    evaluate.run(compose_config(["task=evaluate", *common, "task.max_examples=6",
                                 "task.max_rows=4", "task.t_grid=2", "task.mc_samples=1",
                                 "run_name=ev"], outputs=outputs))
    got = benchmark.run(compose_config(["task=benchmark", *common, "benchmark=synthetic",
                                        "benchmark.max_items=6", "run_name=bm"],
                                       outputs=outputs))
    ev_folder = outputs / "runs" / "evaluate" / "ev" / "eval"
    records = [json.loads(x) for x in (ev_folder / "results.jsonl").read_text().splitlines()]
    bm_folder = outputs / "runs" / "benchmark" / "bm"
    samples = [json.loads(x) for x in
               (bm_folder / "samples_ldm_synthetic.jsonl").read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    assert len(records) == len(samples) == 6
    assert [s["doc"]["answer"] for s in samples] == [r["reference"] for r in records]
    assert [s["resps"][0][0] for s in samples] == [r["answer"] for r in records]
    metrics = json.loads((ev_folder / "metrics.json").read_text())
    assert got == pytest.approx(metrics["exact_match"])


def _config(*overrides):
    return compose_config(["task=benchmark", "tracking=off", *overrides])


@pytest.mark.parametrize("suite", ["bert_chat", "llada_base"])
def test_hub_suite_offline_fails_within_seconds_naming_the_offline_suites(suite, monkeypatch,
                                                                          tmp_path):
    from ldm import hub
    from ldm.tasks import benchmark

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_reachable.cache_clear()
    began = time.monotonic()
    with pytest.raises(HubUnavailableError, match="benchmark=offline"):
        benchmark.run(_config(f"benchmark={suite}", f"checkpoint={tmp_path}"))
    assert time.monotonic() - began < 60  # no network wait: the probe answers at once offline
    hub.hub_reachable.cache_clear()


@pytest.mark.parametrize("overrides, message", [
    (["benchmark.tasks=[squad]"], "unknown offline task 'squad'"),
    (["benchmark.tasks=[]"], "benchmark.tasks is empty"),
    (["benchmark.mc_num=0"], "mc_num=0"),
    (["benchmark.limit=0"], "benchmark.limit=0"),
    (["+benchmark.num_fewshot.piqa=5"], "'piqa'"),
    (["dataset=construction_faq"], "chat data"),
    (["benchmark=synthetic"], "dataset=synthetic_tasks"),
    (["sampler.block_length=5"], "block_length=5"),
])
def test_bad_suite_settings_are_refused_before_anything_loads(overrides, message):
    from ldm.tasks.benchmark import check_suite_data, validate

    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        cfg = _config(*overrides)
        validate(cfg)
        check_suite_data(cfg)


def test_every_benchmark_option_composes_and_names_its_tasks():
    for suite in ("offline", "synthetic", "bert_chat", "llada_base"):
        cfg = _config(f"benchmark={suite}")
        assert cfg.benchmark.name == suite and len(cfg.benchmark.tasks) >= 1
    assert list(_config().benchmark.tasks) == ["cloze", "choice"]


# dLLM's examples/bert/eval.sh: the chat template on every task; generation 256 new tokens in 256
# steps, blocks of 32, low-confidence remasking, temperature 0; likelihood with mc_num 32
DLLM_BERT_EVAL = {"gsm8k": 0, "bbh": 3, "minerva_math": 4, "mmlu": 5, "ceval-valid": 5,
                  "cmmlu": 5, "winogrande": 5, "hellaswag": 0}


def test_bert_chat_suite_holds_dllms_bert_evaluation_settings():
    from ldm.harness.generation import sampler_settings
    from ldm.tasks.benchmark import suite_sampler, validate

    cfg = _config("benchmark=bert_chat", "sampler=fast")  # the suite's own sampler wins
    assert dict(cfg.benchmark.num_fewshot) == DLLM_BERT_EVAL
    assert list(cfg.benchmark.tasks) == list(DLLM_BERT_EVAL)
    assert cfg.benchmark.chat is True and cfg.benchmark.mc_num == 32
    overrides = validate(cfg)
    settings = sampler_settings(suite_sampler(cfg), overrides)
    assert suite_sampler(cfg) == "llada"
    assert (settings.max_new_tokens, settings.steps, settings.block_length) == (256, 256, 32)
    assert settings.remasking == "low_confidence" and settings.temperature == 0.0
    assert settings.threshold is None  # one token per step, as dLLM's sampler
    fast = _config("benchmark=bert_chat_fast")
    assert dict(fast.benchmark.num_fewshot) == DLLM_BERT_EVAL and fast.benchmark.chat is True
    quick = sampler_settings(suite_sampler(fast), validate(fast))
    assert suite_sampler(fast) == "fast" and quick.threshold is not None
    assert (quick.max_new_tokens, quick.block_length) == (256, 32)


def test_a_suite_generation_setting_that_is_no_sampler_field_is_refused():
    from ldm.tasks.benchmark import validate

    with pytest.raises(ConfigError, match="benchmark.generation.beam_width is not a sampler"):
        validate(_config("benchmark=bert_chat", "+benchmark.generation.beam_width=4"))


@pytest.mark.slow
def test_lm_eval_local_chat_completions_against_the_api_scores_task_evaluates_exact_match(
        world, tmp_path):
    # lm-eval's own OpenAI-style chat model, pointed at task=serve's API, runs the synthetic
    # suite; its answers and exact match are task=evaluate's on the same prompts and settings.
    pytest.importorskip("gradio")
    from test_serve import free_port

    from ldm.export import read_export
    from ldm.sampling import sampler_model
    from ldm.sampling.decode import chat_banned_ids
    from ldm.serve.api import ChatApi, Running, build_api
    from ldm.serve.batcher import Batcher
    from ldm.serve.settings import load_presets
    from ldm.tasks import benchmark, evaluate

    outputs, _, _, chat = world
    common = [*TINY, *CHAT, *SAMPLER, f"checkpoint={chat}", "tracking=off"]
    evaluate.run(compose_config(["task=evaluate", *common, "task.max_examples=6",
                                 "task.max_rows=4", "task.t_grid=2", "task.mc_samples=1",
                                 "run_name=ev-api"], outputs=outputs))
    benchmark.run(compose_config(["task=benchmark", *common, "benchmark=synthetic",
                                  "benchmark.max_items=6", "run_name=bm-api"], outputs=outputs))
    export = read_export(str(chat))
    tok = export.load_tokenizer()
    model = export.load_model()
    presets = load_presets(REPO / "conf" / "sampler")
    presets["llada"].max_new_tokens, presets["llada"].block_length = 8, 8  # as SAMPLER
    batcher = Batcher(sampler_model(model), tok, mask_id=export.mask_id,
                      special_ids=chat_banned_ids(tok, model.config.vocab_size))
    port = free_port()
    server = Running(build_api(ChatApi(batcher, tok, presets, "llada", model_id="chat",
                                       max_positions=export.max_positions,
                                       model_fn=sampler_model(model))), "127.0.0.1", port)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "local-chat-completions",
             "--model_args", f"model=chat,base_url=http://127.0.0.1:{port}/v1/chat/completions,"
             "num_concurrent=3,max_retries=1,tokenizer_backend=none",
             "--tasks", "ldm_synthetic", "--include_path",
             str(outputs / "runs" / "benchmark" / "bm-api" / "tasks"), "--apply_chat_template",
             "--log_samples", "--output_path", str(tmp_path / "out")],
            cwd=str(REPO), capture_output=True, text=True, timeout=600,
            env={**__import__("os").environ, "OPENAI_API_KEY": "none"})
    finally:
        server.close()
        batcher.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (outputs / "runs" / "evaluate" / "ev-api" / "eval" /
                                       "results.jsonl").read_text().splitlines()]
    (written,) = list((tmp_path / "out").rglob("samples_ldm_synthetic_*.jsonl"))
    samples = sorted((json.loads(x) for x in written.read_text().splitlines()),
                     key=lambda s: s["doc_id"])
    assert [s["doc"]["answer"] for s in samples] == [r["reference"] for r in records]
    assert [s["resps"][0][0].strip() for s in samples] == [r["answer"] for r in records]
    (results,) = list((tmp_path / "out").rglob("results_*.json"))
    theirs = json.loads(results.read_text())["results"]["ldm_synthetic"]["exact_match,none"]
    metrics = json.loads((outputs / "runs" / "evaluate" / "ev-api" / "eval" /
                          "metrics.json").read_text())
    assert theirs == pytest.approx(metrics["exact_match"])
    assert batcher.stats["largest"] > 1  # lm-eval's concurrent requests shared canvases
