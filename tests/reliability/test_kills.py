"""Real SIGKILLs at exact moments (ldm.faults.kill_point): a re-run resumes exactly.

Each chain kills one run at several moments in turn, re-running the same command each time, and
then lets it finish: the final weights must equal the uninterrupted run's bit for bit, every
re-run must resume from the newest complete checkpoint, and mlflow must hold every step's metrics
once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import local_text_dir

from .conftest import CHAT, TINY, TRAIN, error_line, record_kill, same_tree, same_weights

pytestmark = pytest.mark.slow

# (kill point, the checkpoint that is the newest complete one when it fires)
PRETRAIN_KILLS = [
    ("step:3", "step-0000002"),     # between steps: step 3 done, not checkpointed
    ("forward:4", "step-0000002"),  # inside step 4, between forward and backward
    ("save:4", "step-0000002"),     # checkpoint 4 written to its temporary folder, not renamed
    ("resume", "step-0000002"),     # while the re-run loads checkpoint 2
    ("export", "step-0000006"),     # inside the final export, after the last checkpoint
]
SFT_KILLS = [("step:3", "step-0000002"), ("save:4", "step-0000002")]


METRICS = ("loss", "grad_norm", "eval_nelbo")


def metric_history(outputs: Path, experiment: str, run_name: str) -> dict:
    """Return {key: [(step, value)]} of METRICS of the only mlflow run named `run_name`."""
    from mlflow.tracking import MlflowClient

    from ldm.runs import find_runs
    from ldm.tracking import local_store_uri

    runs = [r for r in find_runs(local_store_uri(outputs), experiment)
            if r.info.run_name == run_name]
    assert len(runs) == 1, f"{len(runs)} mlflow runs named {run_name}"
    client = MlflowClient(local_store_uri(outputs))
    run_id = runs[0].info.run_id
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in METRICS}


def kill_chain(launcher, command, outputs: Path, run_dir: Path, export: Path, kills):
    """Kill `command` at each point in turn, re-running it after each; return (problems, last run).

    The re-run after one kill is the next kill's victim; the re-run after the last kill finishes.
    """
    problems = {point: [] for point, _ in kills}
    ckpts = run_dir / "checkpoints"
    proc = launcher.run(command, outputs, env={"LDM_KILL_AT": kills[0][0]})
    for i, (point, newest) in enumerate(kills):
        found = problems[point]
        if proc.returncode != -9:
            found.append(f"not killed there (exit {proc.returncode}): {proc.stderr[-1500:]}")
        complete = sorted(p.name for p in ckpts.glob("step-*"))
        if complete[-1:] != [newest]:
            found.append(f"newest complete checkpoint {complete[-1:]} is not {newest}")
        if point.startswith("save:") and not (ckpts / f".step-{int(point[5:]):07d}.partial").is_dir():
            found.append("the kill did not leave the half-written checkpoint it should")
        if export.exists():
            found.append("an export exists although the run never finished")
        nxt = kills[i + 1][0] if i + 1 < len(kills) else None
        proc = launcher.run(command, outputs, env={"LDM_KILL_AT": nxt} if nxt else None)
        expect = f"resumed from {ckpts / newest} at step {int(newest[5:])}"
        # a re-run killed while resuming dies before it logs; the run after it shows the source
        if nxt != "resume" and expect not in proc.output:
            found.append(f"the re-run did not log {expect!r}: {proc.output[-1500:]}")
    if proc.returncode != 0:
        problems[kills[-1][0]].append(f"the last re-run failed: {proc.stderr[-1500:]}")
    return problems, proc


def check_same_run(problems, clean_run: Path, clean_export: Path, run_dir: Path, export: Path,
                   history: dict, clean_history: dict, steps: int) -> None:
    """Add to every point's problems what differs from the uninterrupted run."""
    common = []
    if not (export / "model.safetensors").is_file():
        common.append("no export after the final re-run")
    elif not same_weights(export / "model.safetensors", clean_export / "model.safetensors"):
        common.append("final weights differ from the uninterrupted run's")
    for ckpt in sorted((clean_run / "checkpoints").glob("step-*")):
        mine = run_dir / "checkpoints" / ckpt.name / "model.safetensors"
        if not mine.is_file() or not same_weights(mine, ckpt / "model.safetensors"):
            common.append(f"checkpoint {ckpt.name} differs from the uninterrupted run's")
    leftovers = [p.name for p in (run_dir / "checkpoints").glob(".*")]
    leftovers += [p.name for p in export.parent.glob(f".{export.name}.tmp-*")]
    if leftovers:
        common.append(f"temporary folders left behind: {leftovers}")
    logged = [step for step, _ in history["loss"]]
    if logged != list(range(1, steps + 1)):
        common.append(f"mlflow loss steps {logged}, expected each of 1..{steps} once")
    for key in history:
        if history[key] != clean_history[key]:
            common.append(f"mlflow {key} (step, value) pairs differ from the uninterrupted "
                          f"run's: {history[key]} vs {clean_history[key]}")
    for found in problems.values():
        found.extend(common)


