"""Shared fixtures: compose the real configs with Hydra's compose API, tiny corpora, run.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

import ldm.config  # noqa: F401  (registers schemas and resolvers)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def compose_config(overrides=(), outputs: Path | None = None, return_hydra_config=False):
    """Return the composed config for `overrides`, with outputs redirected when given."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
    if outputs is not None:
        with open_dict(cfg):
            cfg.paths.outputs = str(outputs)
    return cfg


@pytest.fixture
def offline(monkeypatch):
    """The hub is unreachable (HF_HUB_OFFLINE=1), with the reachability cache cleared around."""
    from ldm.hub import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    yield
    hub_reachable.cache_clear()


@pytest.fixture
def make_config(tmp_path):
    """Compose configs whose outputs go to a temporary folder."""
    def _make(*overrides):
        return compose_config(overrides, outputs=tmp_path / "outputs")
    return _make


def write_corpus(folder: Path, n_docs: int = 12, words: int = 400, seed: int = 0) -> Path:
    """Write n_docs .txt files of pseudo-random English-like text; return the folder."""
    import random

    rng = random.Random(seed)
    vocab = ("the king queen crown sword night day love war peace river stone bright dark "
             "speak answer ask tell good ill fair foul lord lady house field").split()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = " ".join(rng.choice(vocab) for _ in range(words + 37 * i))
        (folder / f"doc{i:03d}.txt").write_text(f"Document {i}. {text}.\n", encoding="utf-8")
    return folder


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A folder of 12 small UTF-8 text documents."""
    return write_corpus(tmp_path / "corpus")


def default_sigint() -> None:
    """Give a child process the default SIGINT handling (Ctrl-C raises KeyboardInterrupt).

    A shell starts background jobs with SIGINT ignored and children inherit that, so Python
    would never see the Ctrl-C a test sends; pass this as Popen's preexec_fn.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(args, outputs: Path, timeout: int = 300, env_extra=None):
    """Run `python run.py ARGS` with outputs under `outputs`; return the CompletedProcess."""
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env["LDM_OUTPUTS"] = str(outputs)
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=timeout)


def prepare_tiny_text(root: Path, tiny_overrides) -> tuple:
    """Prepare a small generated corpus for a tiny model; return (outputs, dataset.paths override)."""
    corpus = write_corpus(root / "corpus", n_docs=16, words=300)
    paths = f"dataset.paths=[{corpus}/*.txt]"
    outputs = root / "outputs"
    proc = run_cli(["task=prepare", *tiny_overrides, paths, "dataset.test_split_pct=0.25",
                    "tracking=off"], outputs)
    assert proc.returncode == 0, proc.stderr
    return outputs, paths


def local_text_dir(outputs: Path, paths_override: str, tokenizer: str, context: str) -> Path:
    """Return where dataset=local_text prepared from `dataset.paths=[...]` lives (keyed by paths)."""
    from ldm.data import identity, sources

    patterns = paths_override.split("=", 1)[1].strip("[]").split(",")
    key = identity.source_key(sources.describe_text_source("local", paths=patterns))
    return outputs / "data" / f"local_text-{key}" / tokenizer / context
