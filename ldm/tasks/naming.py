"""Run names the config does not give: a sample run is named after its checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

DEFAULT_RUN_NAME = "${task.name}-${dataset.name}-${model.name}-${context.name}"  # config.yaml


def run_name_given(cfg: DictConfig) -> bool:
    """True when run_name was set (command line, preset) rather than left at config.yaml's default."""
    return cfg._get_node("run_name")._value() != DEFAULT_RUN_NAME


def unique_run_name(checkpoint: Optional[str]) -> str:
    """Return `sample-<checkpoint's name>-<UTC time>-<random>`: a sample run never reuses a folder."""
    import re
    import secrets
    import time

    name = Path(str(checkpoint)).name if checkpoint and Path(str(checkpoint)).is_dir() \
        else str(checkpoint or "none")
    name = re.sub(r"[^A-Za-z0-9._=+@-]+", "_", name).strip("._") or "checkpoint"
    return f"sample-{name[:120]}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-" \
           f"{secrets.token_hex(2)}"


def name_sample_run(cfg: DictConfig) -> None:
    """Give an unnamed sample run its own name (from the checkpoint + a unique suffix), in place."""
    from omegaconf import open_dict, read_write

    if cfg.task.name != "sample" or run_name_given(cfg):
        return
    with read_write(cfg), open_dict(cfg):
        cfg.run_name = unique_run_name(cfg.get("checkpoint"))
