"""Helpers shared by the tasks: tracking setup from the config, the run folder, devices, and the
Hydra callbacks (run-folder lock, sweep parent run): the glue between Hydra's config and the
library, which never reads it."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Optional, Tuple

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ldm import tracking
from ldm.errors import ConfigError
from ldm.ranks import is_main_process

log = logging.getLogger("ldm")


def tracking_target(cfg: DictConfig) -> Tuple[Optional[str], Optional[str], str]:
    """Return (tracking uri, artifact location, experiment name) for this config."""
    outputs = cfg.paths.outputs
    uri = cfg.tracking.uri or tracking.local_store_uri(outputs)
    artifacts = cfg.tracking.artifact_location
    if artifacts is None and uri.startswith("sqlite:"):
        artifacts = tracking.local_artifact_uri(outputs)
    experiment = cfg.experiment_name or cfg.task.name
    return uri, artifacts, experiment


DEVICES = ("auto", "cpu", "cuda")


def check_device(name: str) -> str:
    """Return task.device `name` if this machine can run it, else raise ConfigError."""
    import torch

    if name not in DEVICES:
        raise ConfigError(f"task.device={name!r}; accepted: {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("task.device=cuda but no CUDA device is available; use auto or cpu")
    return name


def pick_device(name: str):
    """Return the torch device for task.device (auto = cuda when available)."""
    import torch

    check_device(name)
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._,=+@-]{0,199}$")


def check_run_name(name) -> str:
    """Return `name` if it is a plain folder name (it names the run folder and the export)."""
    if not isinstance(name, str) or not RUN_NAME.match(name):
        raise ConfigError(f"run_name={name!r} is not a plain folder name; use letters, digits and "
                          ". _ - = + , @ (at most 200, no / and no leading dot)")
    return name


def hydra_output_dir() -> Optional[Path]:
    """Return the Hydra run folder of this job, or None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return Path(HydraConfig.get().runtime.output_dir)


def run_dir(cfg: DictConfig) -> Path:
    """Return (and create) this job's run folder."""
    out = hydra_output_dir()
    if out is None:
        out = Path(cfg.paths.outputs) / "runs" / cfg.task.name / cfg.run_name
    if not out.exists():
        _RUN_STATE["created"] = out
    out.mkdir(parents=True, exist_ok=True)
    return out


# The run folder this process created, and whether the task's real work (training, sampling)
# began: a run that fails before that leaves no run folder behind.
_RUN_STATE: dict = {"created": None, "started": False}


def mark_work_started() -> None:
    """Record that the task's real work began: from now on its run folder is kept on failure."""
    _RUN_STATE["started"] = True


def discard_new_run_folder() -> Optional[Path]:
    """Remove the run folder this process created if the work never began; return it if removed."""
    import shutil

    folder = _RUN_STATE["created"]
    if folder is None or _RUN_STATE["started"] or not Path(folder).is_dir():
        return None
    shutil.rmtree(folder, ignore_errors=True)
    parent = Path(folder).parent  # runs/<task>/, when this run was its only one
    if parent.parent.name == "runs" and not any(parent.iterdir()):
        parent.rmdir()
    _RUN_STATE["created"] = None
    return Path(folder)


PARENT_RUN_FILE = "mlflow_parent_run_id"


def read_parent_run_id(sweep_dir: str | Path) -> Optional[str]:
    """Return the sweep's parent run id written by `SweepParentRun`, if any."""
    path = Path(sweep_dir) / PARENT_RUN_FILE
    return path.read_text().strip() if path.is_file() else None


def _sweep_parent_id() -> Optional[str]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return read_parent_run_id(hc.sweep.dir)


def check_tracking(cfg: DictConfig) -> None:
    """Raise ConfigError for a tracking option that cannot work, before any expensive work."""
    if cfg.tracking.backend not in ("mlflow", "off"):
        raise ConfigError(
            f"tracking.backend={cfg.tracking.backend!r} is not known; use mlflow or off"
        )
    # `uri: ???` in mlflow_server.yaml does not survive the merge onto the schema's None, so
    # without this a forgotten uri would silently track into the local sqlite store
    if cfg.tracking.name == "mlflow_server" and not cfg.tracking.uri:
        raise ConfigError("tracking=mlflow_server needs tracking.uri=http://<host>:<port> (the "
                          "server's address); or use tracking=mlflow_local or tracking=off")


