"""Sweeps from sweeps/ (sweep=<name>), one parent mlflow run per sweep, task=compare, launchers.

Layer: cli, `run.py` multiruns and task=compare as processes (and parallel jobs in processes);
the sweep files' composition in-process.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, compose_config, run_cli, write_corpus
from ldm.runs import find_runs
from ldm.tracking import Tracker, local_store_uri

SWEEPS = sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml"))
TINY = ["model=modernbert_tiny", "model.vocab_size=320", "model.arch.hidden_size=32",
        "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=2",
        "model.arch.intermediate_size=64", "model.max_positions=128", "context=ctx64",
        "dataset=local_text"]
TRAIN = [*TINY, "task.global_batch_size=4", "hardware.micro_batch_size=4", "task.warmup_steps=1",
         "task.max_steps=2", "task.log_every=1", "task.eval_batches=1", "task.eval_t_grid=2"]


def _error(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_the_three_named_sweeps_exist():
    assert {"lr", "masking", "sampler"} <= set(SWEEPS)


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_file_composes_as_a_multirun_with_sweeper_params(name):
    cfg = compose_config([f"sweep={name}"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert len(cfg.hydra.sweeper.params) >= 1
    for key in cfg.hydra.sweeper.params:
        # every swept key names a config group or a field that exists
        assert key in ("masking", "sampler", "model", "dataset") or cfg.get(key.split(".")[0])


def test_plain_runs_have_no_sweep():
    cfg = compose_config([], return_hydra_config=True)
    assert str(cfg.hydra.mode) != "RunMode.MULTIRUN" and not cfg.hydra.sweeper.params


def test_sweep_file_with_an_unknown_key_is_one_compose_error_without_traceback(tmp_path):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "typo.yaml").write_text(
        "# @package _global_\nhydra:\n  mode: MULTIRUN\n  sweeper:\n    params:\n"
        "      seed: 1,2\ntask:\n  no_such_key: 3\n")
    proc = run_cli(["sweep=typo", f"hydra.searchpath=[file://{tmp_path}]", "tracking=off"],
                   tmp_path / "outputs", timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "no_such_key" in proc.stderr
    unknown = run_cli(["sweep=no_such_sweep", "tracking=off"], tmp_path / "outputs", timeout=120)
    assert unknown.returncode != 0 and "Traceback" not in unknown.stderr
    assert "no_such_sweep" in unknown.stderr and "lr" in unknown.stderr


def test_compare_rejects_an_unknown_run_and_a_run_without_children(tmp_path):
    outputs = tmp_path / "outputs"
    uri = local_store_uri(outputs)
    with Tracker(enabled=True, uri=uri, experiment="prepare", run_name="lonely") as tracker:
        tracker.log_metrics({"x": 1.0})
    unknown = run_cli(["task=compare", "compare_run=no-such-run"], outputs, timeout=120)
    assert unknown.returncode == 2 and "no-such-run" in _error(unknown)
    lonely = run_cli(["task=compare", "compare_run=lonely"], outputs, timeout=120)
    assert lonely.returncode == 2 and "no child runs" in _error(lonely)
    missing = run_cli(["task=compare"], outputs, timeout=120)
    assert missing.returncode == 2 and "compare_run=" in _error(missing)


@pytest.mark.slow
def test_lr_sweep_makes_child_runs_of_one_parent_and_compare_ranks_and_plots_them(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=12, words=200)
    paths = f"dataset.paths=[{corpus}/*.txt]"
    outputs = tmp_path / "outputs"
    prep = run_cli(["task=prepare", *TINY, paths, "dataset.test_split_pct=0.25", "tracking=off"],
                   outputs)
    assert prep.returncode == 0, prep.stderr
    # no -m: the sweep file sets hydra.mode=MULTIRUN; a value list here replaces the file's
    sweep = run_cli(["sweep=lr", *TRAIN, paths, "task.lr=1e-3,3e-2"], outputs)
    assert sweep.returncode == 0, sweep.stderr
    runs = find_runs(local_store_uri(outputs), "pretrain")
    parents = [r for r in runs if r.data.tags.get("ldm.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.params["task.lr"] for c in children} == {"0.001", "0.03"}
    assert all("eval_nelbo" in c.data.metrics for c in children)

    parent = parents[0]
    compare = run_cli(["task=compare", f"compare_run={parent.info.run_name}", "run_name=cmp"],
                      outputs, timeout=120)
    assert compare.returncode == 0, compare.stderr
    table = compare.stdout[compare.stdout.index("rank"):].splitlines()
    assert "task.lr" in table[0] and "eval_nelbo" in table[0] and "run_name" not in table[0]
    values = [float(line.split()[2]) for line in table[2:4]]
    assert values == sorted(values), "best (lowest eval_nelbo) first"
    pngs = list((outputs / "runs" / "compare" / "cmp").glob("*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:4] == b"\x89PNG"
    by_id = run_cli(["task=compare", f"compare_run={parent.info.run_id}", "run_name=cmp2"],
                    outputs, timeout=120)
    assert by_id.returncode == 0, by_id.stderr
    art = Path(parent.info.artifact_uri.removeprefix("file://")) / "compare"
    assert len(list(art.glob("*.png"))) == 1


def _open_child(uri: str, parent: str, index: int) -> None:
    with Tracker(enabled=True, uri=uri, experiment="parallel", run_name=f"job{index}",
                 parent_run_id=parent) as tracker:
        tracker.log_metrics({"value": float(index)})


@pytest.mark.slow
def test_parallel_jobs_on_a_fresh_sqlite_store_lose_no_runs(tmp_path):
    uri = local_store_uri(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    jobs = [ctx.Process(target=_open_child, args=(uri, "p" * 32, i)) for i in range(4)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=240)
        assert job.exitcode == 0
    runs = find_runs(uri, "parallel")
    assert sorted(r.info.run_name for r in runs) == ["job0", "job1", "job2", "job3"]
    assert all(r.data.metrics["value"] == int(r.info.run_name[-1]) for r in runs)


@pytest.mark.slow
def test_four_parallel_jobs_against_an_mlflow_server_are_all_recorded(tmp_path):
    from reliability.test_faults import MlflowServer, free_port

    server = MlflowServer(tmp_path, free_port())
    server.start()
    try:
        corpus = write_corpus(tmp_path / "corpus", n_docs=8, words=100)
        env = dict(os.environ, HF_HUB_DISABLE_TELEMETRY="1")
        env.pop("HYDRA_FULL_ERROR", None)
        procs = []
        for i in range(4):
            args = [sys.executable, str(REPO / "run.py"), "task=prepare", "model=minilm",
                    "context=ctx64", "dataset=local_text", f"dataset.paths=[{corpus}/*.txt]",
                    "dataset.test_split_pct=0.25", f"run_name=par{i}", "tracking=mlflow_server",
                    f"tracking.uri={server.uri}"]
            procs.append(subprocess.Popen(
                args, cwd=REPO, env=dict(env, LDM_OUTPUTS=str(tmp_path / f"out{i}")),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
        runs = find_runs(server.uri, "prepare")
        assert sorted(r.info.run_name for r in runs) == ["par0", "par1", "par2", "par3"]
        assert all(r.info.status == "FINISHED" for r in runs)
    finally:
        server.stop()


@pytest.mark.slow
def test_submitit_local_launcher_runs_the_sweep_jobs_as_child_runs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher is not installed (pip install -e '.[slurm]')")
    corpus = write_corpus(tmp_path / "corpus", n_docs=8, words=100)
    outputs = tmp_path / "outputs"
    proc = run_cli(["-m", "hydra/launcher=submitit_local", "task=prepare", "model=minilm",
                    "dataset=local_text", f"dataset.paths=[{corpus}/*.txt]",
                    "dataset.test_split_pct=0.25", "context=ctx64,ctx128",
                    "run_name=sub-${context.name}", "hydra.launcher.timeout_min=5"], outputs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = find_runs(local_store_uri(outputs), "prepare")
    parents = [r for r in runs if r.data.tags.get("ldm.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and sorted(r.info.run_name for r in children) == ["sub-ctx128",
                                                                               "sub-ctx64"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
