"""The summary a chain prints at its end: stage figures, answers, calls, exports, commands.

What to show is data in the preset (`task.summary`), by stage name:
  nelbo: [before, after]   two evaluate stages of the same data (held-out NELBO before and after)
  answers: <stage>         an evaluate stage on chat data: exact match (per type) and examples
  examples: N              how many of its held-out answers to print (the first N, whatever they are)
  calls: [a, b]            evaluate stages on the same prompts: mean model calls per answer
  exports: [stages]        training stages whose exports are loaded with AutoModelForMaskedLM
  chat: <stage>            the training stage whose export the chat command names
  trained: <stage>         a training stage: how its training ended (steps, early stop, cap hit)
  goal: 0.95               the exact match every task type of `answers` should reach; a type
                           below it gets one plain line saying the run missed it
  notes: [lines]           printed last, as they are
Evaluation figures come from each run folder's eval/metrics.json, so they print with tracking off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

TRAIN_FIGURES = ("eval_nelbo", "tokens_per_second", "train.tokens")
EVAL_FIGURES = ("nelbo", "exact_match", "exact_match_unseen", "mean_nfe", "seconds_per_answer")


def value_of(overrides: List[str], key: str) -> Optional[str]:
    """Return the last `key=value` override's value in `overrides`, or None."""
    for item in reversed(overrides):
        if item.startswith(key + "="):
            return item.split("=", 1)[1]
    return None


def eval_folder(outputs: Path, args: List[str]) -> Optional[Path]:
    """Return the eval/ folder of an evaluate stage (None for other stages)."""
    run_name = value_of(args, "run_name")
    if value_of(args, "task") != "evaluate" or not run_name:
        return None
    return outputs / "runs" / "evaluate" / run_name / "eval"


def read_metrics(outputs: Path, args: List[str]) -> Dict[str, float]:
    """Return an evaluate stage's metrics.json ({} when absent)."""
    folder = eval_folder(outputs, args)
    path = folder / "metrics.json" if folder else None
    return json.loads(path.read_text()) if path and path.is_file() else {}


def read_results(outputs: Path, args: List[str]) -> List[dict]:
    """Return an evaluate stage's per-answer records ([] when absent)."""
    folder = eval_folder(outputs, args)
    path = folder / "results.jsonl" if folder else None
    if not path or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plain_prompt(prompt: str) -> str:
    """Return a chat prompt without its role and end markers."""
    from ldm.tokenizer import CHAT_TOKENS

    for token in CHAT_TOKENS:
        prompt = prompt.replace(token, " ")
    return " ".join(prompt.split())


def per_type(metrics: Dict[str, float], prefix: str) -> str:
    """Return "type 93%, ..." from the `prefix.<type>` metrics."""
    return ", ".join(f"{k.split('.', 1)[1]} {v:.0%}" for k, v in sorted(metrics.items())
                     if k.startswith(prefix + "."))


def check_export_loads(path: Path) -> str:
    """Return how `path` loads with AutoModelForMaskedLM: its class and size, or the error."""
    try:
        from transformers import AutoModelForMaskedLM

        model = AutoModelForMaskedLM.from_pretrained(str(path))
    except Exception as err:  # noqa: BLE001 - a failed load is reported, whatever its cause
        return f"does NOT load with AutoModelForMaskedLM: {type(err).__name__}: {err}"
    size = sum(p.numel() for p in model.parameters()) / 1e6
    return f"loads with AutoModelForMaskedLM as {type(model).__name__}, {size:.1f}M parameters"


def train_figures(cfg: DictConfig, args: List[str]) -> Dict[str, float]:
    """Return a training stage's last logged figures, read back from the tracking store."""
    if cfg.tracking.backend != "mlflow":
        return {}
    from ldm.tasks.common import tracking_target
    from ldm.runs import find_runs

    runs = [r for r in find_runs(tracking_target(cfg)[0], value_of(args, "task"))
            if r.info.run_name == value_of(args, "run_name")]
    return dict(runs[0].data.metrics) if runs else {}


def goal_line(metrics: Dict[str, float], goal: float) -> str:
    """Return one line: every task type at or above `goal` exact match, or which ones missed."""
    scores = {k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith("exact_match.")}
    if not scores:
        return f"MISSED the goal: no held-out answers were scored (goal: {goal:.0%} on every type)"
    missed = {k: v for k, v in sorted(scores.items()) if v < goal}
    if missed:
        return ("MISSED the goal of " + f"{goal:.0%} held-out exact match on every task type: "
                + ", ".join(f"{k} {v:.1%}" for k, v in missed.items())
                + "; train longer (the training stage's task.max_steps, task.max_minutes) or "
                "see benchmarks/RESULTS.md")
    return f"goal met: every task type at >= {goal:.0%} held-out exact match"


