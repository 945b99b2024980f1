"""Reliability suite: real `run.py` processes, tiny models, shared prepared data, kill report.

Processes are forked from a pre-imported parent (`zygote.py`) to keep ~60 of them within the CI
budget; set LDM_RELIABILITY_FRESH=1 to start every one as a plain `python run.py` instead.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from conftest import REPO, local_text_dir, write_corpus

# A ModernBERT of ~30k parameters with a 320-token BPE and 64-token rows: one step is milliseconds.
TINY = ["model=modernbert_tiny", "model.vocab_size=320", "model.arch.hidden_size=32",
        "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=2",
        "model.arch.intermediate_size=64", "model.max_positions=128", "context=ctx64"]
TEXT = [*TINY, "dataset=local_text"]
TRAIN = ["task.global_batch_size=4", "hardware.micro_batch_size=2",
         "hardware.gradient_accumulation_steps=2", "task.warmup_steps=2", "task.lr=3e-3",
         "task.log_every=1", "task.eval_every=0", "task.eval_batches=1", "task.eval_t_grid=2",
         "task.keep_last=0"]
CHAT = ["dataset=synthetic_tasks", "dataset.max_documents=120", "dataset.task_types=[copy]"]
PYTHON = sys.executable


# --- processes ---------------------------------------------------------------------------------


@dataclass
class Result:
    """A finished process: exit status (negative: killed by that signal) and its output."""

    args: List[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


class Child:
    """A running `run.py` process (forked by the zygote, or a plain subprocess)."""

    def __init__(self, launcher: "Launcher", args, pid: int, out: Path, err: Path,
                 popen: Optional[subprocess.Popen] = None):
        self.launcher, self.args, self.pid, self.out, self.err = launcher, args, pid, out, err
        self.popen = popen

    def poll(self) -> Optional[int]:
        """Return the exit status, or None while it runs."""
        if self.popen is not None:
            return self.popen.poll()
        return self.launcher.status(self.pid)

    def wait(self, timeout: float = 300) -> Result:
        """Wait for the exit (killing it after `timeout` s) and return the Result."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                deadline = time.monotonic() + 30
                while self.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                raise AssertionError(f"timed out after {timeout} s: run.py {' '.join(self.args)}\n"
                                     f"{self.err.read_text()[-3000:]}")
            time.sleep(0.02)
        return Result(self.args, self.poll(), self.out.read_text(errors="replace"),
                      self.err.read_text(errors="replace"))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the process if it still runs."""
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


class Launcher:
    """Starts `run.py` processes with outputs under a given folder."""

    def __init__(self, scratch: Path, fresh: bool):
        self.scratch, self.fresh = scratch, fresh
        self.counter = itertools.count()
        self.lock = threading.Condition()
        self.pids: Dict[int, int] = {}
        self.exits: Dict[int, int] = {}
        self.zygote: Optional[subprocess.Popen] = None
        if not fresh:
            self._start_zygote()

    def _start_zygote(self) -> None:
        self.zygote = subprocess.Popen([PYTHON, str(Path(__file__).with_name("zygote.py"))],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       cwd=REPO, env=self.env({}))
        first = self.zygote.stdout.readline().decode().strip()
        if first != "ready":
            raise RuntimeError(f"the zygote did not start: {first!r}")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.zygote.stdout:
            kind, *rest = raw.decode().split()
            with self.lock:
                if kind == "spawned":
                    self.pids[int(rest[0])] = int(rest[1])
                elif kind == "exit":
                    self.exits[int(rest[0])] = os.waitstatus_to_exitcode(int(rest[1]))
                self.lock.notify_all()

    def status(self, pid: int) -> Optional[int]:
        with self.lock:
            return self.exits.get(pid)

    @staticmethod
    def env(outputs: Optional[Path], extra: Optional[dict] = None) -> dict:
        env = dict(os.environ)
        env.pop("HYDRA_FULL_ERROR", None)
        for key in ("LDM_KILL_AT", "LDM_PAUSE_AT", "LDM_PAUSE_DIR"):
            env.pop(key, None)
        if outputs:
            env["LDM_OUTPUTS"] = str(outputs)
        env["HF_HUB_DISABLE_TELEMETRY"] = "1"
        env["HF_HUB_OFFLINE"] = "1"
        env["TQDM_DISABLE"] = "1"
        # one thread per process: tiny models gain nothing from more, and the CI cores are shared
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
        env.update(extra or {})
        return env

    def start(self, args, outputs: Path, env: Optional[dict] = None, stdin: Optional[str] = None
              ) -> Child:
        """Start `python run.py ARGS` with LDM_OUTPUTS=outputs; return the running Child."""
        n = next(self.counter)
        out, err = self.scratch / f"{n}.out", self.scratch / f"{n}.err"
        stdin_path = None
        if stdin is not None:
            stdin_path = self.scratch / f"{n}.in"
            stdin_path.write_text(stdin)
        argv = [str(REPO / "run.py"), *[str(a) for a in args]]
        full_env = self.env(outputs, env)
        if self.fresh:
            popen = subprocess.Popen([PYTHON, *argv], cwd=REPO, env=full_env,
                                     stdin=open(stdin_path) if stdin_path else subprocess.DEVNULL,
                                     stdout=open(out, "w"), stderr=open(err, "w"))
            return Child(self, list(args), popen.pid, out, err, popen)
        request = {"id": n, "argv": argv, "env": full_env, "cwd": str(REPO),
                   "stdin": str(stdin_path) if stdin_path else None,
                   "stdout": str(out), "stderr": str(err)}
        with self.lock:
            self.zygote.stdin.write((json.dumps(request) + "\n").encode())
            self.zygote.stdin.flush()
            if not self.lock.wait_for(lambda: n in self.pids, timeout=60):
                raise RuntimeError("the zygote did not fork")
            return Child(self, list(args), self.pids[n], out, err)

    def run(self, args, outputs: Path, env: Optional[dict] = None, timeout: float = 300,
            stdin: Optional[str] = None) -> Result:
        """Run `python run.py ARGS` to the end; return its Result."""
        return self.start(args, outputs, env, stdin).wait(timeout)

    def close(self) -> None:
        if self.zygote is not None:
            self.zygote.stdin.close()
            self.zygote.wait(timeout=30)


@pytest.fixture(scope="session")
def launcher(tmp_path_factory):
    """Starts run.py processes (forked warm unless LDM_RELIABILITY_FRESH=1)."""
    runner = Launcher(tmp_path_factory.mktemp("procs"),
                      fresh=os.environ.get("LDM_RELIABILITY_FRESH") == "1")
    yield runner
    runner.close()


# --- shared data and models ----------------------------------------------------------------------


@dataclass
class World:
    """One outputs folder with tiny prepared text data and an uninterrupted pretraining run."""

    root: Path
    outputs: Path
    corpus: Path
    paths: str  # the dataset.paths override
    data: Path  # the prepared data folder
    clean_run: Optional[Path] = None
    clean_export: Optional[Path] = None
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def text(self) -> List[str]:
        return [*TEXT, self.paths]

    def pretrain(self, steps: int = 6) -> List[str]:
        """Return the pretrain overrides of the kill tests (checkpoints every 2 steps)."""
        return ["task=pretrain", *self.text, *TRAIN, f"task.max_steps={steps}", "task.save_every=2"]


@pytest.fixture(scope="session")
def world(tmp_path_factory, launcher) -> World:
    """Prepared tiny text data and a clean (never killed) 6-step pretraining run, tracked."""
    root = tmp_path_factory.mktemp("world")
    corpus = write_corpus(root / "corpus", n_docs=16, words=300)
    outputs = root / "outputs"
    paths = f"dataset.paths=[{corpus}/*.txt]"
    w = World(root, outputs, corpus, paths, local_text_dir(outputs, paths, "bpe320", "ctx64"))
    proc = launcher.run(["task=prepare", *w.text, "dataset.test_split_pct=0.25", "tracking=off"],
                        outputs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = launcher.run([*w.pretrain(), "run_name=clean"], outputs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w.clean_run = outputs / "runs" / "pretrain" / "clean"
    w.clean_export = outputs / "models" / "clean"
    return w


@pytest.fixture(scope="session")
def chat_export(tmp_path_factory) -> Path:
    """A tiny random ModernBERT export with a chat template (for task=sample cases)."""
    import torch
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    from ldm.tokenizer import add_chat_template, train_bpe
    from ldm.export import write_export as export_model

    root = tmp_path_factory.mktemp("chat_export")
    texts = ["the king spoke to the queen of the river and the stone in the night.",
             "a lord and a lady walked in the bright field; the user asked, it answered."] * 30
    tok = add_chat_template(train_bpe(texts, 320, root / "bpe"))
    torch.manual_seed(0)
    config = ModernBertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.cls_token_id,
        cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id)
    model = ModernBertForMaskedLM(config).eval()
    return export_model(model, tok, root / "chat", "model: tiny\n", {"mask_id": tok.mask_token_id})


# --- the kill report ---------------------------------------------------------------------------

KILLS: Dict[str, bool] = {}


def record_kill(point: str, exact: bool) -> None:
    """Record that kill point `point` was tried and whether the run resumed exactly after it."""
    KILLS[point] = exact


def pytest_terminal_summary(terminalreporter):
    if not KILLS:
        return
    exact = sum(KILLS.values())
    terminalreporter.write_sep("-", "reliability: kill points")
    for point, ok in KILLS.items():
        terminalreporter.write_line(f"  {point:<34} {'resumed exactly' if ok else 'NOT EXACT'}")
    terminalreporter.write_line(f"kill points tried: {len(KILLS)}, resumed exactly: {exact}")


# --- assertions shared by the tests ------------------------------------------------------------


def error_line(proc: Result) -> str:
    """Return the one `error:` line of a failed run; assert there is no traceback."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode not in (0, None), proc.output[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def same_tree(a: Path, b: Path, ignore=()) -> List[str]:
    """Return the relative paths whose bytes differ between folders a and b (or exist in one)."""
    files = lambda root: {p.relative_to(root).as_posix() for p in root.rglob("*")  # noqa: E731
                          if p.is_file() and p.name not in ignore}
    names_a, names_b = files(a), files(b)
    diff = sorted(names_a ^ names_b)
    diff += [n for n in sorted(names_a & names_b) if (a / n).read_bytes() != (b / n).read_bytes()]
    return diff


def same_weights(a: Path, b: Path) -> bool:
    """True when two safetensors files hold bit-identical tensors under the same names."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def copy_tree(src: Path, dst: Path) -> Path:
    """Copy a folder; return the copy."""
    shutil.copytree(src, dst)
    return dst
