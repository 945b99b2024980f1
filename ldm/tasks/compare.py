"""task=compare: the child runs of one sweep as a table (best first) and a plot of the metric.

    python run.py task=compare compare_run=<parent run id | parent run name | sweep folder>

The headline metric of a child is its tag `ldm.headline_metric` (direction in
`ldm.headline_direction`; task=evaluate sets both), else `eval_nelbo` (lower is better) for
pretrain and sft runs; `task.metric` / `task.direction` choose explicitly. The plot (metric
against the swept parameter) goes to the compare run folder and to the parent run's artifacts.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig

from ldm import runs
from ldm.errors import ConfigError, LdmError
from ldm.tasks.common import (PARENT_RUN_FILE, check_tracking, read_parent_run_id, run_dir,
                              tracking_target)

log = logging.getLogger("ldm")

TRAINING_TASKS = ("pretrain", "sft")
LOWER_IS_BETTER = re.compile(r"nelbo|loss|ppl|perplexity|error|time|seconds", re.IGNORECASE)
IGNORED_PARAMS = ("run_name",)  # differs by construction in every sweep


def resolve_parent(uri: str, ref: str) -> Dict[str, Any]:
    """Return the parent run named by id, name or sweep folder; LdmError when there is none."""
    folder = Path(ref).expanduser()
    if folder.is_dir():
        run_id = read_parent_run_id(folder)
        if run_id is None:
            raise LdmError(f"compare_run={ref!r} is a folder without {PARENT_RUN_FILE}; "
                           "pass a sweep folder (outputs/sweeps/<time>_<task>), a run id or name")
        ref = run_id
    run = runs.find_run(uri, ref)
    if run is None:
        raise LdmError(f"compare_run={ref!r}: no mlflow run with this id or name in {uri}; pass "
                       "the parent run of a sweep (its id, its name sweep-<time>_<task>, or "
                       "its folder outputs/sweeps/<time>_<task>)")
    return run


def headline(child: Dict[str, Any], metric: Optional[str], direction: str) -> Tuple[Optional[str], bool]:
    """Return (metric name, lower is better) for one child run."""
    tags = child["tags"]
    name = metric or tags.get("ldm.headline_metric")
    if name is None and tags.get("ldm.task") in TRAINING_TASKS:
        name = "eval_nelbo"
    if name is None:
        return None, True
    if direction != "auto":
        return name, direction == "lower"
    if tags.get("ldm.headline_metric") == name and tags.get("ldm.headline_direction"):
        return name, tags["ldm.headline_direction"] == "lower"
    return name, bool(LOWER_IS_BETTER.search(name))


def varying_params(children: Sequence[Dict[str, Any]], swept: Sequence[str]) -> List[str]:
    """Return the params whose values differ between children, the swept keys first."""
    keys = sorted({k for c in children for k in c["params"]} - set(IGNORED_PARAMS))
    differing = [k for k in keys if len({c["params"].get(k) for c in children}) > 1]
    first = [k for k in swept if k in differing]
    return first + [k for k in differing if k not in first]


def _number(text: Optional[str]) -> Optional[float]:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def format_table(rows: List[Dict[str, Any]], columns: List[str], metric: str) -> str:
    """Return the rows as an aligned text table."""
    header = ["rank", *columns, metric, "status", "run"]
    body = []
    for i, row in enumerate(rows, 1):
        value = row["value"]
        shown = "-" if value is None else f"{value:.4f}"
        body.append([str(i), *[str(row["params"].get(c, "-")) for c in columns], shown,
                     row["status"], row["run_name"] or row["run_id"]])
    widths = [max(len(r[j]) for r in [header, *body]) for j in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(rows: List[Dict[str, Any]], columns: List[str], metric: str, lower: bool,
         title: str, target: Path) -> Path:
    """Save the metric against the first swept parameter (one line per other combination)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = columns[0] if columns else None
    scored = [r for r in rows if r["value"] is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if x_key is None:
        ax.bar([r["run_name"] or r["run_id"][:8] for r in scored], [r["value"] for r in scored])
    else:
        xs = [r["params"].get(x_key) for r in scored]
        numeric = all(_number(x) is not None for x in xs)
        order = sorted(set(xs), key=lambda x: (_number(x) if numeric else 0, str(x)))
        position = {x: (_number(x) if numeric else i) for i, x in enumerate(order)}
        series: Dict[str, List[Tuple[float, float]]] = {}
        for r in scored:
            label = ", ".join(f"{c}={r['params'].get(c)}" for c in columns[1:]) or metric
            series.setdefault(label, []).append((position[r["params"].get(x_key)], r["value"]))
        for label, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        if numeric:
            values = [position[x] for x in order]
            if min(values) > 0 and max(values) / min(values) >= 20:
                ax.set_xscale("log")
        else:
            ax.set_xticks(range(len(order)), order)
        ax.set_xlabel(x_key)
        if len(series) > 1:
            ax.legend(fontsize=7)
    ax.set_ylabel(f"{metric} ({'lower' if lower else 'higher'} is better)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target


def run(cfg: DictConfig) -> float:
    """Print the sweep's children best first, save and log the plot; return the best value."""
    ref = cfg.compare_run
    if not ref:
        raise ConfigError("task=compare needs compare_run=<parent run id, parent run name or sweep "
                          "folder> (the sweep prints its folder; the parent run is named "
                          "sweep-<time>_<task>)")
    if cfg.task.direction not in ("auto", "lower", "higher"):
        raise ConfigError(f"task.direction={cfg.task.direction!r} is not known; use auto, lower "
                          "or higher")
    check_tracking(cfg)
    if cfg.tracking.backend != "mlflow":
        raise ConfigError("task=compare reads the mlflow store; use tracking=mlflow_local or "
                          "tracking=mlflow_server tracking.uri=..., not tracking=off")
    uri, _, _ = tracking_target(cfg)
    parent = resolve_parent(uri, str(ref))
    children = runs.child_runs(uri, parent)
    if not children:
        raise LdmError(f"compare_run={ref!r}: mlflow run {parent['run_id']} "
                       f"({parent['run_name']}) has no child runs; pass the parent run of a "
                       "multirun (tag ldm.sweep=parent)")
    picks = [headline(c, cfg.task.metric, cfg.task.direction) for c in children]
    names = Counter(name for name, _ in picks if name)
    if not names:
        raise LdmError(f"the child runs of {parent['run_name']} name no headline metric; pick "
                       f"one with task.metric=<name> (logged: {_metric_names(children)})")
    if len(names) > 1:
        raise LdmError(f"the child runs of {parent['run_name']} have different headline metrics "
                       f"({', '.join(sorted(names))}); pick one with task.metric=<name>")
    metric = next(iter(names))
    lower = next(low for name, low in picks if name == metric)
    swept = [k.removeprefix("sweep.") for k in parent["params"] if k.startswith("sweep.")]
    columns = varying_params(children, swept)
    rows = [dict(c, value=c["metrics"].get(metric)) for c in children]
    rows = [dict(r, value=None if r["value"] is None or math.isnan(r["value"]) else r["value"])
            for r in rows]
    sign = 1.0 if lower else -1.0
    rows.sort(key=lambda r: (r["value"] is None, sign * (r["value"] or 0.0)))

    print(f"sweep {parent['run_name']} ({parent['run_id']}): {len(rows)} runs, {metric} "
          f"({'lower' if lower else 'higher'} is better), best first")
    print(format_table(rows, columns, metric))
    folder = run_dir(cfg)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", parent["run_name"] or parent["run_id"])
    (folder / f"{stem}.txt").write_text(format_table(rows, columns, metric) + "\n")
    image = plot(rows, columns, metric, lower, f"{parent['run_name']}: {metric}",
                 folder / f"{stem}_{metric}.png")
    try:
        runs.log_artifact_to_run(uri, parent["run_id"], image, "compare")
    except Exception as err:  # noqa: BLE001 - the plot is on disk either way
        log.warning("could not log the plot to run %s: %s", parent["run_id"], err)
    print(f"plot: {image} (also in the parent run's artifacts under compare/)")
    best = rows[0]["value"]
    return float(best) if best is not None else float("nan")


def _metric_names(children: Sequence[Dict[str, Any]]) -> str:
    names = sorted({k for c in children for k in c["metrics"]})
    return ", ".join(names[:20]) or "none"