def report(problems, label: str) -> None:
    """Record every kill point of a chain in the report, then fail on any problem."""
    for point, found in problems.items():
        record_kill(f"{label} {point}", not found)
    bad = {point: found for point, found in problems.items() if found}
    assert not bad, json.dumps(bad, indent=1)


def test_pretrain_killed_at_five_moments_resumes_to_identical_weights_and_metrics(world, launcher):
    outputs = world.outputs
    command = [*world.pretrain(), "run_name=killed"]
    run_dir, export = outputs / "runs" / "pretrain" / "killed", outputs / "models" / "killed"
    problems, _ = kill_chain(launcher, command, outputs, run_dir, export, PRETRAIN_KILLS)
    check_same_run(problems, world.clean_run, world.clean_export, run_dir, export,
                   metric_history(outputs, "pretrain", "killed"),
                   metric_history(outputs, "pretrain", "clean"), steps=6)
    report(problems, "pretrain")


@pytest.fixture(scope="module")
def sft_setup(world, launcher):
    """Chat data prepared for the clean pretraining export, and an uninterrupted SFT run.

    The rows are padded per batch (the chat recipes' layout) and drawn length-grouped, so the
    kills also prove that plan resumes exactly."""
    base = [*TINY, *CHAT, "dataset.padding=batch", "dataset.name=synthetic_batch",
            f"init_from={world.clean_export}"]
    proc = launcher.run(["task=prepare", *base, "tracking=off"], world.outputs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    command = ["task=sft", *base, *TRAIN, "task.max_steps=4", "task.save_every=2",
               "task.eval_samples=0"]
    proc = launcher.run([*command, "run_name=sft-clean"], world.outputs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return command


def test_sft_killed_at_two_moments_resumes_to_identical_weights_and_metrics(world, launcher,
                                                                          sft_setup):
    outputs = world.outputs
    run_dir, export = outputs / "runs" / "sft" / "sft-killed", outputs / "models" / "sft-killed"
    problems, _ = kill_chain(launcher, [*sft_setup, "run_name=sft-killed"], outputs, run_dir,
                             export, SFT_KILLS)
    check_same_run(problems, outputs / "runs" / "sft" / "sft-clean", outputs / "models" / "sft-clean",
                   run_dir, export, metric_history(outputs, "sft", "sft-killed"),
                   metric_history(outputs, "sft", "sft-clean"), steps=4)
    report(problems, "sft")


def test_prepare_killed_while_tokenizing_or_writing_leaves_nothing_readable_and_reruns_identically(
        world, launcher, tmp_path):
    from ldm.data.store import load_prepared
    from ldm.errors import DataError

    outputs = tmp_path / "outputs"
    command = ["task=prepare", *world.text, "dataset.test_split_pct=0.25", "task.batch_size=4",
               "tracking=off"]
    final = local_text_dir(outputs, world.paths, "bpe320", "ctx64")
    problems = {"prepare.tokenize:8": [], "prepare.write": [], "prepare.write (force, over data)": []}

    def unreadable(found: list) -> None:
        try:
            load_prepared(final)
            found.append("a later stage could load the killed run's data")
        except DataError:
            pass

    for point in ("prepare.tokenize:8", "prepare.write"):
        proc = launcher.run(command, outputs, env={"LDM_KILL_AT": point})
        if proc.returncode != -9:
            problems[point].append(f"not killed there (exit {proc.returncode}): {proc.stderr[-1500:]}")
        unreadable(problems[point])
    # the stage after prepare, as the user would run it, refuses the half-built data
    train = launcher.run(["task=pretrain", *world.text, *TRAIN, "task.max_steps=1", "tracking=off"],
                         outputs)
    if "no prepared data" not in error_line(train):
        problems["prepare.write"].append(f"pretrain did not refuse: {train.stderr[-500:]}")

    clean = launcher.run(command, outputs)
    assert clean.returncode == 0, clean.stderr[-3000:]
    differ = same_tree(final, world.data, ignore=("manifest.json",))
    mine, theirs = (json.loads((d / "manifest.json").read_text()) for d in (final, world.data))
    for volatile in ("seconds", "tokens_per_second"):
        mine.pop(volatile), theirs.pop(volatile)
    if differ or mine != theirs:
        for found in problems.values():
            found.append(f"the re-run's data differs from a clean run's: {differ or 'manifest'}")
    leftovers = [p.name for p in final.parent.glob(".*")]
    if leftovers:
        problems["prepare.write"].append(f"temporary folders left behind: {leftovers}")

    # rebuilding over complete data (task.force=true) and killed before the swap: the old stays
    point = "prepare.write (force, over data)"
    proc = launcher.run([*command, "task.force=true"], outputs, env={"LDM_KILL_AT": "prepare.write"})
    if proc.returncode != -9:
        problems[point].append(f"not killed there (exit {proc.returncode})")
    if same_tree(final, world.data, ignore=("manifest.json",)):
        problems[point].append("the complete data was damaged by a killed rebuild")
    try:
        load_prepared(final)
    except DataError as err:
        problems[point].append(f"the complete data is no longer readable: {err}")
    report(problems, "prepare")
