"""task=chain: run stages one after another, each a normal `python run.py <overrides>` process.

The stages are data (config), not code: a preset such as `experiment=quickstart` lists them, and
they find each other's outputs by name (prepared data by dataset/tokenizer/context, exports by
run_name). Each stage is its own process, run folder and mlflow run, exactly as if typed by hand.

Reuse (`task.reuse`, on by default): a stage that finished before with exactly the same
overrides, and whose outputs (export, evaluation results) are still the ones it wrote, is not run
again. A record per stage lives in <outputs>/runs/chain/<run_name>/stages/<stage>.json. Once a
stage runs, every later stage runs too, since it may read what that stage rewrote. A training
stage that runs again with other overrides (or with task.reuse=false) starts afresh instead of
resuming the checkpoints of its previous configuration; one interrupted with the same overrides
resumes.

Lanes (`task.lanes`): stages that do not read each other's outputs can run at the same time, e.g.
two pipelines on a 2-core machine, one torch thread each. Each lane is a list of stage names run
in order (the reuse rule above applies per lane); every stage belongs to exactly one lane.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from ldm.errors import ConfigError, LdmError
from ldm.files import atomic_write_text
from ldm.tasks.chain_summary import print_summary, value_of


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
        # the chain's seed reaches every stage, unless a stage names its own
        passed = [f"paths.outputs={cfg.paths.outputs}", f"tracking={cfg.tracking.name}",
                  f"seed={cfg.seed}"]
        if cfg.tracking.uri:
            passed.append(f"tracking.uri={cfg.tracking.uri}")
        commands[name] = [*passed, *[str(o) for o in overrides]]
    return commands


SUMMARY_STAGE_KEYS = ("nelbo", "answers", "calls", "exports", "chat", "trained")
SUMMARY_KEYS = (*SUMMARY_STAGE_KEYS, "examples", "notes", "goal")


def check_summary(cfg: DictConfig, commands: Dict[str, List[str]]) -> None:
    """Raise ConfigError unless task.summary names only known keys and existing stages."""
    spec = OmegaConf.to_container(cfg.task.summary, resolve=True) if cfg.task.summary else {}
    for key, value in spec.items():
        if key not in SUMMARY_KEYS:
            raise ConfigError(f"task.summary.{key} is not known; accepted: {', '.join(SUMMARY_KEYS)}")
        if key not in SUMMARY_STAGE_KEYS:
            continue
        for stage in ([value] if isinstance(value, str) else list(value)):
            if stage not in commands:
                raise ConfigError(f"task.summary.{key} names stage {stage!r}, which task.stages "
                                  f"does not have; stages: {', '.join(commands)}")
    if len(spec.get("nelbo", [])) not in (0, 2) or len(spec.get("calls", [])) not in (0, 2):
        raise ConfigError("task.summary.nelbo and task.summary.calls name two stages each "
                          "([before, after], [sampler a, sampler b])")


def stage_outputs(outputs: Path, args: List[str]) -> List[Path]:
    """Return the files a stage leaves for later stages and the summary (by task and run_name)."""
    task, run_name = value_of(args, "task"), value_of(args, "run_name")
    if not run_name:
        return []
    if task in ("pretrain", "sft"):
        return [outputs / "models" / run_name / "config.json"]
    if task == "evaluate":
        return [outputs / "runs" / "evaluate" / run_name / "eval" / "metrics.json"]
    if task == "sample":
        return [outputs / "runs" / "sample" / run_name / "samples.jsonl"]
    return []


def records_dir(cfg: DictConfig) -> Path:
    """Return the folder of this chain's per-stage records."""
    from ldm.tasks.common import check_run_name

    return Path(cfg.paths.outputs) / "runs" / "chain" / check_run_name(cfg.run_name) / "stages"


def read_record(record: Path) -> Optional[dict]:
    """Return a stage's record (None when absent or unreadable)."""
    try:
        done = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) else None


def reusable(record: Path, args: List[str], outputs: Path) -> Optional[dict]:
    """Return the stage's record if it finished with these args and its outputs exist."""
    done = read_record(record)
    if done is None or done.get("status") != "finished" or done.get("args") != args:
        return None
    # the outputs must be the ones this stage wrote, not rewritten since by another command
    if done.get("outputs") != output_stamps(outputs, args):
        return None
    return done


def output_stamps(outputs: Path, args: List[str]) -> Optional[Dict[str, int]]:
    """Return {path: modification time in ns} of the stage's outputs; None if one is missing."""
    stamps = {}
    for path in stage_outputs(outputs, args):
        try:
            stamps[str(path)] = path.stat().st_mtime_ns
        except OSError:
            return None
    return stamps


