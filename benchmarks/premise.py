"""Does the pretrained encoder matter? Tables and plots what `python run.py experiment=premise` made.

    .venv/bin/python benchmarks/premise.py [--outputs outputs] [--run-name premise] [--seeds 0 1 2]
        [--png benchmarks/premise.png] [--no-mlflow]

For each arm (a: pretrained minilm, b: the same architecture with random weights, c: a after
diffusion pretraining) and seed it reads the evaluate stages' files: the word questions' exact
match per type (eval/metrics.json of <run>-<arm>-s<seed>-words) and held-out answer NELBO, the
mix's held-out FAQ pairs (eval/results.jsonl of ...-faq; word questions left out) scored by token
F1; and from mlflow the SFT run's held-out NELBO at each evaluation (the learning curve) and its
tokens_seen. Prints a markdown table (mean +- standard deviation over seeds, and the per-seed
values), the paired differences a-b and c-a with a normal-approximation 95% interval over the
pooled held-out answers, draws the learning curves (mean line, min-max band per arm) to a PNG,
and logs both to mlflow (experiment premise, run <run-name>-summary).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]

ARMS = {"a": "pretrained minilm", "b": "random init (same arch)", "c": "pretrained + diffusion pretrain"}
WORD_TYPES = ("antonym", "plural", "category", "synonym")
CURVE = "eval_answer_nelbo"


def is_word_question(prompt: str) -> bool:
    """Return whether a decoded held-out prompt is one of the word questions (not an FAQ)."""
    from ldm.data.lexicon import PROMPTS

    squashed = prompt.replace(" ", "").lower()
    return any(p.split("{")[0].replace(" ", "").lower() in squashed for p in PROMPTS.values())


def read_arm_seed(outputs: Path, run: str) -> Dict[str, object]:
    """Return one SFT export's figures from its two evaluate stages."""
    evals = outputs / "runs" / "evaluate"
    words = json.loads((evals / f"{run}-words" / "eval" / "metrics.json").read_text())
    faq_metrics = json.loads((evals / f"{run}-faq" / "eval" / "metrics.json").read_text())
    records = [json.loads(l) for l in (evals / f"{run}-faq" / "eval" / "results.jsonl").open()]
    faq = [r for r in records if not is_word_question(r["prompt"])]
    word_records = [json.loads(l) for l in (evals / f"{run}-words" / "eval" / "results.jsonl").open()]
    out = {"words_em": words["exact_match"], "words_nelbo": words["answer_nelbo"],
           "mix_nelbo": faq_metrics["answer_nelbo"], "faq_f1": statistics.fmean(r["f1"] for r in faq),
           "faq_n": len(faq), "words_n": len(word_records),
           "faq_f1s": [r["f1"] for r in faq], "correct": [bool(r["correct"]) for r in word_records],
           "examples": word_records,
           # collapse: an undertrained model answers everything alike (or nothing)
           "faq_empty": sum(not r["answer"] for r in faq) / max(len(faq), 1),
           "words_distinct": len({r["answer"] for r in word_records})}
    for t in WORD_TYPES:
        out[f"em_{t}"] = words.get(f"exact_match.{t}", float("nan"))
    return out


def sft_runs(outputs: Path, names: List[str]) -> Dict[str, object]:
    """Return run name -> the newest finished mlflow SFT run of that name (absent: left out)."""
    from ldm import tracking
    from ldm.runs import find_runs

    uri = tracking.local_store_uri(outputs)
    found = {}
    for run in find_runs(uri, "sft"):
        name = run.data.tags.get("mlflow.runName")
        if name in names and name not in found and run.info.status == "FINISHED":
            found[name] = run
    return found


def mean_sd(values: List[float]) -> str:
    """Return 'mean +- sd' of the values (sd over seeds)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def difference(rows: Dict[str, List[dict]], x: str, y: str, key: str, pooled: str) -> str:
    """Return the mean paired difference x - y over seeds and a 95% normal interval (pooled)."""
    xs = [v for r in rows[x] for v in r[pooled]]
    ys = [v for r in rows[y] for v in r[pooled]]
    mx, my = statistics.fmean(map(float, xs)), statistics.fmean(map(float, ys))
    se = math.sqrt(statistics.pvariance(list(map(float, xs))) / len(xs)
                   + statistics.pvariance(list(map(float, ys))) / len(ys))
    per_seed = [a[key] - b[key] for a, b in zip(rows[x], rows[y])]
    return (f"{mx - my:+.3f} (95% ± {1.96 * se:.3f}; per seed "
            f"{', '.join(f'{d:+.3f}' for d in per_seed)})")


def seed_difference(rows: Dict[str, List[dict]], x: str, y: str, key: str) -> str:
    """Return the mean over seeds of x - y (paired by seed) with the per-seed values."""
    per_seed = [a[key] - b[key] for a, b in zip(rows[x], rows[y])]
    return (f"{statistics.fmean(per_seed):+.3f} (per seed "
            f"{', '.join(f'{d:+.3f}' for d in per_seed)})")


def table(rows: Dict[str, List[dict]], tokens: Dict[str, float]) -> str:
    """Return the markdown table of every arm's figures (mean ± sd over seeds, then per seed)."""
    cols = ["words_em", *[f"em_{t}" for t in WORD_TYPES], "faq_f1", "words_nelbo", "mix_nelbo"]
    head = ("| arm | seeds | word EM (all) | antonym | plural | category | synonym | FAQ F1 "
            "| word answer NELBO | mix answer NELBO | SFT tokens |")
    lines = [head, "|" + " --- |" * 11]
    for arm, seeds in rows.items():
        if not seeds:
            continue
        cells = [mean_sd([s[c] for s in seeds]) for c in cols]
        lines.append(f"| {arm}: {ARMS[arm]} | {len(seeds)} | " + " | ".join(cells)
                     + f" | {tokens.get(arm, float('nan')):,.0f} |")
    lines.append("")
    lines.append("per seed (word EM / FAQ F1 / word answer NELBO / mix answer NELBO / distinct "
                 "word answers / empty FAQ answers):")
    for arm, seeds in rows.items():
        lines.append(f"- {arm}: " + "; ".join(
            f"s{s['seed']} {s['words_em']:.3f} / {s['faq_f1']:.3f} / {s['words_nelbo']:.3f} / "
            f"{s['mix_nelbo']:.3f} / {s['words_distinct']} of {s['words_n']} / {s['faq_empty']:.0%}"
            for s in seeds))
    return "\n".join(lines)


