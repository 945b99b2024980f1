"""Every config option composes and resolves; typos and wrong types fail at compose time.

Layer: policy, every config option composes (in-process); one test runs `run.py` to see the
error a user sees.
"""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from conftest import CONF, compose_config, run_cli

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra",))


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


ALL_OPTIONS = [(g, o) for g in GROUPS for o in _options(g)]


def test_every_group_named_in_the_design_exists():
    for group in ("task", "model", "dataset", "context", "masking", "hardware", "tracking",
                  "experiment"):
        assert group in GROUPS, group


@pytest.mark.parametrize("group,option", ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_option_of_every_group_composes_and_resolves(group, option, tmp_path):
    cfg = compose_config([f"{group}={option}"], outputs=tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    if group in ("experiment", "sweep"):  # # @package _global_ presets
        assert resolved["run_name"], "an experiment preset must give its runs a name"
    else:
        assert resolved[group]["name"] == option


def test_experiment_presets_exist():
    assert _options("experiment"), "at least one experiment preset"


def test_misspelt_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="hiden"):
        compose_config(["model.hiden=3"])


def test_wrong_type_fails_at_compose_time():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config(["context.length=abc"])


def test_misspelt_group_option_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="modernbert_lrage"):
        compose_config(["model=modernbert_lrage"])


def test_run_folder_is_named_after_task_and_run_name(tmp_path):
    cfg = compose_config(["task=prepare", "run_name=abc"], outputs=tmp_path,
                         return_hydra_config=True)
    assert cfg.hydra.run.dir == f"{tmp_path}/runs/prepare/abc"


def test_outputs_are_absolute_whatever_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config([])
    assert cfg.paths.outputs.startswith("/") and cfg.paths.data.startswith(cfg.paths.outputs)


@pytest.mark.parametrize("override,needle", [
    ("model.hiden=3", "hiden"),
    ("context.length=abc", "abc"),
    ("dataset=shakspeare", "shakspeare"),
])
def test_cli_reports_config_errors_without_traceback(override, needle, tmp_path):
    proc = run_cli(["task=prepare", "tracking=off", override], tmp_path)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
