"""Does `make quickstart` learn on every seed? Runs the quickstart chain once per seed and prints
a table: held-out exact match per task type (sampler `fast`, the answers stage), the SFT steps
it took (and how training ended), SFT and total seconds; then the median and min-max of each
figure and PASS/FAIL for the goal (every type >= 95% on every seed).

    .venv/bin/python benchmarks/quickstart_seeds.py                  # seeds 0 1 2 3 4
    .venv/bin/python benchmarks/quickstart_seeds.py --seeds 5 6 7 --out /tmp/qs

Each seed is a whole `python run.py experiment=quickstart seed=N task.reuse=false` with its own
outputs folder (<out>/seed-N), one after the other: run it alone on the machine, as the
quickstart is timed. Extra arguments after `--` go to every run (e.g. `-- task.params.sft_steps=800`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL = 0.95


def run_seed(seed: int, out: Path, extra: list) -> dict:
    """Run the quickstart for one seed; return its figures."""
    outputs = out / f"seed-{seed}"
    command = [sys.executable, str(REPO / "run.py"), "experiment=quickstart", f"seed={seed}",
               "task.reuse=false", f"paths.outputs={outputs}", *extra]
    began = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    (out / f"seed-{seed}.log").write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed} failed (exit {proc.returncode}); see {out}/seed-{seed}.log")
    stages = outputs / "runs" / "chain" / "quickstart" / "stages"
    sft_record = json.loads((stages / "sft.json").read_text())
    metrics = json.loads((outputs / "runs" / "evaluate" / "quickstart-eval-fast" / "eval" /
                          "metrics.json").read_text())
    info = json.loads((outputs / "models" / "quickstart-sft" / "ldm_export.json").read_text())
    summary = [line for line in proc.stdout.splitlines()
               if line.startswith(("goal met", "MISSED", "training "))]
    return {"seed": seed, "seconds": seconds, "sft_seconds": sft_record["seconds"],
            "sft_steps": info["step"], "stopped": info.get("stopped", ""),
            "exact_match": metrics["exact_match"],
            "types": {k.split(".", 1)[1]: v for k, v in metrics.items()
                      if k.startswith("exact_match.")},
            "summary": summary}


def spread(values: list, fmt: str) -> str:
    return (f"median {format(statistics.median(values), fmt)}, "
            f"min-max {format(min(values), fmt)}-{format(max(values), fmt)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=None, help="outputs root (default: a temp dir)")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    out = args.out or Path(tempfile.mkdtemp(prefix="quickstart-seeds-"))
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    from ldm.tracking import cpu_model

    print(f"commit {commit}, {cpu_model()}, {os.cpu_count()} cores; outputs under {out}")
    rows = []
    for seed in args.seeds:
        row = run_seed(seed, out, extra)
        rows.append(row)
        (out / f"seed-{seed}.json").write_text(json.dumps(row, indent=2))  # kept if a later seed fails
        types = ", ".join(f"{k} {v:.1%}" for k, v in sorted(row["types"].items()))
        print(f"seed {seed}: {types}; SFT {row['sft_steps']} steps in {row['sft_seconds']:.0f} s; "
              f"quickstart {row['seconds']:.0f} s", flush=True)

    names = sorted({k for r in rows for k in r["types"]})
    print()
    print("| seed | " + " | ".join(f"{n} exact match" for n in names)
          + " | SFT steps | SFT s | quickstart s | how SFT ended |")
    print("|---" * (len(names) + 5) + "|")
    for r in rows:
        ended = r["stopped"].split(":")[0] if r["stopped"] else "step cap"
        print(f"| {r['seed']} | " + " | ".join(f"{r['types'].get(n, 0):.1%}" for n in names)
              + f" | {r['sft_steps']} | {r['sft_seconds']:.0f} | {r['seconds']:.0f} | {ended} |")
    print()
    for n in names:
        print(f"{n}: {spread([r['types'].get(n, 0) * 100 for r in rows], '.1f')} (%)")
    print(f"SFT steps: {spread([r['sft_steps'] for r in rows], '.0f')}")
    print(f"SFT seconds: {spread([r['sft_seconds'] for r in rows], '.0f')}")
    print(f"quickstart seconds (install not included): {spread([r['seconds'] for r in rows], '.0f')}")
    worst = min(min(r["types"].values()) for r in rows)
    verdict = "PASS" if worst >= GOAL else "FAIL"
    print(f"[{verdict}] every task type >= {GOAL:.0%} on every seed (worst {worst:.1%})")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
