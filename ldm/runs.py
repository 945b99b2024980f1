"""Reading mlflow runs back: a run by id or name, a sweep's children (task=compare), the runs of an
experiment and a metric's history (summaries, plots, tests), and adding an artifact to a finished
run. `find_run` and `child_runs` return plain dicts, so task=compare never touches mlflow;
`find_runs` returns mlflow's own run objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple


def _run_record(run) -> Dict[str, Any]:
    return {"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
            "experiment_id": run.info.experiment_id, "start_time": run.info.start_time,
            "params": dict(run.data.params), "metrics": dict(run.data.metrics),
            "tags": dict(run.data.tags)}


def find_run(uri: str, ref: str) -> Optional[Dict[str, Any]]:
    """Return the run whose id or name is `ref` as a plain dict, or None when there is none.

    A name shared by several runs picks the newest sweep parent (tag ldm.sweep=parent), else the
    newest run.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if len(ref) == 32 and all(c in "0123456789abcdef" for c in ref):
        try:
            return _run_record(client.get_run(ref))
        except MlflowException:
            pass
    if "'" in ref:
        return None
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    runs = client.search_runs(experiments, filter_string=f"attributes.run_name = '{ref}'",
                              order_by=["attributes.start_time DESC"])
    if not runs:
        return None
    parents = [r for r in runs if r.data.tags.get("ldm.sweep") == "parent"]
    return _run_record((parents or runs)[0])


def child_runs(uri: str, parent: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Return the child runs (tag mlflow.parentRunId) of a run as plain dicts, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments,
                              filter_string=f"tags.mlflow.parentRunId = '{parent['run_id']}'",
                              order_by=["attributes.start_time ASC"], max_results=10000)
    return [_run_record(r) for r in runs]


def log_artifact_to_run(uri: str, run_id: str, path: str | Path,
                        artifact_path: Optional[str] = None) -> None:
    """Upload one file to an existing (possibly finished) run's artifacts."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).log_artifact(run_id, str(path), artifact_path)


def find_runs(uri: str, experiment: str) -> list:
    """Return the runs of one experiment (newest first); for summaries and tests."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])


def metric_history(uri: str, run_id: str, key: str) -> List[Tuple[int, float]]:
    """Return (step, value) of one metric of a run, by step; for summaries and plots."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)