def plot(curves: Dict[str, List[List[tuple]]], png: Path) -> Optional[Path]:
    """Draw held-out answer NELBO vs SFT step: mean line and min-max band per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for arm, runs in curves.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        steps = sorted(set.intersection(*[{s for s, _ in r} for r in runs]))
        values = [[dict(r)[s] for r in runs] for s in steps]
        ax.plot(steps, [statistics.fmean(v) for v in values], label=f"{arm}: {ARMS[arm]} ({len(runs)} seeds)")
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.25)
    ax.set_xlabel("SFT step")
    ax.set_ylabel("held-out answer NELBO / token (mix)")
    ax.set_title("experiment=premise: SFT learning curves (band: min-max over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return png


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--outputs", type=Path, default=REPO / "outputs")
    parser.add_argument("--run-name", default="premise")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--png", type=Path, default=REPO / "benchmarks" / "premise.png")
    parser.add_argument("--examples", type=int, default=8, help="word answers shown side by side")
    parser.add_argument("--no-mlflow", action="store_true", help="no learning curves, no logging")
    args = parser.parse_args()

    rows: Dict[str, List[dict]] = {arm: [] for arm in ARMS}
    missing = []
    for arm in ARMS:
        for seed in args.seeds:
            run = f"{args.run_name}-{arm}-s{seed}"
            try:
                rows[arm].append({"seed": seed, "run": run, **read_arm_seed(args.outputs, run)})
            except FileNotFoundError:
                missing.append(run)
    tokens: Dict[str, float] = {}
    curves: Dict[str, List[List[tuple]]] = {arm: [] for arm in ARMS}
    if not args.no_mlflow:
        from ldm import tracking
        from ldm.runs import metric_history

        names = [s["run"] for arm in ARMS for s in rows[arm]]
        found = sft_runs(args.outputs, names)
        uri = tracking.local_store_uri(args.outputs)
        for arm in ARMS:
            for s in rows[arm]:
                run = found.get(s["run"])
                if run is None:
                    continue
                tokens[arm] = run.data.metrics.get("tokens_seen", float("nan"))
                curves[arm].append(metric_history(uri, run.info.run_id, CURVE))
    print(table(rows, tokens))
    print()
    for x, y in (("a", "b"), ("c", "a")):
        both = {r["seed"] for r in rows[x]} & {r["seed"] for r in rows[y]}
        pair = {arm: [r for r in rows[arm] if r["seed"] in both] for arm in (x, y)}
        if both:
            print(f"seeds {sorted(both)} paired:", end=" ")
            rows_, rows = rows, {**rows, **pair}
            print(f"{x} - {y}: word EM {difference(rows, x, y, 'words_em', 'correct')}; "
                  f"FAQ F1 {difference(rows, x, y, 'faq_f1', 'faq_f1s')}; "
                  f"word answer NELBO {seed_difference(rows, x, y, 'words_nelbo')}; "
                  f"mix answer NELBO {seed_difference(rows, x, y, 'mix_nelbo')}")
            rows = rows_
    if missing:
        print(f"\nnot finished (left out): {', '.join(missing)}")
    if rows["a"] and rows["b"]:
        print("\nheld-out word questions, seed", rows["a"][0]["seed"], "(a: pretrained | b: random):")
        for ea, eb in list(zip(rows["a"][0]["examples"], rows["b"][0]["examples"]))[:args.examples]:
            word = ea["prompt"].split(":")[-1].replace("<|end|> <|assistant|>", "").strip()
            print(f"  {ea['task']:8} {word:12} ref {ea['reference']:12} a {ea['answer']!r:16} b {eb['answer']!r}")
    if not args.no_mlflow and any(curves.values()):
        png = plot(curves, args.png)
        print(f"\nlearning curves: {png}")
        from ldm import tracking

        with tracking.Tracker(enabled=True, uri=tracking.local_store_uri(args.outputs),
                              artifact_location=tracking.local_artifact_uri(args.outputs),
                              experiment="premise", run_name=f"{args.run_name}-summary") as tr:
            tr.log_artifact(png, "premise")
            tr.log_text(table(rows, tokens) + "\n", "premise/table.md")
            tr.log_metrics({f"{arm}.{k}": statistics.fmean(s[k] for s in rows[arm])
                            for arm in ARMS if rows[arm]
                            for k in ("words_em", "faq_f1", "words_nelbo", "mix_nelbo")}, step=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
