"""Does the harness measure something? Pretrained vs random-init minilm on the offline suites.

    .venv/bin/python benchmarks/lm_eval_offline.py [--steps 40] [--items 40] [--mc-num 8]

Diffusion-pretrains `model=minilm` (the packaged pretrained 6-layer BERT) and `model=minilm_random`
(the same BERT config and tokenizer, random weights) on `shakespeare` at ctx128 with identical
settings and steps, then runs `task=benchmark benchmark=offline` (cloze and choice built from the
held-out Shakespeare documents, scored through lm-eval with the MC-ELBO adapter) on both exports
and prints the scores side by side with seconds per item. The pretrained start must score higher
on both tasks: a lower perplexity of the cloze word and a higher choice accuracy. Runs are
ordinary `run.py` runs under `outputs/benchmarks/lm_eval_offline`; the two arms run side by side
(`--reuse` keeps an arm's export, `--report-only` prints the table of the last run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args, outputs: Path) -> float:
    """Run `python run.py ARGS` with outputs under `outputs`; return its seconds; stop on failure."""
    env = dict(os.environ, LDM_OUTPUTS=str(outputs), TQDM_DISABLE="1")
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--items", type=int, default=40, help="items per task")
    parser.add_argument("--mc-num", type=int, default=8, help="MC-ELBO samples per request")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse an arm's export from an earlier run with the same steps")
    parser.add_argument("--report-only", action="store_true",
                        help="print the table of an earlier run's results without running")
    parser.add_argument("--outputs",
                        default=str(REPO / "outputs" / "benchmarks" / "lm_eval_offline"))
    args = parser.parse_args()
    outputs = Path(args.outputs)

    common = ["dataset=shakespeare", "context=ctx128"]
    if not args.report_only:
        run(["task=prepare", "model=minilm", *common, "tracking=off"], outputs)

    def arm(model: str):
        """Pretrain one init and run the offline suites on its export; return the results."""
        name = f"lmeval-{model}-{args.steps}"
        export = outputs / "models" / name
        train_s = 0.0
        if not (args.reuse and (export / "model.safetensors").is_file()):
            train_s = run(["task=pretrain", f"model={model}", *common, f"run_name={name}",
                           "task.resume=false", f"task.max_steps={args.steps}",
                           f"task.global_batch_size={args.batch}",
                           f"hardware.micro_batch_size={args.batch}", f"task.lr={args.lr}",
                           "task.warmup_steps=10", "task.eval_every=0", "task.eval_batches=2",
                           "task.save_every=0", "task.keep_last=1"], outputs)
        bench = f"bench-{name}"
        bench_s = run(["task=benchmark", "benchmark=offline", f"model={model}", *common,
                       f"checkpoint={export}", f"run_name={bench}",
                       f"benchmark.max_items={args.items}", f"benchmark.mc_num={args.mc_num}",
                       "benchmark.batch_size=32", "sampler=llada"], outputs)
        folder = outputs / "runs" / "benchmark" / bench
        results = json.loads((folder / "results.json").read_text())
        print(f"{model}: pretrain {train_s:.0f} s, benchmark {bench_s:.0f} s", flush=True)
        return results, train_s, bench_s

    if args.report_only:
        scores = {}
        for model in ("minilm", "minilm_random"):
            folder = outputs / "runs" / "benchmark" / f"bench-lmeval-{model}-{args.steps}"
            scores[model] = (json.loads((folder / "results.json").read_text()), 0.0, 0.0)
    else:
        # the two arms are independent: run them side by side
        with ThreadPoolExecutor(2) as pool:
            scores = dict(zip(("minilm", "minilm_random"),
                              pool.map(arm, ("minilm", "minilm_random"))))
    report(scores, args)


# (task, metric, what it is, higher is better, decides "scores higher")
ROWS = [("cloze", "perplexity", "perplexity of the last word (ELBO)", False, True),
        ("cloze", "acc", "greedy decoding gives the last word", True, False),
        ("choice", "acc", "4-way choice accuracy (chance 0.25)", True, True),
        ("choice", "acc_norm", "4-way, per-byte normalised", True, False)]


def report(scores, args) -> None:
    """Print both arms' scores side by side; exit 1 unless the pretrained start wins."""
    import math

    print(f"\noffline suites on held-out Shakespeare ({args.items} items per task, mc_num "
          f"{args.mc_num}), after {args.steps} diffusion-pretraining steps (batch {args.batch}, "
          f"ctx128, lr {args.lr})")
    print(f"{'task metric (what)':<52}{'pretrained':>18}{'random init':>18}")
    verdict = {}
    for task, metric, label, higher, decides in ROWS:
        vals = []
        for model in ("minilm", "minilm_random"):
            res = scores[model][0]["results"][f"ldm_{task}"]
            vals.append((res[f"{metric},none"], res.get(f"{metric}_stderr,none")))
        if metric == "perplexity":
            # lm-eval's perplexity is exp(-mean log-likelihood): show that mean too
            cells = [f"{v:,.0f} ({-math.log(v):.2f})" for v, _ in vals]
        else:
            cells = [f"{v:.3f} ± {e:.3f}" for v, e in vals]
        print(f"{task + ' ' + metric + ' (' + label + ')':<52.52}{cells[0]:>18}{cells[1]:>18}")
        if decides:
            verdict[task] = vals[0][0] > vals[1][0] if higher else vals[0][0] < vals[1][0]
    print("(perplexity: mean log-likelihood in nats in brackets; ± is the harness's stderr)")
    for model in ("minilm", "minilm_random"):
        speed = scores[model][0]["ldm"]["speed"]
        print(f"{model:<14} seconds per loglikelihood item "
              f"{speed['seconds_per_loglikelihood']:.3f} ({int(speed['loglikelihood_requests'])} "
              f"requests x {args.mc_num} MC rows)")
    print("\npretrained scores higher on " + ", ".join(
        f"{t}: {'yes' if ok else 'NO'}" for t, ok in verdict.items()))
    if not all(verdict.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
