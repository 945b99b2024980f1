"""task=chain: run stages one after another, each a normal `python run.py <overrides>` process.

The stages are data (config), not code: a preset such as `experiment=quickstart` lists them, and
they find each other's outputs by name (prepared data by dataset/tokenizer/context, exports by
run_name). Each stage is its own process, run folder and mlflow run, exactly as if typed by hand.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from omegaconf import DictConfig, OmegaConf

from ldm.errors import ConfigError, LdmError

SUMMARY_METRICS = ("eval_nelbo", "eval_ppl_bound", "nelbo", "ppl_bound", "exact_match", "f1",
                   "mean_nfe", "seconds_per_answer", "tokens_per_second", "train.tokens")


def stage_commands(cfg: DictConfig) -> Dict[str, List[str]]:
    """Return stage name -> run.py argument list, with outputs and tracking passed through."""
    stages = OmegaConf.to_container(cfg.task.stages, resolve=True)
    if not stages:
        raise ConfigError("task=chain needs task.stages (stage name -> list of run.py overrides)")
    commands = {}
    for name, overrides in stages.items():
        if not isinstance(overrides, list) or not any(str(o).startswith("task=") for o in overrides):
            raise ConfigError(f"task.stages.{name} must be a list of overrides including task=<name>")
        if any(str(o) == "task=chain" for o in overrides):
            raise ConfigError(f"task.stages.{name} cannot run task=chain itself")
        passed = [f"paths.outputs={cfg.paths.outputs}", f"tracking={cfg.tracking.name}"]
        if cfg.tracking.uri:
            passed.append(f"tracking.uri={cfg.tracking.uri}")
        commands[name] = [*passed, *[str(o) for o in overrides]]
    return commands


def _value(overrides: List[str], key: str):
    for item in reversed(overrides):
        if item.startswith(key + "="):
            return item.split("=", 1)[1]
    return None


def run(cfg: DictConfig) -> float:
    """Run every stage in order; stop at the first failure; print a summary. Returns seconds."""
    from rich.console import Console
    from rich.rule import Rule

    console = Console()
    commands = stage_commands(cfg)
    run_py = Path(cfg.paths.root) / "run.py"
    started = time.perf_counter()
    timings = {}
    for i, (name, args) in enumerate(commands.items(), 1):
        shown = "python run.py " + " ".join(shlex.quote(a) for a in args[2:])
        console.print(Rule(f"stage {i}/{len(commands)}: {name}"))
        console.print(shown, markup=False, highlight=False)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(run_py), *args], cwd=cfg.paths.root,
                              env=dict(os.environ))
        timings[name] = time.perf_counter() - t0
        if proc.returncode != 0:
            raise LdmError(f"stage {name!r} failed with exit status {proc.returncode}: {shown}")
    total = time.perf_counter() - started
    print_summary(cfg, commands, timings, total, console)
    return total


def print_summary(cfg: DictConfig, commands: Dict[str, List[str]], timings: Dict[str, float],
                  total: float, console) -> None:
    """Print each stage's headline figures, example answers, exports and the mlflow command."""
    from rich.table import Table

    from ldm.tasks.common import tracking_target
    from ldm.tracking import find_runs

    outputs = Path(cfg.paths.outputs)
    uri = tracking_target(cfg)[0] if cfg.tracking.backend == "mlflow" else None
    table = Table(title=f"{cfg.run_name}: {total / 60:.1f} minutes")
    for col in ("stage", "task", "run", "seconds", "figures"):
        table.add_column(col)
    answers, exports = [], []
    for name, args in commands.items():
        task, run_name = _value(args, "task"), _value(args, "run_name")
        figures = ""
        if uri and run_name:
            runs = [r for r in find_runs(uri, task) if r.info.run_name == run_name]
            if runs:
                metrics = runs[0].data.metrics
                figures = ", ".join(f"{k} {metrics[k]:.4g}" for k in SUMMARY_METRICS if k in metrics)
        table.add_row(name, task, run_name or "", f"{timings[name]:.0f}", figures)
        if task in ("pretrain", "sft") and run_name:
            exports.append(outputs / "models" / run_name)
        if task == "sample" and run_name:
            samples = outputs / "runs" / "sample" / run_name / "samples.jsonl"
            if samples.is_file():
                answers += [json.loads(line) for line in samples.read_text().splitlines()[:4]]
    console.print(table)
    for item in answers:
        console.print(f"[bold]> {item.get('prompt', '')}[/bold]")
        console.print(f"  {item.get('answer', '')}", markup=False, highlight=False)
    for path in exports:
        console.print(f"export: {path}", markup=False, highlight=False)
    if uri:
        console.print(f"compare the runs: mlflow ui --backend-store-uri {uri}", markup=False,
                      highlight=False)
