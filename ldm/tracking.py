"""Experiment tracking: writing to mlflow. With `ldm/runs.py` (reading runs back), the only
modules that import mlflow; neither reads Hydra's config.

A `Tracker` is one mlflow run for one task invocation. It talks to mlflow through `MlflowClient`
(no global "active run" state), only on the main process, and is a no-op when tracking is off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ldm.errors import LdmError

log = logging.getLogger(__name__)

# mlflow's limits (mlflow.utils.validation): 100 params per batch, 6000 characters per value,
# 250 per key, 1000 metrics per batch.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE = 6000
MAX_PARAM_KEY = 250
RETRY_SECONDS = 15.0  # while the store is away, retry queued writes at most this often


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


VERSIONED = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "mlflow", "ldm")


def cpu_model() -> str:
    """Return the CPU's model name (/proc/cpuinfo on Linux, else the platform's word for it)."""
    import platform

    info = Path("/proc/cpuinfo")
    lines = info.read_text(errors="replace").splitlines() if info.is_file() else []
    for line in lines:
        if line.lower().startswith(("model name", "hardware")) and ":" in line:
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def environment_tags() -> Dict[str, str]:
    """Return tags that tell two runs' environments apart: library versions, CPU, GPU, threads."""
    import os

    import torch

    from ldm.export import library_versions

    found = library_versions(VERSIONED)
    tags = {f"version.{name}": found.get(name, "not installed") for name in VERSIONED}
    tags["machine.cpu"] = cpu_model()
    tags["machine.cores"] = str(os.cpu_count() or 0)
    tags["machine.torch_threads"] = str(torch.get_num_threads())
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    tags["machine.gpu"] = ", ".join(gpus) if gpus else "none"
    return tags


@contextlib.contextmanager
def sqlite_lock(uri: Optional[str]):
    """Hold an exclusive file lock next to a sqlite store (no-op for other URIs).

    Parallel sweep jobs on a fresh `mlflow.db` race to create its tables and the experiment; one
    of them then fails with "database is locked" or a duplicate experiment. Holding this lock
    while a run is opened serialises that part; later writes retry through `Tracker._send`.
    """
    if not (uri and uri.startswith("sqlite:///")):
        yield
        return
    import fcntl

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(str(db) + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
        self._pending: List[Tuple[str, Callable[[], None], list]] = []
        self._retry_after = 0.0
        self._failing = False
        self.fallback_path: Optional[Path] = None
        if not enabled:
            return
        if uri and uri.startswith(("http://", "https://")):
            # mlflow retries a failed request for minutes by default; training cannot wait that long
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            with sqlite_lock(uri):
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

    # --- writing: every call goes through _send, which buffers while the store is away -----

    def _send(self, what: str, call: Callable[[], None], metrics: Optional[list] = None) -> None:
        """Run one write; while the store is unreachable, queue it and retry later."""
        if not self.enabled:
            return
        self._pending.append((what, call, metrics or []))
        if time.monotonic() < self._retry_after:
            return
        self.flush()

    def flush(self) -> bool:
        """Send queued writes in order; return True when nothing is left queued."""
        while self._pending:
            what, call, _ = self._pending[0]
            try:
                call()
            except Exception as err:  # noqa: BLE001 - network, HTTP or database errors alike
                self._retry_after = time.monotonic() + RETRY_SECONDS
                if not self._failing:
                    self._failing = True
                    log.warning("mlflow tracking store %s is unreachable (%s: %s); training goes on, "
                                "writes are buffered and sent when it is back", self.uri,
                                type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
                return False
            self._pending.pop(0)
        if self._failing:
            self._failing = False
            log.warning("mlflow tracking store %s is back; buffered writes sent", self.uri)
        return True

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params in batches that respect mlflow's limits."""
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = sorted(clip_params(params).items())
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            batch = [Param(k, v) for k, v in items[start:start + MAX_PARAMS_PER_BATCH]]
            self._send("params", lambda b=batch: self._client.log_batch(self.run_id, params=b))

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        """Log numeric metrics at one step (each step at most once per key, across resumes)."""
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = step or 0
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if step > self._logged_upto.get(k, -1)]
        for metric in batch:
            self._logged_upto[metric.key] = step
        for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
            chunk = batch[start:start + MAX_METRICS_PER_BATCH]
            self._send("metrics", lambda c=chunk: self._client.log_batch(self.run_id, metrics=c),
                       metrics=chunk)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set string tags on the run."""
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self._send("tags", lambda: self._client.log_batch(self.run_id, tags=batch))

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        """Upload one file or folder to the run's artifacts."""
        if not self.enabled:
            return
        path = Path(path)
        if path.is_dir():
            self._send("artifact", lambda: self._client.log_artifacts(self.run_id, str(path),
                                                                      artifact_path))
        elif path.is_file():
            self._send("artifact", lambda: self._client.log_artifact(self.run_id, str(path),
                                                                     artifact_path))

    def log_dataset(self, *, name: str, digest: str, source: str, profile: Mapping[str, Any],
                    context: str) -> None:
        """Record a data set as an input of the run (the run page's Datasets panel)."""
        if not self.enabled:
            return
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type="local", source=source,
                          profile=json.dumps(profile, sort_keys=True, default=str))
        item = DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])
        self._send("dataset", lambda: self._client.log_inputs(self.run_id, datasets=[item]))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Save a string as an artifact file."""
        self._send("text", lambda: self._client.log_text(self.run_id, text, artifact_file))

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is queued, then mark the run FINISHED, FAILED or KILLED.

        Writes that still cannot be sent are saved to `fallback_path` (JSONL) and the user is told.
        """
        if not (self.enabled and self.run_id):
            return
        self._retry_after = 0.0
        self._send("status", lambda: self._client.set_terminated(self.run_id, status=status))
        if self._pending:
            self._write_fallback()

    def _write_fallback(self) -> None:
        import json

        target = Path(self.fallback_path or "mlflow_unsent.jsonl")
        lines = []
        for what, _, metrics in self._pending:
            lines += [json.dumps({"key": m.key, "value": m.value, "step": m.step,
                                  "timestamp": m.timestamp}) for m in metrics]
            if what != "metrics":
                lines.append(json.dumps({"unsent": what}))
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a") as fh:
            fh.write("\n".join(lines) + "\n")
        log.warning("mlflow run %s at %s missed %d writes; its metrics are saved in %s",
                    self.run_id, self.uri, len(self._pending), target)
        print(f"warning: mlflow could not be reached; unsent metrics saved to {target}",
              file=sys.stderr)
        self._pending.clear()

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
