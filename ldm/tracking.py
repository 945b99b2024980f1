"""Experiment tracking. The only module that imports mlflow.

A `Tracker` is one mlflow run for one task invocation. It talks to mlflow through `MlflowClient`
(no global "active run" state), only on the main process, and is a no-op when tracking is off.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional

from hydra.experimental.callback import Callback

from ldm.errors import LdmError

log = logging.getLogger(__name__)

# mlflow's limits (mlflow.utils.validation): 100 params per batch, 6000 characters per value,
# 250 per key, 1000 metrics per batch.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE = 6000
MAX_PARAM_KEY = 250
PARENT_RUN_FILE = "mlflow_parent_run_id"


def local_store_uri(outputs: str | Path) -> str:
    """Return the sqlite tracking URI for <outputs>/mlflow.db (absolute, works from any cwd)."""
    return "sqlite:///" + str(Path(outputs).resolve() / "mlflow.db")


def local_artifact_uri(outputs: str | Path) -> str:
    """Return the file URI of <outputs>/mlartifacts."""
    return (Path(outputs).resolve() / "mlartifacts").as_uri()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, str]:
    """Return {dotted.key: str(value)} for a nested mapping, lists kept as their string form."""
    out: Dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)
    return out


def clip_params(params: Mapping[str, Any]) -> Dict[str, str]:
    """Return params whose keys and values fit mlflow's length limits."""
    clipped = {}
    for key, value in params.items():
        value = str(value)
        if len(value) > MAX_PARAM_VALUE:
            value = value[: MAX_PARAM_VALUE - 3] + "..."
        clipped[str(key)[:MAX_PARAM_KEY]] = value
    return clipped


def git_tags(repo: str | Path) -> Dict[str, str]:
    """Return tags for the git commit and whether the tree is dirty (empty when not a repo)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if commit.returncode != 0:
        return {}
    return {
        "git.commit": commit.stdout.strip(),
        "git.dirty": str(bool(status.stdout.strip())).lower(),
    }


class Tracker:
    """One mlflow run (or nothing, when disabled). Use as a context manager."""

    def __init__(
        self,
        *,
        enabled: bool,
        uri: Optional[str] = None,
        artifact_location: Optional[str] = None,
        experiment: str = "default",
        run_name: Optional[str] = None,
        parent_run_id: Optional[str] = None,
        resume_run_id: Optional[str] = None,
        tags: Optional[Mapping[str, str]] = None,
        required: bool = True,
    ):
        self.enabled = enabled
        self.run_id: Optional[str] = None
        self.experiment_id: Optional[str] = None
        self.uri = uri
        self._client = None
        self._logged_upto: Dict[str, int] = {}
        if not enabled:
            return
        try:
            self._start(uri, artifact_location, experiment, run_name, parent_run_id,
                        resume_run_id, tags or {})
        except Exception as err:  # noqa: BLE001 - any failure to reach the store lands here
            if required:
                raise LdmError(
                    f"cannot reach the mlflow tracking store {uri!r}: {type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''} (start the server, pick "
                    "tracking=mlflow_local or tracking=off, or set tracking.required=false)"
                ) from err
            log.warning("mlflow tracking disabled: cannot reach %s (%s)", uri, err)
            self.enabled = False

    def _start(self, uri, artifact_location, experiment, run_name, parent_run_id,
               resume_run_id, tags):
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=uri)
        self.experiment_id = self._experiment_id(experiment, artifact_location)
        if resume_run_id:
            run = self._client.get_run(resume_run_id)
            self.run_id = run.info.run_id
            self._client.update_run(self.run_id, status="RUNNING")
            # A resumed run recomputes the steps after its checkpoint; steps already logged
            # before the interruption are not logged twice.
            for key in run.data.metrics:
                history = self._client.get_metric_history(self.run_id, key)
                self._logged_upto[key] = max((m.step for m in history), default=-1)
            return
        run_tags = dict(tags)
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run = self._client.create_run(self.experiment_id, run_name=run_name, tags=run_tags)
        self.run_id = run.info.run_id

    def _experiment_id(self, name: str, artifact_location: Optional[str]) -> str:
        existing = self._client.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        try:
            return self._client.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # noqa: BLE001 - another process created it first
            existing = self._client.get_experiment_by_name(name)
            if existing is None:
                raise
            return existing.experiment_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params in batches that respect mlflow's limits."""
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = sorted(clip_params(params).items())
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            batch = [Param(k, v) for k, v in items[start:start + MAX_PARAMS_PER_BATCH]]
            self._client.log_batch(self.run_id, params=batch)

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        """Log numeric metrics at one step."""
        if not self.enabled or not metrics:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = step or 0
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if step > self._logged_upto.get(k, -1)]
        if not batch:
            return
        for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=batch[start:start + MAX_METRICS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set string tags on the run."""
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        """Upload one file or folder to the run's artifacts."""
        if not self.enabled:
            return
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Save a string as an artifact file."""
        if not self.enabled:
            return
        self._client.log_text(self.run_id, text, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED, FAILED or KILLED."""
        if self.enabled and self.run_id:
            self._client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        try:
            self.finish(status)
        except Exception as err:  # noqa: BLE001 - never hide the original error
            log.warning("could not close the mlflow run: %s", err)


def find_runs(uri: str, experiment: str) -> list:
    """Return the runs of one experiment (newest first); for summaries and tests."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])


def read_parent_run_id(sweep_dir: str | Path) -> Optional[str]:
    """Return the sweep's parent run id written by `SweepParentRun`, if any."""
    path = Path(sweep_dir) / PARENT_RUN_FILE
    return path.read_text().strip() if path.is_file() else None


class SweepParentRun(Callback):
    """Hydra callback: one parent mlflow run per multirun; every job becomes its child."""

    def __init__(self) -> None:
        self.tracker: Optional[Tracker] = None

    def on_multirun_start(self, config, **kwargs) -> None:
        if config.tracking.backend != "mlflow":
            return
        from omegaconf import OmegaConf

        from ldm.tasks.common import tracking_target

        uri, artifacts, experiment = tracking_target(config)
        self.tracker = Tracker(
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


def iter_metric_history(uri: str, run_id: str, key: str) -> Iterable:
    """Return the logged history of one metric."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)


def is_main_process() -> bool:
    """True on rank 0 (or without a distributed launcher)."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") in ("0", "")
