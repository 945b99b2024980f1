"""How fast can we sample, and what does it cost in accuracy? Presets and a sweep, one run.

    .venv/bin/python benchmarks/sampling_speed.py [--steps 2000] [--minutes-note]

1. Trains a small model on `synthetic_tasks` (exactly checkable answers) with ordinary run.py
   runs: a byte-level BPE of 300 tokens (nearly characters) trained on the chat texts, a tiny
   ModernBERT (or BERT, `--arch`) finetuned from scratch with the SFT objective.
2. Evaluates the export on the same held-out prompts with the `original`, `llada` and `fast`
   presets and a sweep of threshold x block length, reading exact match (overall and per task
   type), mean model calls (NFE) and seconds per answer from each `task=evaluate` run.
3. Prints the table, checks the expectations (fast needs >= 5x fewer calls than original at one
   step per token, with accuracy within 1 point of llada) and saves accuracy-vs-NFE as a PNG
   next to RESULTS.md, also logged to mlflow.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ARCHES = {
    "modernbert": ["model=modernbert_tiny", "model.arch.hidden_size=128",
                   "model.arch.num_hidden_layers=4", "model.arch.num_attention_heads=4",
                   "model.arch.intermediate_size=256"],
    "bert": ["model=modernbert_tiny", "model.architecture=bert", "model.arch.hidden_size=128",
             "model.arch.num_hidden_layers=4", "model.arch.num_attention_heads=4",
             "model.arch.intermediate_size=256", "+model.arch.type_vocab_size=1"],
}


def run(args, outputs: Path, quiet: bool = True) -> float:
    """Run `python run.py ARGS` under `outputs`; return its wall seconds; stop on failure."""
    env = dict(os.environ, LDM_OUTPUTS=str(outputs))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def settings(max_new: int) -> list:
    """Return (label, sampler overrides) for the presets and the sweep."""
    rows = [
        ("original (1 step/token)", ["sampler=original", f"sampler.steps={max_new}"]),
        ("original (8 steps)", ["sampler=original", "sampler.steps=8"]),
        ("llada", ["sampler=llada"]),
        ("fast", ["sampler=fast"]),
    ]
    for threshold in (0.7, 0.8, 0.95):
        for block in (8, max_new):
            rows.append((f"threshold {threshold}, block {block}",
                         ["sampler=fast", f"sampler.threshold={threshold}",
                          f"sampler.block_length={block}"]))
    return [(label, [*o, f"sampler.max_new_tokens={max_new}"]) for label, o in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--arch", choices=sorted(ARCHES), default="modernbert")
    parser.add_argument("--examples", type=int, default=6000)
    parser.add_argument("--eval-examples", type=int, default=300)
    parser.add_argument("--tasks", default="[copy,reverse,sort,max,add]")
    parser.add_argument("--max-new", type=int, default=32)
    parser.add_argument("--outputs", default=str(REPO / "outputs" / "benchmarks" / "sampling_speed"))
    args = parser.parse_args()
    outputs = Path(args.outputs)
    model = [*ARCHES[args.arch], "model.vocab_size=300", "context=ctx64"]
    data = ["dataset=synthetic_tasks", f"dataset.max_documents={args.examples}",
            f"dataset.task_types={args.tasks}"]
    run_name = f"sampling-{args.arch}-{args.steps}"

    seconds = run(["task=prepare", *model, *data, "tracking=off"], outputs)
    print(f"prepared {args.examples} synthetic examples ({seconds:.0f} s)", flush=True)
    seconds = run(["task=sft", *model, *data, f"run_name={run_name}", "task.resume=false",
                   f"task.max_steps={args.steps}", f"task.global_batch_size={args.batch}",
                   f"hardware.micro_batch_size={args.batch}", f"task.lr={args.lr}",
                   "task.warmup_steps=50", "task.eval_every=0", "task.eval_batches=1",
                   "task.eval_samples=0", "task.save_every=0", "task.keep_last=1",
                   "task.log_every=50"], outputs)
    print(f"trained {args.arch} for {args.steps} steps x {args.batch} in {seconds / 60:.1f} min",
          flush=True)
    export = outputs / "models" / run_name

    results = []
    for i, (label, overrides) in enumerate(settings(args.max_new)):
        name = f"{run_name}-eval-{i}"
        run(["task=evaluate", f"checkpoint={export}", *model, *data, *overrides,
             f"task.max_examples={args.eval_examples}", "task.max_rows=64", f"run_name={name}"],
            outputs)
        metrics = json.loads((outputs / "runs" / "evaluate" / name / "eval" / "metrics.json").read_text())
        results.append((label, metrics))
        print(f"  {label}: exact match {metrics['exact_match']:.1%}, NFE {metrics['mean_nfe']:.1f}",
              flush=True)

    types = sorted(k.split(".", 1)[1] for k in results[0][1] if k.startswith("exact_match."))
    print(f"\nheld-out exact match, {args.eval_examples} prompts, max_new_tokens {args.max_new}, "
          f"greedy except `original` (temperature 1)")
    header = f"{'setting':<28}{'exact':>7}" + "".join(f"{t:>8}" for t in types) + \
        f"{'NFE':>7}{'s/answer':>10}"
    print(header)
    for label, m in results:
        print(f"{label:<28}{m['exact_match']:>7.1%}" +
              "".join(f"{m.get('exact_match.' + t, 0):>8.1%}" for t in types) +
              f"{m['mean_nfe']:>7.1f}{m['seconds_per_answer']:>10.4f}")

    by = dict(results)
    original, llada, fast = by["original (1 step/token)"], by["llada"], by["fast"]
    fewer = original["mean_nfe"] / fast["mean_nfe"]
    gap = llada["exact_match"] - fast["exact_match"]  # how much accuracy fast gives up
    learned = [t for t in types if llada.get(f"exact_match.{t}", 0) >= 0.8]
    checks = [
        (f"llada >= 80% exact match on >= 2 task types ({', '.join(learned) or 'none'})",
         len(learned) >= 2),
        (f"fast needs >= 5x fewer model calls than original: {fewer:.1f}x", fewer >= 5),
        (f"fast loses at most 1 point vs llada: {-gap * 100:+.1f} points", gap <= 0.01),
    ]
    print()
    for text, ok in checks:
        print(f"[{'PASS' if ok else 'FAIL'}] {text}")
    plot(results, Path(__file__).with_name("sampling_speed.png"), outputs)


def plot(results, path: Path, outputs: Path) -> None:
    """Save accuracy vs NFE as a PNG and log it to mlflow (experiment `benchmarks`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, m in results:
        ax.scatter(m["mean_nfe"], 100 * m["exact_match"])
        ax.annotate(label, (m["mean_nfe"], 100 * m["exact_match"]), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("model calls per answer (NFE, log scale)")
    ax.set_ylabel("exact match on held-out synthetic tasks (%)")
    ax.set_title("sampling speed vs accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")

    from ldm.tracking import Tracker, local_artifact_uri, local_store_uri

    with Tracker(enabled=True, uri=local_store_uri(outputs), experiment="benchmarks",
                 artifact_location=local_artifact_uri(outputs), run_name="sampling_speed") as tracker:
        for label, m in results:
            key = re.sub(r"[^\w\-. /]", "", label).replace(" ", "_")  # mlflow's allowed characters
            tracker.log_metrics({f"{key}.exact_match": m["exact_match"],
                                 f"{key}.mean_nfe": m["mean_nfe"]}, step=0)
        tracker.log_artifact(path, "plots")


if __name__ == "__main__":
    main()