def open_tracker(cfg: DictConfig, resume_run_id: Optional[str] = None) -> tracking.Tracker:
    """Start the mlflow run for this task (params, tags, config artifacts) and return it."""
    check_tracking(cfg)
    enabled = cfg.tracking.backend == "mlflow" and is_main_process()
    if not enabled:
        return tracking.Tracker(enabled=False)
    uri, artifacts, experiment = tracking_target(cfg)
    tags = {"ldm.task": cfg.task.name, "ldm.command": " ".join(sys.argv)}
    tags.update(tracking.git_tags(cfg.paths.root))
    tags.update(tracking.environment_tags())  # versions and machine: two runs that disagree
    tracker = tracking.Tracker(
        enabled=True, uri=uri, artifact_location=artifacts, experiment=experiment,
        run_name=cfg.run_name, parent_run_id=_sweep_parent_id(), resume_run_id=resume_run_id,
        tags=tags, required=bool(cfg.tracking.required),
    )
    if tracker.enabled and not resume_run_id:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        tracker.log_params(tracking.flatten(resolved))
        out = hydra_output_dir()
        if out is not None:
            for name in ("config.yaml", "overrides.yaml"):
                tracker.log_artifact(out / ".hydra" / name, "hydra")
        else:
            tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "hydra/config.yaml")
    if tracker.enabled:
        tracker.fallback_path = run_dir(cfg) / "mlflow_unsent.jsonl"
        log.info("mlflow run %s in experiment %r (%s)", tracker.run_id, experiment, uri)
    return tracker


_HELD_LOCKS: dict = {}


def lock_run_folder(folder: Path):
    """Hold an exclusive lock on a run folder for this process's lifetime; refuse if held.

    Returns the open lock file (kept open until the process ends; asking again for a folder this
    process holds returns it). The OS drops the lock when the process ends, however it ends, so
    a killed run never blocks its own resumption.
    """
    import fcntl
    import os

    from ldm.errors import LdmError

    key = str(Path(folder).resolve())
    if key in _HELD_LOCKS:
        return _HELD_LOCKS[key]
    handle = open(folder / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise LdmError(f"run folder {folder} is in use by {owner}: a run with this run_name is "
                       "already going; wait for it or pick another run_name=") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    _HELD_LOCKS[key] = handle
    return handle


def unlock_run_folder(folder: Path) -> None:
    """Release this process's lock on a run folder (a launcher hands the folder to its ranks)."""
    import fcntl

    handle = _HELD_LOCKS.pop(str(Path(folder).resolve()), None)
    if handle is not None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


class RunFolderLock(Callback):
    """Hydra callback: lock the run folder before Hydra writes its config and log into it.

    A second command with the same task and run_name stops here with one error line, before it
    can overwrite the first one's `.hydra/` files or touch its checkpoints (multirun jobs have
    folders of their own; only rank 0 of a launch takes the lock).
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        import os

        from ldm.errors import LdmError

        if not is_main_process():
            return
        try:
            from ldm.tasks.naming import name_sample_run

            name_sample_run(config)
            check_run_name(config.run_name)
            folder = Path(config.hydra.run.dir)
            try:
                if not folder.exists():
                    _RUN_STATE["created"] = folder
                folder.mkdir(parents=True, exist_ok=True)
                lock_run_folder(folder)
            except OSError as err:
                raise LdmError(f"cannot create or lock the run folder {folder} ({err.strerror}); "
                               "fix its permissions or set paths.outputs / LDM_OUTPUTS "
                               "elsewhere") from err
        except LdmError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)


class SweepParentRun(Callback):
    """Hydra callback: one parent mlflow run per multirun; every job becomes its child."""

    def __init__(self) -> None:
        self.tracker: Optional[tracking.Tracker] = None

    def on_multirun_start(self, config, **kwargs) -> None:
        if config.tracking.backend != "mlflow":
            return
        uri, artifacts, experiment = tracking_target(config)
        self.tracker = tracking.Tracker(
            enabled=True, uri=uri, artifact_location=artifacts, experiment=experiment,
            run_name=f"sweep-{Path(config.hydra.sweep.dir).name}",
            tags={"ldm.sweep": "parent", "ldm.command": " ".join(sys.argv)},
            required=bool(config.tracking.required),
        )
        if not self.tracker.enabled:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_RUN_FILE).write_text(self.tracker.run_id)
        params = OmegaConf.to_container(config.hydra.sweeper.params or {}, resolve=False)
        self.tracker.log_params({f"sweep.{k}": v for k, v in params.items()})

    def on_multirun_end(self, config, **kwargs) -> None:
        if self.tracker is not None:
            self.tracker.finish("FINISHED")