def write_record(record: Path, args: List[str], outputs: Path,
                 seconds: Optional[float] = None) -> None:
    """Write the stage's record (running, or finished after `seconds`) through a temporary file."""
    record.parent.mkdir(parents=True, exist_ok=True)
    content = {"args": args, "status": "running"}
    if seconds is not None:
        content = {"args": args, "status": "finished", "seconds": round(seconds, 1),
                   "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "outputs": output_stamps(outputs, args)}
    atomic_write_text(record, json.dumps(content, indent=2) + "\n")


def fresh_start(previous: Optional[dict], args: List[str], reuse: bool) -> List[str]:
    """Return overrides that keep a training stage from resuming another configuration's run.

    A training stage resumes its run folder's latest checkpoint by default: right after an
    interruption (its record says running, with the same overrides), wrong when the checkpoints
    were made with other overrides or the user asked to run everything again.
    """
    if value_of(args, "task") not in ("pretrain", "sft") or previous is None:
        return []
    if reuse and previous.get("args") == args:
        return []
    return ["task.resume=false"]


def stage_lanes(cfg: DictConfig, commands: Dict[str, List[str]]) -> List[List[str]]:
    """Return the lanes (lists of stage names run in order); ConfigError if task.lanes is bad."""
    lanes = OmegaConf.to_container(cfg.task.lanes, resolve=True) if cfg.task.get("lanes") else []
    if not lanes:
        return [list(commands)]
    seen: Dict[str, int] = {}
    for i, lane in enumerate(lanes):
        if not isinstance(lane, list) or not lane:
            raise ConfigError(f"task.lanes[{i}] must be a non-empty list of stage names, got {lane!r}")
        for name in lane:
            if name not in commands:
                raise ConfigError(f"task.lanes[{i}] names stage {name!r}, which task.stages does "
                                  f"not have; stages: {', '.join(commands)}")
            if name in seen:
                raise ConfigError(f"task.lanes names stage {name!r} twice (lanes {seen[name]} and "
                                  f"{i}); put each stage in exactly one lane")
            seen[name] = i
    missing = [name for name in commands if name not in seen]
    if missing:
        raise ConfigError(f"task.lanes leaves out stage(s) {', '.join(missing)}; put each stage "
                          "in exactly one lane (or leave task.lanes empty to run them in order)")
    return lanes


def log_tail(path: Path, lines: int = 30) -> str:
    """Return the last `lines` lines of a stage's log file (progress bars cut at their last state)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])


def run(cfg: DictConfig) -> float:
    """Run (or reuse) every stage, lane by lane; stop at the first failure; print a summary.

    With one lane (the default) the stages run one after another with their output on the
    terminal. With several (`task.lanes`) the lanes run at the same time, each in its own thread
    starting one process per stage, and each stage's output goes to a log file under the chain's
    run folder; a failure lets the stages already running finish and starts no other.
    Returns the seconds the chain took.
    """
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a log file: keep the summary table's rows on one line each
        console = Console(width=160)
    commands = stage_commands(cfg)
    check_summary(cfg, commands)
    lanes = stage_lanes(cfg, commands)
    outputs = Path(cfg.paths.outputs)
    records = records_dir(cfg)
    started = time.perf_counter()
    timings: Dict[str, float] = {}
    reused: Dict[str, dict] = {}
    failures: List[str] = []
    stop = threading.Event()
    env = {**os.environ, **{k: str(v) for k, v in (cfg.task.env or {}).items()}}
    order = {name: i for i, name in enumerate(commands, 1)}

    def run_lane(lane: List[str]) -> None:
        rerunning = not cfg.task.reuse
        for name in lane:
            if stop.is_set():
                return
            args = commands[name]
            label = f"stage {order[name]}/{len(commands)}: {name}"
            record = records / f"{name}.json"
            done = None if rerunning else reusable(record, args, outputs)
            if done is not None:
                reused[name] = done
                timings[name] = float(done.get("seconds", 0.0))
                console.print(f"{label}: reused (finished {done.get('finished', '?')} with the "
                              "same overrides)", markup=False, highlight=False)
                continue
            rerunning = True  # a later stage of this lane may read what this one rewrites
            try:
                timings[name] = run_stage(cfg, name, label, args, record, env, console,
                                          log=len(lanes) > 1)
            except LdmError as err:
                failures.append(str(err))
                stop.set()
                return

    if len(lanes) == 1:
        run_lane(lanes[0])
    else:
        console.print(f"{len(lanes)} lanes at the same time: " + "; ".join(
            " -> ".join(lane) for lane in lanes), markup=False, highlight=False)
        threads = [threading.Thread(target=run_lane, args=(lane,), daemon=True) for lane in lanes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if failures:
        raise LdmError(failures[0])
    total = time.perf_counter() - started
    print_summary(cfg, commands, timings, reused, total, console)
    return total


def run_stage(cfg: DictConfig, name: str, label: str, args: List[str], record: Path,
              env: Dict[str, str], console, log: bool) -> float:
    """Run one stage's process; return its seconds; LdmError naming the command if it fails.

    `log`: send the process's output to <chain run folder>/logs/<stage>.log instead of the
    terminal (lanes running at the same time would interleave their lines).
    """
    from rich.rule import Rule

    shown = "python run.py " + " ".join(shlex.quote(a) for a in args[2:])
    extra = fresh_start(read_record(record), args, bool(cfg.task.reuse))
    write_record(record, args, Path(cfg.paths.outputs))
    command = [sys.executable, str(Path(cfg.paths.root) / "run.py"), *args, *extra]
    t0 = time.perf_counter()
    if log:
        log_file = record.parent.parent / "logs" / f"{name}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        console.print(f"{label}: started: {shown}{''.join(f' {e}' for e in extra)}\n"
                      f"  output: {log_file}", markup=False, highlight=False)
        with open(log_file, "w") as out:
            proc = subprocess.run(command, cwd=cfg.paths.root, env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
    else:
        console.print(Rule(label))
        console.print(shown + "".join(f" {e}" for e in extra), markup=False, highlight=False)
        proc = subprocess.run(command, cwd=cfg.paths.root, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = f"\n{log_tail(log_file)}\n(the whole output: {log_file})" if log else ""
        raise LdmError(f"stage {name!r} failed with exit status {proc.returncode}: {shown}{tail}")
    if log:
        console.print(f"{label}: finished in {seconds:.0f} s", markup=False, highlight=False)
    write_record(record, args, Path(cfg.paths.outputs), seconds)
    return seconds
