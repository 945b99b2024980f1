"""The chat REPL (banner, Ctrl-C, empty answers) and sample runs that never overwrite each other.

Layer: unit, the REPL and run naming in-process; two slow tests run `run.py task=sample`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, compose_config, default_sigint
from test_sample_task import SMALL, make_export


@pytest.fixture(scope="module")
def chat_export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("repl") / "chat", chat=True)


class FakeSession:
    """Answers from a list; an exception instance in it is raised instead (e.g. Ctrl-C)."""

    max_positions = 128

    class sampler:  # noqa: N801 - stands in for SamplerSettings
        max_new_tokens = 8

    def __init__(self, answers):
        self.answers, self.seen = list(answers), []

    def chat_turn(self, messages, turn):
        self.seen.append([dict(m) for m in messages])
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def reader(lines):
    def read(prompt):
        item = lines.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item
    return read


def test_banner_says_how_to_leave_and_an_empty_answer_is_shown_as_such(capsys):
    from ldm.sampling.session import repl

    turns = repl(FakeSession(["", "yes"]), read=reader(["hi", "again", EOFError()]))
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("chat:") and "/exit or Ctrl-D to leave" in out[0]
    assert "Ctrl-C to stop an answer" in out[0]
    assert out[1:3] == ["(empty answer)", "yes"] and turns == 2


def test_ctrl_c_during_an_answer_drops_it_and_ctrl_c_at_the_prompt_leaves(capsys):
    from ldm.sampling.session import repl

    session = FakeSession([KeyboardInterrupt(), "second"])
    turns = repl(session, read=reader(["first", "again", KeyboardInterrupt()]))
    assert turns == 1
    assert session.seen[1] == [{"role": "user", "content": "again"}]  # the stopped turn is gone
    assert "(answer stopped)" in capsys.readouterr().out


def wait_for(predicate, timeout=120.0, what=""):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigint_stops_an_answer_then_leaves_at_the_prompt_and_the_mlflow_run_finishes(
        chat_export, tmp_path):
    from ldm.runs import find_runs
    from ldm.tracking import local_store_uri

    outputs, pauses = tmp_path / "outputs", tmp_path / "pauses"
    pauses.mkdir()
    env = {**os.environ, "LDM_OUTPUTS": str(outputs), "LDM_PAUSE_AT": "chat.answer:1",
           "LDM_PAUSE_DIR": str(pauses), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "run.py"), "task=sample", f"checkpoint={chat_export}",
         "interactive=true", "run_name=ctrl-c", *SMALL], cwd=REPO, env=env,
        stdin=subprocess.PIPE, stdout=open(out, "w"), stderr=open(err, "w"), text=True,
        preexec_fn=default_sigint)
    try:
        wait_for(lambda: "Ctrl-D to leave" in out.read_text(), what="the banner")
        proc.stdin.write("first question\n")
        proc.stdin.flush()
        marker = pauses / "chat.answer_1.paused"
        wait_for(marker.exists, what="the first answer to start")
        proc.send_signal(signal.SIGINT)  # Ctrl-C while the answer is being sampled
        wait_for(lambda: "(answer stopped)" in out.read_text(), what="the stopped answer")
        marker.unlink(missing_ok=True)
        proc.stdin.write("second question\n")
        proc.stdin.flush()
        wait_for(lambda: (outputs / "runs" / "sample" / "ctrl-c" / "samples.jsonl").is_file()
                 and out.read_text().endswith("> "), what="the second answer")
        proc.send_signal(signal.SIGINT)  # Ctrl-C at the prompt
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = err.read_text()
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    records = [json.loads(line) for line in
               (outputs / "runs" / "sample" / "ctrl-c" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["second question"]
    assert records[0]["messages"] == [{"role": "user", "content": "second question"}]
    (run,) = find_runs(local_store_uri(outputs), "sample")
    assert run.info.status == "FINISHED"


def run_sample(outputs: Path, checkpoint: Path, *extra: str):
    from ldm.tasks import sample

    cfg = compose_config(["task=sample", f"checkpoint={checkpoint}", "tracking=off",
                          "prompt=the king", *SMALL, *extra], outputs=outputs)
    before = set((outputs / "runs" / "sample").glob("*"))
    sample.run(cfg)
    (made,) = set((outputs / "runs" / "sample").glob("*")) - before or {outputs / "runs" / "sample"
                                                                         / cfg.run_name}
    return made.name


def test_unnamed_sample_runs_get_their_own_folder_named_after_the_checkpoint(
        chat_export, tmp_path):
    outputs = tmp_path / "outputs"
    first, second = run_sample(outputs, chat_export), run_sample(outputs, chat_export)
    assert first != second
    for name in (first, second):
        assert name.startswith(f"sample-{chat_export.name}-")
        lines = (outputs / "runs" / "sample" / name / "samples.jsonl").read_text().splitlines()
        assert len(lines) == 1


def test_a_named_sample_run_run_twice_keeps_the_first_runs_samples(chat_export, tmp_path):
    outputs = tmp_path / "outputs"
    run_sample(outputs, chat_export, "run_name=mine")
    run_sample(outputs, chat_export, "run_name=mine", "seed=1")
    records = [json.loads(x) for x in
               (outputs / "runs" / "sample" / "mine" / "samples.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [0, 1]


@pytest.mark.slow
def test_cli_sample_run_without_run_name_is_named_from_the_checkpoint(chat_export, tmp_path):
    from conftest import run_cli

    outputs = tmp_path / "outputs"
    for _ in range(2):
        proc = run_cli(["task=sample", f"checkpoint={chat_export}", "prompt=hello", "tracking=off",
                        *SMALL], outputs)
        assert proc.returncode == 0, proc.stderr[-3000:]
    folders = sorted((outputs / "runs" / "sample").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("sample-chat-") for f in folders)
    assert all((f / "samples.jsonl").is_file() and (f / ".hydra").is_dir() for f in folders)
