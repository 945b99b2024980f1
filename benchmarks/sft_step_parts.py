"""Where a chat-SFT training step's time goes, and the most any vocabulary-head saving can win.

    .venv/bin/python benchmarks/sft_step_parts.py                  # the ModernBERT-base shape
    .venv/bin/python benchmarks/sft_step_parts.py --vocab 50368 --precision bf16 --lengths 340,700

sft_throughput.py compares whole trainers; this script takes one of their micro-batches apart. A
model of the shape (built from a config, random weights, the ModernBERT-base shape by default) runs
forward and backward on `--rows` rows of each of `--lengths` tokens (random ids), with `--masked`
of the positions masked (sft_throughput's answers are ~87% of the tokens, half of them masked on
average at t ~ U[0, 1]). Three ways, alternating, each the median of `--reps` steps with min-max:

  dense    the vocabulary head at every position, the loss at the masked ones (dLLM's trainer)
  sparse   the head at the masked positions only (ldm's SparseMaskedLM, task.sparse_logits=true)
  no head  the encoder alone, its masked hidden states into a fixed random projection: no head,
           so no trainer running this encoder could do cheaper work per step

Printed per length: seconds per step, dense/sparse (what ldm's head is worth per token) and
dense/no-head, the ceiling of anything done about the head: the most a trainer running this same
encoder can lead a dense-head trainer by, per token. Then the FLOP/s the sparse step achieves
(benchmarks/common.py's step count) against a matmul measured here, and one profiled sparse step
split into matrix products, attention kernels and everything else.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

from ldm.model import SparseMaskedLM, load_model, logits_at

from common import matmul_peak, short_commit, spread, step_flops  # benchmarks/common.py
from train_throughput import SHAPES as MODEL_SHAPES, autocast_for


# the shapes train_throughput.py builds, at the vocabulary --vocab asks for
SHAPES = {"base": "modernbert_base_shape", "large": "modernbert_large_shape"}
MASK_ID = 4


def build(shape: str, vocab: int) -> torch.nn.Module:
    source, pretrained, architecture, arch, *_ = MODEL_SHAPES[SHAPES[shape]]
    model = load_model(source, pretrained, architecture=architecture, arch=arch, vocab_size=vocab,
                       dropout=0.0, attn_implementation="sdpa")
    return SparseMaskedLM(model).train()


def steps(model: torch.nn.Module, ids: torch.Tensor, masked: torch.Tensor, precision: str):
    """Return the three step functions (forward + backward of one micro-batch)."""
    targets = ids[masked]
    noised = ids.masked_fill(masked, MASK_ID)
    hidden = model.mlm.config.hidden_size
    projection = torch.randn(hidden, generator=torch.Generator().manual_seed(0)) / hidden ** 0.5

    def with_loss(loss_of):
        def step():
            model.zero_grad(set_to_none=True)
            with autocast_for("cpu", precision)():
                loss = loss_of()
            loss.backward()
        return step

    def head(sparse):
        return lambda: F.cross_entropy(logits_at(model, noised, None, masked, sparse=sparse).float(),
                                       targets)

    def no_head():
        states = model.mlm.base_model(input_ids=noised)[0][masked]
        return (states.float() @ projection).square().mean()

    return {"dense": with_loss(head(False)), "sparse": with_loss(head(True)),
            "no head": with_loss(no_head)}


def profile_split(step) -> Dict[str, float]:
    """Return seconds of one step by kind of op (self time): matrix products, attention, other."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    split = {"matrix products": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        name = event.key
        kind = ("matrix products" if name in ("aten::mm", "aten::addmm", "aten::bmm",
                                              "aten::_weight_int8pack_mm")
                else "attention" if "scaled_dot_product" in name or "flash_attention" in name
                else "other")
        split[kind] += event.self_cpu_time_total / 1e6
    return split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="base", choices=sorted(SHAPES))
    ap.add_argument("--vocab", type=int, default=30522,
                    help="vocabulary rows of the head (30,522: minilm's WordPiece, as "
                         "sft_throughput.py; 50,368: ModernBERT's own)")
    ap.add_argument("--rows", type=int, default=2, help="rows per micro-batch")
    ap.add_argument("--lengths", default="340",
                    help="tokens per row, comma-separated (340: the token-weighted mean row of "
                         "sft_throughput.py's data)")
    ap.add_argument("--masked", type=float, default=0.45, help="share of positions masked")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: autocast (fp32 weights), as the recipes on a GPU")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not 0 < args.masked <= 1:
        raise SystemExit(f"--masked {args.masked}: accepted a share in (0, 1]")
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        raise SystemExit(f"--lengths {args.lengths!r}: accepted comma-separated token counts")
    if min(lengths) < 8 or args.rows < 1 or args.reps < 1:
        raise SystemExit("--lengths must be >= 8 tokens, --rows and --reps >= 1")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    commit = short_commit()
    model = build(args.shape, args.vocab)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_peak("cpu", dtype)
    print(f"commit {commit}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} threads; ModernBERT-{args.shape} shape, vocabulary {args.vocab:,}, "
          f"{args.precision}; {args.rows} rows per micro-batch, {args.masked:.0%} masked; "
          f"a {args.precision} matmul (1024^3) measures {peak / 1e9:,.0f} GFLOP/s here")
    gen = torch.Generator().manual_seed(args.seed)
    for length in lengths:
        ids = torch.randint(8, args.vocab, (args.rows, length), generator=gen)
        masked = torch.rand(args.rows, length, generator=gen) < args.masked
        fns = steps(model, ids, masked, args.precision)
        for fn in fns.values():  # warm-up: allocator, oneDNN primitives
            fn()
        times: Dict[str, List[float]] = {name: [] for name in fns}
        names = list(fns)
        for rep in range(args.reps):
            first = rep % len(names)  # each kind leads in turn
            for name in names[first:] + names[:first]:
                start = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        tokens = args.rows * length
        flops = step_flops(model.mlm, tokens, length, int(masked.sum()))
        print(f"\n{args.rows} x {length} tokens ({int(masked.sum())} masked), median of "
              f"{args.reps} (min-max), seconds per step:")
        for name, t in times.items():
            print(f"  {name:8s} {spread(t, '{:.3f}')}")
        print(f"  dense / sparse   {med['dense'] / med['sparse']:.3f}x  the head at masked "
              f"positions only, per token")
        print(f"  dense / no head  {med['dense'] / med['no head']:.3f}x  the ceiling: a head that "
              f"cost nothing, beside the same encoder with a dense head")
        print(f"  sparse step: {flops / med['sparse'] / 1e9:,.0f} GFLOP/s "
              f"({flops / med['sparse'] / peak:.0%} of the measured matmul)")
        split = profile_split(fns["sparse"])
        total = sum(split.values())
        print("  one profiled sparse step: " + ", ".join(
            f"{kind} {seconds / total:.0%}" for kind, seconds in split.items()))


if __name__ == "__main__":
    main()