def training_line(outputs: Path, args: List[str]) -> str:
    """Return how a training stage ended, from its export's ldm_export.json."""
    from ldm.export import INFO_FILE

    path = outputs / "models" / (value_of(args, "run_name") or "") / INFO_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"training: no export information at {path}"
    step, cap = info.get("step"), info.get("max_steps")
    stopped = info.get("stopped")
    if stopped and stopped.startswith("target reached"):
        return f"training stopped at step {step} of at most {cap}: {stopped}"
    if stopped:
        return f"training HIT ITS CAP at step {step} of at most {cap}, before its target: {stopped}"
    target = value_of(args, "task.target_exact_match")
    if target not in (None, "null"):
        return (f"training HIT ITS STEP CAP ({step} steps) before its target (held-out exact "
                f"match >= {float(target):.0%} on every type)")
    return f"training ran its {step} steps"


def this_command() -> str:
    """Return the command line of this run (run.py and its overrides)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra app
        overrides = []
    return " ".join(["python run.py", *overrides])


def print_summary(cfg: DictConfig, commands: Dict[str, List[str]], timings: Dict[str, float],
                  reused: Dict[str, dict], total: float, console) -> None:
    """Print the stage table and what `task.summary` asks for (see the module docstring)."""
    from rich.table import Table

    outputs = Path(cfg.paths.outputs)
    spec = OmegaConf.to_container(cfg.task.summary, resolve=True) if cfg.task.summary else {}
    table = Table(title=f"{cfg.run_name}: {total / 60:.1f} minutes")
    for col in ("stage", "task", "run", "seconds", "figures"):
        table.add_column(col)
    for name, args in commands.items():
        task = value_of(args, "task")
        if task == "evaluate":
            metrics = read_metrics(outputs, args)
            keys = EVAL_FIGURES
        else:
            metrics = train_figures(cfg, args) if task in ("pretrain", "sft") else {}
            keys = TRAIN_FIGURES
        figures = ", ".join(f"{k} {metrics[k]:.4g}" for k in keys if k in metrics)
        seconds = f"{timings[name]:.0f}" + (" (reused)" if name in reused else "")
        table.add_row(name, task, value_of(args, "run_name") or "", seconds, figures)
    console.print(table)

    def say(text: str = "") -> None:
        console.print(text, markup=False, highlight=False)

    if spec.get("nelbo"):
        before, after = (commands[s] for s in spec["nelbo"])
        nb, na = read_metrics(outputs, before), read_metrics(outputs, after)
        if "nelbo" in nb and "nelbo" in na:
            say(f"{value_of(after, 'checkpoint')}: diffusion pretraining of model="
                f"{value_of(before, 'model')} on dataset={value_of(before, 'dataset')}: held-out "
                f"NELBO/token {nb['nelbo']:.3f} before -> {na['nelbo']:.3f} after "
                f"({int(na.get('rows', 0))} held-out rows, the same t grid and masks)")
    for stage in spec.get("exports", []):
        path = outputs / "models" / value_of(commands[stage], "run_name")
        say(f"export {path}: {check_export_loads(path)}")

    answers = spec.get("answers")
    if answers:
        metrics = read_metrics(outputs, commands[answers])
        records = read_results(outputs, commands[answers])
        sampler = value_of(commands[answers], "sampler")
        if "exact_match" in metrics:
            say()
            say(f"held-out exact match, sampler={sampler}, {len(records)} prompts of the test "
                f"split: {metrics['exact_match']:.1%} ({per_type(metrics, 'exact_match')})")
        if "exact_match_unseen" in metrics:
            say(f"  of which the {int(metrics['unseen_examples'])} prompts that are not also "
                f"training prompts: {metrics['exact_match_unseen']:.1%} "
                f"({per_type(metrics, 'exact_match_unseen')})")
        shown = records[:int(spec.get("examples", 0))]
        if shown:
            say(f"the first {len(shown)} held-out prompts:")
        for item in shown:
            mark = "right" if item.get("correct") else f"wrong, expected {item.get('reference')!r}"
            if item.get("seen_in_training"):
                mark += "; also a training prompt"
            say(f"  > {plain_prompt(item.get('prompt', ''))}")
            say(f"    {item.get('answer', '')!r}  ({mark})")
    if spec.get("calls"):
        parts = []
        for stage in spec["calls"]:
            m = read_metrics(outputs, commands[stage])
            if "mean_nfe" in m:
                parts.append(f"{value_of(commands[stage], 'sampler')} {m['mean_nfe']:.1f} "
                             f"(exact match {m.get('exact_match', float('nan')):.1%})")
        if parts:
            say(f"mean model calls per answer on the same {int(m.get('examples', 0))} prompts: "
                + ", ".join(parts))

    goal = spec.get("goal")
    if answers and goal is not None:
        say(goal_line(read_metrics(outputs, commands[answers]), float(goal)))
    if spec.get("trained"):
        say(training_line(outputs, commands[spec["trained"]]))

    say()
    if spec.get("chat"):
        export = outputs / "models" / value_of(commands[spec["chat"]], "run_name")
        say(f"chat with it: python run.py task=sample checkpoint={export} interactive=true")
    if cfg.tracking.backend == "mlflow":
        from ldm.tasks.common import tracking_target

        say(f"compare the runs: mlflow ui --backend-store-uri {tracking_target(cfg)[0]}")
    if reused:
        say(f"reused {len(reused)} of {len(commands)} finished stages ({', '.join(reused)}); "
            f"to run them again: {this_command()} task.reuse=false")
    for line in spec.get("notes", []):
        say(line)
