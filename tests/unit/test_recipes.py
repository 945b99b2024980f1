"""Recipes: hub chat data by schema and slice, weighted mixtures, the experiment presets, gpu_check.

Hub data sets are mimicked by local copies laid out as the hub serves them (a folder of parquet
shards, or one JSONL file), read through the same `load_dataset` path as a hub id.

Layer: unit, loaders, mixtures and presets in-process; a few tests run `run.py` or
benchmarks/gpu_check.py as processes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONF, REPO, compose_config, run_cli
from ldm.data import mixture
from ldm.data.chat_sources import open_chat_source
from ldm.data.hub_sets import parse_split
from ldm.errors import ConfigError, DataError
from ldm.tasks import launch
from ldm.tasks.chain import stage_commands
from ldm.train.data import check_batch_layout, resolve_accumulation

TULU_LIKE = [
    {"id": f"t{i}", "source": "tulu",
     "messages": [{"role": "system", "content": "You are a careful assistant."},
                  {"role": "user", "content": f"What is {i} plus one?"},
                  {"role": "assistant", "content": f"{i + 1}."}]}
    for i in range(30)]
SHAREGPT_LIKE = [{"conversations": [{"from": "system", "value": "Be brief."},
                                    {"from": "human", "value": f"Say {i}."},
                                    {"from": "gpt", "value": f"{i}"}]} for i in range(20)]
ALPACA_LIKE = [{"instruction": f"Repeat {i}", "input": "twice" if i % 2 else "",
                "output": f"{i} {i}"} for i in range(20)]


def parquet_folder(folder: Path, rows: list) -> Path:
    """Write rows as a hub-style folder of one parquet shard; return the folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000-of-00001.parquet")
    return folder


