"""Does starting from a pretrained encoder help? Same architecture, data and steps, two inits.

    .venv/bin/python benchmarks/pretraining_helps.py [--steps 150] [--eval-every 15]

Diffusion-pretrains `model=minilm` (the packaged pretrained 6-layer BERT) and `model=minilm_random`
(the same BERT config and tokenizer, random weights) on `shakespeare` at ctx128 with identical
settings, then reads both held-out NELBO curves from mlflow and reports how many steps each run
needs to reach the random-init run's final value. Runs are ordinary `run.py` runs under
`outputs/benchmarks/pretraining_helps` (browse them with mlflow ui).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args, outputs: Path) -> None:
    """Run `python run.py ARGS` with outputs under `outputs`; stop on failure."""
    env = dict(os.environ, LDM_OUTPUTS=str(outputs))
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--outputs", default=str(REPO / "outputs" / "benchmarks" / "pretraining_helps"))
    args = parser.parse_args()
    outputs = Path(args.outputs)

    from mlflow.tracking import MlflowClient

    from ldm.runs import find_runs
    from ldm.tracking import local_store_uri

    common = ["dataset=shakespeare", "context=ctx128"]
    run(["task=prepare", "model=minilm", *common], outputs)
    curves = {}
    for model in ("minilm", "minilm_random"):
        name = f"helps-{model}-{args.steps}"
        run(["task=pretrain", f"model={model}", *common, f"run_name={name}", "task.resume=false",
             f"task.max_steps={args.steps}", f"task.global_batch_size={args.batch}",
             f"hardware.micro_batch_size={args.batch}", f"task.lr={args.lr}",
             "task.warmup_steps=10", f"task.eval_every={args.eval_every}", "task.eval_batches=4",
             "task.save_every=0", "task.keep_last=1", "task.log_every=5"], outputs)
        uri = local_store_uri(outputs)
        latest = next(r for r in find_runs(uri, "pretrain") if r.info.run_name == name)
        history = MlflowClient(uri).get_metric_history(latest.info.run_id, "eval_nelbo")
        curves[model] = sorted((m.step, m.value) for m in history)
        print(f"{model}: mlflow run {latest.info.run_id}", flush=True)

    steps = [s for s, _ in curves["minilm"]]
    print(f"\nheld-out NELBO per token (shakespeare, ctx128, batch {args.batch}, lr {args.lr}, "
          f"fixed eval subset and t grid)")
    print(f"{'step':>6}{'pretrained':>12}{'random init':>13}")
    random_by_step = dict(curves["minilm_random"])
    for step, value in curves["minilm"]:
        print(f"{step:>6}{value:>12.3f}{random_by_step.get(step, float('nan')):>13.3f}")
    target = curves["minilm_random"][-1][1]

    def steps_to(curve):
        return next((s for s, v in curve if v <= target), None)

    reach_pre, reach_rand = steps_to(curves["minilm"]), steps_to(curves["minilm_random"])
    print(f"\nrandom-init final NELBO {target:.3f} at step {steps[-1]}: reached by the pretrained "
          f"start at step {reach_pre}, by the random start at step {reach_rand}")
    if reach_pre is not None and reach_rand:
        print(f"pretrained weights reach it in {reach_pre / reach_rand:.0%} of the steps "
              f"({reach_rand / reach_pre:.1f}x fewer)")


if __name__ == "__main__":
    main()
