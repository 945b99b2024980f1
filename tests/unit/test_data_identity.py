"""Prepared data is identified by its sources: other files never share a folder or train silently."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import compose_config, write_corpus
from ldm.errors import DataError

TINY = ["model=modernbert_tiny", "model.vocab_size=320", "model.max_positions=128", "context=ctx64"]


def text_config(outputs: Path, pattern: str, *extra: str):
    return compose_config(["task=prepare", *TINY, "dataset=local_text", f"dataset.paths=[{pattern}]",
                           "dataset.test_split_pct=0.25", "tracking=off", *extra], outputs=outputs)


def prepare(cfg):
    from ldm.tasks import prepare as task
    from ldm.tasks.prepared import prepared_data_dir

    task.run(cfg)
    return prepared_data_dir(cfg)


def train_config(outputs: Path, pattern: str, *extra: str):
    return compose_config(["task=pretrain", *TINY, "dataset=local_text", f"dataset.paths=[{pattern}]",
                           "task.max_steps=1", "task.global_batch_size=2",
                           "hardware.micro_batch_size=2", "tracking=off", *extra], outputs=outputs)


@pytest.fixture
def two_corpora(tmp_path):
    austen = write_corpus(tmp_path / "austen", n_docs=8, words=200, seed=1)
    other = write_corpus(tmp_path / "other", n_docs=8, words=200, seed=2)
    return tmp_path / "outputs", austen, other


def test_two_prepares_of_different_files_never_share_a_folder(two_corpora):
    outputs, austen, other = two_corpora
    first = prepare(text_config(outputs, f"{austen}/*.txt"))
    stamp = (first / "manifest.json").stat().st_mtime_ns
    second = prepare(text_config(outputs, f"{other}/*.txt"))
    assert first != second and first.parent.parent.name.startswith("local_text-")
    assert (first / "manifest.json").stat().st_mtime_ns == stamp  # the first is untouched
    sources = [json.loads((d / "manifest.json").read_text())["source"]["files"]
               for d in (first, second)]
    assert {Path(f["path"]).parent for f in sources[0]} == {austen.resolve()}
    assert {Path(f["path"]).parent for f in sources[1]} == {other.resolve()}


def test_training_on_files_that_were_never_prepared_refuses_naming_both(two_corpora):
    from ldm.tasks.train_common import check_training

    outputs, austen, other = two_corpora
    prepare(text_config(outputs, f"{austen}/*.txt"))
    with pytest.raises(DataError) as err:
        check_training(train_config(outputs, f"{other}/doc000.txt"), "text")
    line = str(err.value)
    assert "\n" not in line
    assert str(other.resolve() / "doc000.txt") in line and str(austen.resolve()) in line
    assert "task=prepare dataset=local_text" in line and f"dataset.paths=[{other}/doc000.txt]" in line


def test_training_on_a_file_changed_since_it_was_prepared_refuses(two_corpora):
    from ldm.tasks.train_common import check_training

    outputs, austen, _ = two_corpora
    prepare(text_config(outputs, f"{austen}/*.txt"))
    check_training(train_config(outputs, f"{austen}/*.txt"), "text")  # same files: fine
    changed = austen / "doc003.txt"
    changed.write_text(changed.read_text() + " and a new ending.\n")
    with pytest.raises(DataError, match=r"doc003\.txt changed since it was prepared"):
        check_training(train_config(outputs, f"{austen}/*.txt"), "text")


def test_a_directory_in_dataset_paths_is_named_as_a_folder_not_as_missing(two_corpora):
    from ldm.data.sources import resolve_local_paths

    _, austen, _ = two_corpora
    with pytest.raises(DataError, match=r"is a folder; name its files, e.g. '.*austen/\*\.txt'"):
        resolve_local_paths([str(austen)])


def test_evaluate_refuses_sources_that_differ_from_the_prepared_ones(two_corpora):
    from ldm.tasks.prepared import check_prepared_sources, prepared_data_dir
    from ldm.data.store import read_manifest

    outputs, austen, other = two_corpora
    folder = prepare(text_config(outputs, f"{austen}/*.txt"))
    cfg = text_config(outputs, f"{austen}/*.txt", "dataset.txt_unit=paragraph")
    assert prepared_data_dir(cfg) != folder  # another document unit: another folder
    with pytest.raises(DataError, match="txt_unit='paragraph', not 'file'"):
        check_prepared_sources(cfg, folder, read_manifest(folder), "prepare ...")


def test_synthetic_chat_data_of_other_settings_is_refused_before_training(tmp_path):
    from ldm.tasks.train_common import check_training

    outputs = tmp_path / "outputs"
    chat = ["dataset=synthetic_tasks", "dataset.task_types=[copy]"]
    prepare(compose_config(["task=prepare", *TINY, *chat, "dataset.max_documents=60",
                            "tracking=off"], outputs=outputs))
    cfg = compose_config(["task=sft", *TINY, *chat, "dataset.max_documents=90",
                          "task.global_batch_size=2", "hardware.micro_batch_size=2",
                          "tracking=off"], outputs=outputs)
    with pytest.raises(DataError, match="synthetic tasks \\(60 examples.*names synthetic tasks "
                                        "\\(90 examples.*num_examples=90, not 60"):
        check_training(cfg, "chat")


def test_mlflow_records_fingerprint_sources_and_a_dataset_input(two_corpora):
    from mlflow.tracking import MlflowClient

    from ldm.runs import find_runs
    from ldm.tracking import local_store_uri

    outputs, austen, _ = two_corpora
    cfg = text_config(outputs, f"{austen}/*.txt", "tracking=mlflow_local")
    folder = prepare(cfg)
    manifest = json.loads((folder / "manifest.json").read_text())
    run = find_runs(local_store_uri(outputs), "prepare")[0]
    assert run.data.tags["ldm.fingerprint"] == manifest["fingerprint"]
    assert str(austen.resolve()) in run.data.tags["ldm.data_sources"]
    inputs = MlflowClient(local_store_uri(outputs)).get_run(run.info.run_id).inputs.dataset_inputs
    assert [i.dataset.digest for i in inputs] == [manifest["fingerprint"]]
    assert inputs[0].dataset.source == str(folder)
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    listed = json.loads((artifacts / "data" / "sources.json").read_text())["files"]
    assert [f["path"] for f in listed] == [f["path"] for f in manifest["source"]["files"]]


def test_unknown_tokens_are_counted_in_the_manifest_and_warned_about(tmp_path, capsys):
    records = [{"instruction": f"question {i} 你好世界", "output": f"answer {i} 😀🎉 漢字"}
               for i in range(40)]
    data = tmp_path / "cjk.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    cfg = compose_config(["task=prepare", "model=minilm", "context=ctx64", "dataset=local_chat",
                          f"dataset.paths=[{data}]", "tracking=off"], outputs=tmp_path / "outputs")
    folder = prepare(cfg)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["unknown_tokens"] > 0 and manifest["unk_token"] == "[UNK]"
    assert manifest["unknown_tokens"] == sum(s["unknown_tokens"] for s in manifest["splits"].values())
    out = capsys.readouterr()
    assert "warning:" in out.err and "are the unknown token '[UNK]'" in out.err
    assert "unknown" in out.out  # the summary table's column


def test_a_failed_build_leaves_no_empty_data_folders(tmp_path):
    from ldm.data.store import atomic_folder

    final = tmp_path / "data" / "set" / "tok" / "ctx"
    with pytest.raises(RuntimeError):
        with atomic_folder(final):
            raise RuntimeError("broken")
    assert not (tmp_path / "data").exists()
    os.makedirs(final.parent)
    with pytest.raises(RuntimeError):
        with atomic_folder(final):
            raise RuntimeError("broken")
    assert final.parent.is_dir()  # existed before: kept