def jsonl_file(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hub_rows(path, split="train", streaming=False):
    source, desc = open_chat_source("hub", hub=[{"path": str(path), "split": split}],
                                    streaming=streaming)
    return list(source()), desc


# --- dataset=hf_chat ---------------------------------------------------------------------------

def test_hub_messages_with_system_turns_keep_every_role(tmp_path, offline):
    convs, desc = hub_rows(parquet_folder(tmp_path / "tulu", TULU_LIKE))
    assert len(convs) == 30 and desc["source"] == "hub"
    assert [m["role"] for m in convs[3]] == ["system", "user", "assistant"]
    assert convs[3][0]["content"] == "You are a careful assistant." and convs[3][2]["content"] == "4."


def test_hub_sharegpt_and_alpaca_columns_are_detected_like_local_files(tmp_path, offline):
    share, _ = hub_rows(jsonl_file(tmp_path / "share.jsonl", SHAREGPT_LIKE))
    assert share[5] == [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Say 5."}, {"role": "assistant", "content": "5"}]
    alpaca, _ = hub_rows(parquet_folder(tmp_path / "alpaca", ALPACA_LIKE))
    assert alpaca[1] == [{"role": "user", "content": "Repeat 1\n\ntwice"},
                         {"role": "assistant", "content": "1 1"}]


@pytest.mark.parametrize("streaming", [False, True])
def test_split_slices_select_the_same_rows_streaming_or_not(tmp_path, offline, streaming):
    folder = parquet_folder(tmp_path / "tulu", TULU_LIKE)
    first, _ = hub_rows(folder, "train[:7]", streaming)
    middle, _ = hub_rows(folder, "train[10:13]", streaming)
    assert len(first) == 7 and first[0][1]["content"] == "What is 0 plus one?"
    assert [c[1]["content"] for c in middle] == [f"What is {i} plus one?" for i in (10, 11, 12)]


@pytest.mark.parametrize("split,needle", [("train[:", "not a split name"),
                                          ("train[5:2]", "selects no rows"),
                                          ("train[-3:]", "negative")])
def test_malformed_split_slices_are_config_errors(split, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_split(split)


def test_percent_slices_are_refused_when_streaming():
    assert parse_split("train[:10%]") == ("train", None, None)
    with pytest.raises(ConfigError, match="percent slice"):
        parse_split("train[:10%]", streaming=True)


def test_hub_data_without_a_chat_column_lists_the_columns_it_found(tmp_path, offline):
    folder = parquet_folder(tmp_path / "qa", [{"question": "a", "reply": "b", "lang": "en"}])
    with pytest.raises(DataError, match="has columns question, reply, lang, in none of the chat"):
        open_chat_source("hub", hub=[{"path": str(folder)}])


def test_hub_id_offline_fails_fast_naming_the_offline_datasets(offline):
    started = time.monotonic()
    with pytest.raises(Exception, match="allenai/tulu-3-sft-mixture needs the Hugging Face hub"
                                        ".*dataset=construction_faq"):
        open_chat_source("hub", hub=[{"path": "allenai/tulu-3-sft-mixture"}])
    assert time.monotonic() - started < 10


# --- weighted mixtures -------------------------------------------------------------------------

def counting_source(name: str, n: int):
    return lambda: iter(f"{name}{i}" for i in range(n))


def test_mixture_realises_its_weights_and_is_reproducible_from_its_seed():
    sizes = {"a": 6000, "b": 6000, "c": 6000}
    mix = mixture.Mixture(list(sizes), [counting_source(k, n) for k, n in sizes.items()],
                          [3.0, 1.0, 1.0], seed=7)
    items = list(mix())
    real = mix.realised()
    assert real["exhausted"] == ["a"]  # the heaviest source runs out first and ends the mixture
    for name, target in zip(sizes, (0.6, 0.2, 0.2)):
        st = real["sources"][name]
        assert st["target"] == pytest.approx(target)
        assert abs(st["proportion"] - target) < 0.02, (name, st)
    assert sum(st["examples"] for st in real["sources"].values()) == len(items) == real["examples"]
    assert list(mix()) == items  # same seed, same stream; counts reset on each pass
    assert mixture.Mixture(list(sizes), [counting_source(k, n) for k, n in sizes.items()],
                           [3.0, 1.0, 1.0], seed=8)() != items


def test_all_used_mixture_yields_every_example_of_every_source_once():
    mix = mixture.Mixture(["a", "b"], [counting_source("a", 50), counting_source("b", 500)],
                          [1.0, 1.0], seed=0, stop="all_used")
    items = list(mix())
    assert sorted(items) == sorted([f"a{i}" for i in range(50)] + [f"b{i}" for i in range(500)])
    assert items.index("a49") < len(items) - 300  # interleaved, not concatenated


def test_zero_weight_source_is_not_drawn():
    mix = mixture.Mixture(["a", "b"], [counting_source("a", 10), counting_source("b", 10)],
                          [1.0, 0.0], seed=0)
    assert list(mix()) == [f"a{i}" for i in range(10)]


@pytest.mark.parametrize("entries,needle", [
    ([{"source": "construction_faq", "weight": -0.5}], "weight=-0.5 is negative"),
    ([{"source": "construction_faq", "weight": 0}, {"source": "local", "paths": ["x"], "weight": 0}],
     "every dataset.mixture weight is 0"),
    ([{"source": "wikipedia"}], "source='wikipedia' is not a chat source; accepted: hub, local"),
    ([{"source": "construction_faq", "weight": "lots"}], "not a finite number"),
    ([{"source": "construction_faq", "wieght": 1}], "unknown key(s) wieght"),
    ([{"source": "hub"}], "hub source without a path"),
    ([{"source": "synthetic_tasks"}], "without max_documents"),
    ([], "dataset.mixture is empty"),
])
def test_bad_mixture_entries_are_refused_naming_the_entry(entries, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        mixture.components(entries, "chat")


def test_text_mixture_accepts_only_text_sources():
    with pytest.raises(ConfigError, match="not a text source; accepted: hub, local, shakespeare"):
        mixture.components([{"source": "construction_faq"}], "text")


def test_chat_mixture_prepares_with_realised_shares_in_manifest_and_mlflow(tmp_path, offline):
    from ldm.runs import find_runs
    from ldm.tracking import local_store_uri

    hub_like = parquet_folder(tmp_path / "tulu", TULU_LIKE * 20)  # 600 rows
    share = jsonl_file(tmp_path / "share.jsonl", SHAREGPT_LIKE * 30)  # 600 rows
    outputs = tmp_path / "outputs"
    mix = (f"dataset.mixture=[{{source: hub, path: {hub_like}, weight: 2}}, "
           f"{{source: local, paths: [{share}], weight: 1}}, "
           "{source: synthetic_tasks, max_documents: 400, task_types: [copy], weight: 1}]")
    proc = run_cli(["task=prepare", "dataset=mixture_chat", mix, "model=minilm", "context=ctx64",
                    "dataset.test_split_pct=0.1", "run_name=mixed"], outputs)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(next((outputs / "data").rglob("manifest.json")).read_text())
    real = manifest["mixture"]
    assert real["examples"] == manifest["counts"]["examples"] > 0
    assert real["exhausted"] == [f"hub:{hub_like}"]  # 600 rows at half the draws: first to run out
    targets = {f"hub:{hub_like}": 0.5, "local:share.jsonl": 0.25, "synthetic_tasks": 0.25}
    for name, target in targets.items():
        assert abs(real["sources"][name]["proportion"] - target) < 0.05, (name, real)
    assert [m["weight"] for m in manifest["source"]["mixture"]] == [2.0, 1.0, 1.0]
    assert "realised" in proc.stdout
    from ldm.data.identity import differences
    from ldm.tasks.prepared import source_description

    named = source_description(compose_config(["dataset=mixture_chat", mix]))
    assert differences(named, manifest["source"]) is None  # a later run names the same sources
    reweighted = source_description(compose_config(["dataset=mixture_chat", mix.replace("weight: 2", "weight: 5")]))
    assert differences(reweighted, manifest["source"]) == "mixture.0.weight=5.0, not 2.0"
    run = find_runs(local_store_uri(outputs), "prepare")[0]
    metric = f"mixture.hub_{mixture.metric_name(str(hub_like))}.proportion"
    assert run.data.metrics[metric] == pytest.approx(real["sources"][f"hub:{hub_like}"]["proportion"])


def test_text_mixture_prepares_documents_by_weight(tmp_path, make_config):
    from conftest import write_corpus
    from ldm.tasks import prepare
    from ldm.tasks.prepared import prepared_data_dir

    small = write_corpus(tmp_path / "a", n_docs=30, words=60, seed=1)
    large = write_corpus(tmp_path / "b", n_docs=30, words=60, seed=2)
    cfg = make_config("task=prepare", "dataset=mixture_text", "model=minilm", "context=ctx64",
                      "tracking=off", "dataset.test_split_pct=0.2", "dataset.mixture_stop=all_used",
                      f"dataset.mixture=[{{source: local, paths: ['{small}/*.txt'], weight: 1}}, "
                      f"{{source: local, paths: ['{large}/*.txt'], weight: 3}}]")
    prepare.run(cfg)
    manifest = json.loads((prepared_data_dir(cfg) / "manifest.json").read_text())
    real = manifest["mixture"]
    assert real["examples"] == 60 == sum(manifest["splits"][s]["documents"] for s in ("train", "test"))
    assert [st["examples"] for st in real["sources"].values()] == [30, 30]  # all_used: each once
    assert list(real["sources"]) == ["local:*.txt", "local:*.txt#2"]


# --- experiments ---------------------------------------------------------------------------------

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def training_configs(name: str) -> list:
    """Return the composed configs of an experiment: itself, or each stage of a chain."""
    cfg = compose_config([f"experiment={name}"])
    if cfg.task.name != "chain":
        return [("", cfg)]
    return [(stage, compose_config(args[2:])) for stage, args in stage_commands(cfg).items()]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_and_stage_composes_with_a_consistent_batch_layout(name):
    for stage, cfg in training_configs(name):
        OmegaConf.to_container(cfg, resolve=True)
        if cfg.task.name in ("pretrain", "sft"):
            hw = cfg.hardware
            check_batch_layout(cfg.task.global_batch_size, hw.micro_batch_size,
                               resolve_accumulation(hw.gradient_accumulation_steps,
                                                    cfg.task.global_batch_size,
                                                    hw.micro_batch_size, hw.num_processes),
                               hw.num_processes)
            assert cfg.context.length <= cfg.model.max_positions, (name, stage)
            assert (cfg.dataset.kind == "chat") == (cfg.task.name == "sft"), (name, stage)


@pytest.mark.parametrize("name,model,hardware", [("bert_chat_large", "ModernBERT-large", "deepspeed_zero2"),
                                                 ("bert_chat_base", "ModernBERT-base", "h100x8_ddp")])
def test_bert_chat_presets_are_dllms_recipe(name, model, hardware):
    cfg = compose_config([f"experiment={name}"])
    assert cfg.task.name == "sft" and cfg.init_from == f"answerdotai/{model}"
    assert cfg.context.length == 1024 and cfg.task.epochs == 10 and cfg.task.lr == 1e-4
    assert cfg.hardware.name == hardware and cfg.hardware.num_processes == 8
    assert cfg.task.global_batch_size == 384 == 8 * cfg.hardware.micro_batch_size
    assert [m["path"] for m in cfg.dataset.mixture] == ["allenai/tulu-3-sft-mixture",
                                                        "HuggingFaceTB/smoltalk"]
    assert cfg.dataset.mixture_stop == "all_used"
    # dLLM's objective and data layout: its loss normalisation, rows padded per batch with a
    # trained EOS, length-grouped batches
    assert cfg.masking.normalizer == "maskable" and cfg.dataset.padding == "batch"


def test_seed_pretrain_then_chat_finetunes_the_pretraining_export_like_bert_chat():
    stages = dict(training_configs("seed_pretrain_then_chat"))
    pretrain, sft = stages["pretrain"], stages["sft"]
    recipe = compose_config(["experiment=bert_chat_large"])
    assert pretrain.run_name == "seed_modernbert_large" and pretrain.dataset.name == "fineweb_wiki"
    assert sft.init_from == str(Path(pretrain.paths.models) / pretrain.run_name)
    for key in ("task.lr", "task.epochs", "task.global_batch_size", "dataset.name", "context.length"):
        assert OmegaConf.select(sft, key) == OmegaConf.select(recipe, key), key
    assert stages["prepare_chat"].init_from == sft.init_from
    assert stages["evaluate"].checkpoint == str(Path(sft.paths.models) / sft.run_name)


OFFLINE = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}


@pytest.mark.parametrize("args,needle,offline_hint", [
    (["experiment=bert_chat_large"], "init_from=answerdotai/ModernBERT-large", "model=minilm"),
    pytest.param(["experiment=bert_chat_base"], "init_from=answerdotai/ModernBERT-base",
                 "model=minilm", marks=pytest.mark.slow),
    (["task=prepare", "dataset=tulu3_smoltalk", "model=modernbert_large", "context=ctx1024"],
     "dataset allenai/tulu-3-sft-mixture", "dataset=construction_faq"),
])
def test_bert_chat_commands_offline_fail_only_at_the_hub_within_seconds(args, needle, offline_hint,
                                                                        tmp_path):
    started = time.monotonic()
    proc = run_cli([*args, "tracking=off"], tmp_path,
                   env_extra={**OFFLINE, "HF_HOME": str(tmp_path / "hf")})
    assert time.monotonic() - started < 60
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in lines[0] and "needs the Hugging Face hub" in lines[0]
    assert offline_hint in lines[0]
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()


@pytest.mark.slow
def test_seed_pretrain_then_chat_offline_stops_at_its_first_hub_stage(tmp_path):
    proc = run_cli(["experiment=seed_pretrain_then_chat", "tracking=off"], tmp_path,
                   env_extra={**OFFLINE, "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2
    assert "dataset HuggingFaceFW/fineweb needs the Hugging Face hub" in proc.stderr
    assert "stage 'prepare_text' failed" in proc.stderr and "Traceback" not in proc.stderr


# --- epochs and the process launch -------------------------------------------------------------

def test_epochs_and_warmup_ratio_become_steps_from_the_train_split_size():
    cfg = compose_config(["experiment=bert_chat_large"])
    launch.resolve_schedule(cfg, 1_000_000)
    assert cfg.task.max_steps == math.ceil(10 * 1_000_000 / 384) == 26042
    assert cfg.task.warmup_steps == 2604
    with pytest.raises(ConfigError, match="task.epochs=0"):
        launch.resolve_schedule(compose_config(["task=sft", "task.epochs=0"]), 10)


def test_a_multi_process_layout_started_as_one_process_is_relaunched_with_its_preset(monkeypatch):
    for name in launch.LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    cfg = compose_config(["experiment=bert_chat_large"])
    assert launch.needs_launch(cfg)
    cmd = launch.launch_command(cfg, ["experiment=bert_chat_large"])
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(REPO / "accelerate_configs/deepspeed_zero2.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "8" and cmd[-1] == "experiment=bert_chat_large"
    cpu = compose_config(["task=pretrain", "hardware=cpu", "hardware.num_processes=2"])
    assert launch.launch_command(cpu, [])[1:6] == ["-m", "torch.distributed.run", "--standalone",
                                                   "--nproc_per_node", "2"]
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert not launch.needs_launch(cfg)
    assert not launch.needs_launch(compose_config(["task=pretrain"]))


@pytest.mark.slow
def test_plain_python_run_starts_the_two_process_layout_itself(tmp_path):
    from conftest import prepare_tiny_text

    tiny = ["model=modernbert_tiny", "model.vocab_size=320", "model.arch.hidden_size=32",
            "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=2",
            "model.arch.intermediate_size=64", "model.max_positions=128", "context=ctx64",
            "dataset=local_text"]
    outputs, paths = prepare_tiny_text(tmp_path, tiny)
    proc = run_cli(["task=pretrain", *tiny, paths, "hardware.num_processes=2",
                    "hardware.micro_batch_size=2", "task.global_batch_size=4", "task.max_steps=2",
                    "task.eval_every=0", "task.eval_batches=1", "task.save_every=0",
                    "tracking=off", "run_name=two"], outputs, env_extra={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runs 2 processes; starting:" in proc.stdout and "torch.distributed.run" in proc.stdout
    assert (outputs / "models" / "two" / "model.safetensors").is_file()


# --- the GPU check -----------------------------------------------------------------------------

def test_gpu_check_cpu_smoke_records_every_figure(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    training, sampling = figures["training"], figures["sampling"]
    assert training["tokens_per_second"] > 0 and training["steps"] >= 5
    assert training["seconds_per_step"]["min"] <= training["seconds_per_step"]["median"]
    assert 0 < figures["mfu_measured"] < 1.5 and figures["mfu_target"] == 0.4
    assert sampling["settings"]["threshold"] == 0.9  # the fast preset, read from its config
    dual = figures["sampling_fast_dual"]
    assert dual["settings"]["cache"] == "dual" and sampling["settings"]["cache"] == "none"
    assert dual["tokens_per_second"] > 0 and figures["dual_speedup"] > 0
    spread = figures["device"]["measured_matmul_spread"]
    assert spread["min"] <= figures["device"]["measured_matmul"] <= spread["max"]
    assert sampling["tokens_per_second"] > 0 and sampling["model_calls"] >= 1
    assert "skipped" in figures["lm_eval"] or figures["lm_eval"]["loglikelihood"]["seconds_per_item"] > 0
    assert "training:" in proc.stdout and "sampling (fast," in proc.stdout
    assert "sampling (fast_dual," in proc.stdout and "fast_dual (dual KV cache) vs fast" in proc.stdout
