"""experiment=quickstart_smoke runs the whole chain; each stage's output feeds the next; a second
run reuses every finished stage. The chain's reuse rules are also checked without real stages.

Layer: unit by count, the chain's reuse and lanes with its stage runs faked, and the Makefile's
targets read as text; the two slow tests run `run.py experiment=quickstart_smoke`.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from omegaconf import open_dict

from conftest import run_cli
from ldm.runs import find_runs
from ldm.tasks import chain
from ldm.tracking import local_store_uri

STAGES = ("prepare_text", "nelbo_before", "pretrain", "nelbo_after", "prepare_tasks", "sft",
          "answers_fast", "answers_llada")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run experiment=quickstart_smoke once; return (outputs, completed process)."""
    outputs = tmp_path_factory.mktemp("quickstart") / "outputs"
    proc = run_cli(["experiment=quickstart_smoke"], outputs, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return outputs, proc


@pytest.mark.slow
def test_quickstart_chain_runs_every_stage_and_each_consumes_the_previous_output(smoke):
    outputs, proc = smoke
    data = outputs / "data"
    assert (data / "shakespeare" / "minilm-wordpiece" / "ctx64" / "manifest.json").is_file()
    assert (data / "synthetic_tasks" / "bpe262" / "ctx48" / "manifest.json").is_file()
    models = outputs / "models"
    pretrain, sft = models / "quickstart-smoke-pretrain", models / "quickstart-smoke-sft"
    assert (pretrain / "model.safetensors").is_file() and (sft / "model.safetensors").is_file()
    evals = outputs / "runs" / "evaluate"
    before = json.loads((evals / "quickstart-smoke-minilm-before" / "eval" / "metrics.json").read_text())
    after = json.loads((evals / "quickstart-smoke-minilm-after" / "eval" / "metrics.json").read_text())
    assert before["rows"] == after["rows"] == 4 and before["nelbo"] > 0 and after["nelbo"] > 0
    # the task model was built from scratch for the byte-level tokenizer: one token per character
    sft_config = json.loads((sft / "config.json").read_text())
    assert sft_config["model_type"] == "modernbert" and sft_config["vocab_size"] <= 272
    fast, llada = (
        [json.loads(line) for line in (evals / f"quickstart-smoke-eval-{s}" / "eval" /
                                       "results.jsonl").read_text().splitlines()]
        for s in ("fast", "llada"))
    assert len(fast) == len(llada) == 8 and all("correct" in r and r["nfe"] >= 1 for r in fast)
    assert [r["prompt"] for r in fast] == [r["prompt"] for r in llada]  # the same prompts
    # the summary: NELBO before/after, exports loading, answers, calls, chat and mlflow commands
    out = proc.stdout
    assert "NELBO/token" in out and "before ->" in out
    assert out.count("loads with AutoModelForMaskedLM") == 2
    assert "held-out exact match, sampler=fast, 8 prompts" in out and "not also training" in out
    assert "the first 8 held-out prompts:" in out
    assert "mean model calls per answer on the same 8 prompts: fast" in out and "llada" in out
    assert f"task=sample checkpoint={sft} interactive=true" in out
    assert "mlflow ui --backend-store-uri" in out
    runs = find_runs(local_store_uri(outputs), "evaluate")
    assert {r.data.params["checkpoint"] for r in runs} >= {str(sft), str(pretrain)}


@pytest.mark.slow
def test_second_quickstart_run_reuses_every_finished_stage_and_says_so(smoke):
    outputs, _ = smoke
    sft = outputs / "models" / "quickstart-smoke-sft" / "model.safetensors"
    written = sft.stat().st_mtime_ns
    evaluations = len(find_runs(local_store_uri(outputs), "evaluate"))
    proc = run_cli(["experiment=quickstart_smoke"], outputs, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"reused {len(STAGES)} of {len(STAGES)} finished stages" in proc.stdout
    assert all(f"{name}: reused" in proc.stdout for name in STAGES)
    assert sft.stat().st_mtime_ns == written
    assert len(find_runs(local_store_uri(outputs), "evaluate")) == evaluations  # nothing re-ran
    # the summary is complete from the reused outputs
    assert "the first 8 held-out prompts:" in proc.stdout


def fake_chain(make_config, tmp_path, monkeypatch, stages):
    """Return (config of a chain with `stages`, list recording the stages that ran)."""
    ran, commands = [], []

    def fake_run(command, **kwargs):
        args = command[2:]
        ran.append(chain.value_of(args, "run_name"))
        commands.append(args)
        folder = Path(chain.value_of(args, "paths.outputs")) / "runs" / "evaluate" / ran[-1] / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text("{}")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(chain.subprocess, "run", fake_run)
    monkeypatch.setattr(chain, "print_summary", lambda *a, **k: None)
    cfg = make_config("task=chain", "tracking=off", "run_name=c")
    with open_dict(cfg):
        cfg.task.stages = {name: [f"task={extra[0] if extra else 'evaluate'}", f"run_name={name}",
                                  *extra[1:]] for name, extra in stages.items()}
    fake_chain.commands = commands
    return cfg, ran


def test_chain_reuses_finished_stages_and_reruns_a_changed_stage_and_every_later_one(
        make_config, tmp_path, monkeypatch):
    stages = {"a": [], "b": ["evaluate", "seed=1"], "c": []}
    cfg, ran = fake_chain(make_config, tmp_path, monkeypatch, stages)
    chain.run(cfg)
    assert ran == ["a", "b", "c"]
    chain.run(cfg)
    assert ran == ["a", "b", "c"]  # all reused
    with open_dict(cfg):
        cfg.task.stages.b = ["task=evaluate", "run_name=b", "seed=2"]
    chain.run(cfg)
    assert ran[3:] == ["b", "c"]  # b changed; c may read what b rewrote
    # an output rewritten by another command since is not this stage's output: run it again
    metrics = Path(cfg.paths.outputs) / "runs" / "evaluate" / "a" / "eval" / "metrics.json"
    metrics.write_text("{}")
    chain.run(cfg)
    assert ran[5:] == ["a", "b", "c"]
    with open_dict(cfg):
        cfg.task.reuse = False
    chain.run(cfg)
    assert ran[8:] == ["a", "b", "c"]


def test_chain_does_not_reuse_a_stage_that_failed(make_config, tmp_path, monkeypatch):
    cfg, ran = fake_chain(make_config, tmp_path, monkeypatch, {"a": [], "b": []})
    chain.run(cfg)
    record = chain.records_dir(cfg) / "b.json"
    assert record.is_file()

    def failing(command, **kwargs):
        return subprocess.CompletedProcess(command, 1)

    with open_dict(cfg):
        cfg.task.reuse = False
    monkeypatch.setattr(chain.subprocess, "run", failing)
    with pytest.raises(chain.LdmError):
        chain.run(cfg)
    # a failed: its record does not claim it finished, so the next run runs it
    assert chain.read_record(chain.records_dir(cfg) / "a.json")["status"] == "running"


def test_byte_level_bpe_of_the_smallest_size_makes_one_token_per_character(tmp_path):
    from ldm.data import synthetic
    from ldm.tokenizer import train_bpe

    texts = [m["content"] for ex in synthetic.generate(300, 0, ["copy", "sort", "max"])
             for m in ex["messages"]]
    tok = train_bpe(iter(texts), 262, tmp_path / "tok")
    assert len(tok) == 262
    for text in ("Sort ascending: 42, 7, 19", "Copy: frog milk", "99"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text) and tok.decode(ids) == text


def test_exact_match_on_prompts_not_seen_in_training_counts_only_those():
    from ldm.scoring import answer_metrics

    base = {"nfe": 1, "seconds": 0.1, "tokens": 2}
    records = [{**base, "task": "copy", "correct": True, "seen_in_training": True},
               {**base, "task": "copy", "correct": False, "seen_in_training": False},
               {**base, "task": "max", "correct": True, "seen_in_training": False}]
    metrics = answer_metrics(records)
    assert metrics["exact_match"] == pytest.approx(2 / 3)
    assert metrics["unseen_examples"] == 2 and metrics["exact_match_unseen"] == 0.5
    assert metrics["exact_match_unseen.copy"] == 0.0 and metrics["exact_match_unseen.max"] == 1.0


def test_lanes_run_at_the_same_time_each_in_its_own_order_with_output_in_log_files(
        make_config, tmp_path, monkeypatch):
    import threading
    import time

    cfg, ran = fake_chain(make_config, tmp_path, monkeypatch, {s: [] for s in "abcd"})
    inner = chain.subprocess.run
    spans, lock = {}, threading.Lock()

    def timed(command, **kwargs):
        began = time.perf_counter()
        kwargs["stdout"].write(f"output of {chain.value_of(command[2:], 'run_name')}\n")
        time.sleep(0.3)
        with lock:
            result = inner(command, **kwargs)
        spans[ran[-1]] = (began, time.perf_counter())
        return result

    monkeypatch.setattr(chain.subprocess, "run", timed)
    with open_dict(cfg):
        cfg.task.lanes = [["a", "b"], ["c", "d"]]
    chain.run(cfg)
    assert spans["a"][1] <= spans["b"][0] and spans["c"][1] <= spans["d"][0]
    assert spans["a"][0] < spans["c"][1] and spans["c"][0] < spans["a"][1]  # a and c overlap
    logs = chain.records_dir(cfg).parent / "logs"
    assert (logs / "b.log").read_text() == "output of b\n"
    chain.run(cfg)  # every stage finished: all reused, in both lanes
    assert sorted(ran) == ["a", "b", "c", "d"]


def test_a_failing_lane_stops_the_chain_naming_the_stage_and_its_output(
        make_config, tmp_path, monkeypatch):
    cfg, ran = fake_chain(make_config, tmp_path, monkeypatch, {s: [] for s in "abc"})
    inner = chain.subprocess.run

    def failing_a(command, **kwargs):
        if chain.value_of(command[2:], "run_name") == "a":
            ran.append("a")
            kwargs["stdout"].write("error: the data folder is missing\n")
            return subprocess.CompletedProcess(command, 2)
        return inner(command, **kwargs)

    monkeypatch.setattr(chain.subprocess, "run", failing_a)
    with open_dict(cfg):
        cfg.task.lanes = [["a", "b"], ["c"]]
    with pytest.raises(chain.LdmError, match="stage 'a' failed.*\n.*the data folder is missing"):
        chain.run(cfg)
    assert "b" not in ran  # a's lane stopped at its failure


@pytest.mark.parametrize("lanes, message", [
    ([["a", "b"]], "leaves out stage\\(s\\) c"),
    ([["a", "b"], ["b", "c"]], "names stage 'b' twice"),
    ([["a", "b", "c", "x"]], "names stage 'x', which task.stages does not have"),
    ([["a", "b", "c"], []], "must be a non-empty list"),
])
def test_lanes_must_name_every_stage_exactly_once_before_any_stage_runs(
        make_config, tmp_path, monkeypatch, lanes, message):
    cfg, ran = fake_chain(make_config, tmp_path, monkeypatch, {s: [] for s in "abc"})
    with open_dict(cfg):
        cfg.task.lanes = lanes
    with pytest.raises(chain.ConfigError, match=message):
        chain.run(cfg)
    assert ran == []


def test_a_summary_that_names_a_missing_stage_fails_before_any_stage_runs(
        make_config, tmp_path, monkeypatch):
    cfg, ran = fake_chain(make_config, tmp_path, monkeypatch, {"a": []})
    with open_dict(cfg):
        cfg.task.summary = {"answers": "nope"}
    with pytest.raises(chain.ConfigError, match="'nope'"):
        chain.run(cfg)
    assert ran == []


def test_a_training_stage_rerun_with_other_overrides_starts_afresh_and_an_interrupted_one_resumes(
        make_config, tmp_path, monkeypatch):
    cfg, ran = fake_chain(make_config, tmp_path, monkeypatch, {"train": ["sft", "seed=1"]})
    chain.run(cfg)
    assert "task.resume=false" not in fake_chain.commands[-1]  # first run: nothing to resume
    with open_dict(cfg):
        cfg.task.stages.train = ["task=sft", "run_name=train", "seed=2"]
    chain.run(cfg)  # the checkpoints in the run folder were made with seed=1
    assert fake_chain.commands[-1][-1] == "task.resume=false"
    record = chain.records_dir(cfg) / "train.json"
    chain.write_record(record, chain.stage_commands(cfg)["train"], Path(cfg.paths.outputs))
    chain.run(cfg)  # interrupted with the same overrides: resume
    assert "task.resume=false" not in fake_chain.commands[-1]
    with open_dict(cfg):
        cfg.task.reuse = False
    chain.run(cfg)
    assert fake_chain.commands[-1][-1] == "task.resume=false"


def test_make_quickstart_installs_only_the_core_and_make_test_everything():
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert re.search(r"^quickstart: \$\(CORE_STAMP\)$", makefile, re.M)
    core = makefile.split("$(CORE_STAMP): pyproject.toml", 1)[1].split("\n\n", 1)[0]
    assert "-r $(CORE_LOCK)" in core and "$(ALL_LOCK)" not in core and "[dev" not in core
    assert "--no-deps -e .\n" in core
    assert re.search(r"^\$\(STAMP\): \$\(CORE_STAMP\) \$\(ALL_LOCK\)( |$)", makefile, re.M)
    assert re.search(r"^test: \$\(STAMP\)", makefile, re.M)


def test_the_chains_seed_reaches_every_stage_and_make_quickstart_passes_seed(make_config):
    cfg = make_config("experiment=quickstart", "seed=7")
    commands = chain.stage_commands(cfg)
    assert all("seed=7" in args for args in commands.values())
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert "run.py experiment=quickstart $(if $(SEED),seed=$(SEED))" in makefile


def test_the_quickstart_sft_trains_to_a_held_out_target_under_a_step_and_a_time_cap(make_config):
    from conftest import compose_config

    cfg = make_config("experiment=quickstart")
    sft = compose_config(chain.stage_commands(cfg)["sft"][3:])
    assert sft.task.target_exact_match >= 0.95 and sft.task.eval_every > 0
    assert sft.task.max_steps >= 300 and 0 < sft.task.max_minutes <= 8
    spec = cfg.task.summary
    assert spec.goal == 0.95 and spec.trained == "sft" and spec.answers == "answers_fast"
    # the check prompts (the end of the test split) are not the prompts the summary scores
    assert sft.task.target_examples + cfg.task.params.eval_examples <= 742
