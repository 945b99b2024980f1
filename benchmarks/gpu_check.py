"""One prepared GPU check: ModernBERT-large-shaped training and sampling speed, bf16, ctx1024.

    .venv/bin/python benchmarks/gpu_check.py               # a GPU machine: a few minutes, no hub
    .venv/bin/python benchmarks/gpu_check.py --cpu-smoke   # tiny shape on CPU in seconds (tests)

What it records (printed, and written as JSON to --out):
  training   ldm's training step (the objective with logits only at masked positions, the
             loop's fused AdamW, bf16 autocast, grad clipping) on a ModernBERT-large-shaped model
             built from config (random weights: no hub), batch x 1024 tokens: tokens/s, MFU
             against the card's datasheet bf16 dense peak (target >= 40%) and against a matmul
             measured here, peak memory. Median of the measured steps, with min and max.
  sampling   the `fast` sampler preset (conf/sampler/fast.yaml) answering a batch of prompts,
             and `fast_dual` (the same with the dual KV cache), alternating, median of 5 with
             min and max: answer tokens/s, model calls/s and calls per answer, and fast_dual's
             speed-up. A random-weight model is rarely 90% sure of a token, so it commits about
             one token per call: the tokens/s printed is the per-call floor; a trained model
             commits several per call.
  lm-eval    seconds per item of the offline suites' two request kinds, when `ldm.harness`
             (the lm-eval adapter) is in this checkout: a loglikelihood item (Monte Carlo ELBO,
             mc_num rows, as the cloze/choice suites score) and a generate_until item (the
             sampling above, per prompt). Skipped with a message otherwise.

FLOPs per step: benchmarks/common.py's step_flops, the count train_throughput.py uses too
(attention at the window on ModernBERT's sliding-window layers; the MLM head at the masked rows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ldm.model import SparseMaskedLM, load_model
from ldm.sampling.sampler import generate, sampler_model
from ldm.config import load_preset
from ldm.sampling.settings import SamplerSettings
from ldm.train.loop import make_optimizer
from ldm.train.objective import diffusion_step

from common import card_peak, matmul_peak, step_flops, sync  # benchmarks/common.py

REPO = Path(__file__).resolve().parents[1]

MODERNBERT_LARGE = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                        intermediate_size=2624, max_position_embeddings=8192)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            cls_token_id=1, sep_token_id=2)
# ModernBERT's tokenizer: 50368 rows, [SEP] (EOS) 50282, [MASK] 50284
SHAPES = {
    "gpu": {"arch": MODERNBERT_LARGE, "vocab": 50368, "context": 1024, "batch": 16, "steps": 10,
            "prompt": 256, "new_tokens": 256, "prompts": 8, "mc_items": 16, "mc_num": 128,
            "mc_batch": 32, "eos": 50282, "mask": 50284},
    "cpu-smoke": {"arch": TINY, "vocab": 512, "context": 64, "batch": 2, "steps": 5,
                  "prompt": 16, "new_tokens": 32, "prompts": 2, "mc_items": 2, "mc_num": 4,
                  "mc_batch": 4, "eos": 2, "mask": 4},
}
MFU_TARGET = 0.40


def datasheet_peak(name: str):
    """Return the card's datasheet dense bf16 FLOP/s, or None when it is not in common.PEAKS."""
    return card_peak(name, "bf16")[1]


def measured_matmul(device: str, dtype: torch.dtype) -> float:
    """Return the dense matmul FLOP/s measured on this device (median of 5 timings)."""
    return matmul_peak(device, dtype, n=8192 if device == "cuda" else 512)


def build(shape: dict, device: str, compile_layers: bool):
    """Return the ModernBERT-shaped masked LM built from config (random weights) on `device`."""
    model = load_model("config", None, architecture="modernbert", arch=dict(shape["arch"]),
                       vocab_size=shape["vocab"], max_positions=None, dropout=0.0,
                       attn_implementation="sdpa")
    model = model.to(device).train()
    if compile_layers:
        from ldm.model import maybe_compile

        model = maybe_compile(model, True)
    return model


def spread(values):
    """Return {median, min, max} of a list of timings."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def train_speed(model, shape: dict, device: str, bf16: bool) -> dict:
    """Time ldm's training step on random tokens; return tokens/s, FLOP/s and peak memory."""
    import contextlib

    opt = make_optimizer(model, 1e-5, 0.0, ["bias", "norm", "embeddings"])
    wrapped = SparseMaskedLM(model)
    batch, context = shape["batch"], shape["context"]
    ids = torch.randint(5, shape["vocab"] - 100, (batch, context), device=device)
    autocast = (lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)) if bf16 \
        else contextlib.nullcontext
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, rows = [], []
    for step in range(shape["steps"] + 2):  # two warm-up steps (kernels, allocator, compile)
        gen = torch.Generator(device=device).manual_seed(step)
        sync(device)
        start = time.perf_counter()
        with autocast():
            loss, stats = diffusion_step(wrapped, ids, None, None, "linear", "uniform", 1e-3,
                                         shape["mask"], "token", generator=gen, sparse=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step >= 2:
            times.append(time.perf_counter() - start)
            rows.append(float(stats["num_masked"]))
    seconds = spread(times)
    flops = step_flops(model, batch * context, context, sum(rows) / len(rows))
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
    del opt
    return {"batch": batch, "context": context, "steps": len(times), "seconds_per_step": seconds,
            "tokens_per_second": batch * context / seconds["median"],
            "flops_per_step": flops, "flops_per_second": flops / seconds["median"],
            "peak_memory_gib": peak}


def preset_settings(preset: str, new_tokens: int, max_positions: int) -> SamplerSettings:
    """Return a sampler preset's settings (conf/sampler/<preset>.yaml) for new_tokens."""
    node = load_preset(preset)
    node.max_new_tokens = new_tokens
    return SamplerSettings.from_config(node, max_positions=max_positions)


SAMPLING_PRESETS = ("fast", "fast_dual")


def sampling_speed(model, shape: dict, device: str, bf16: bool, reps: int = 5) -> dict:
    """Time the SAMPLING_PRESETS on a batch of random prompts, alternating; return
    {preset: tokens/s, calls, seconds per batch}."""
    import contextlib

    positions = shape["arch"]["max_position_embeddings"]
    settings = {p: preset_settings(p, shape["new_tokens"], positions) for p in SAMPLING_PRESETS}
    model.eval()
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, shape["vocab"] - 100, (shape["prompts"], shape["prompt"]),
                            generator=gen).tolist()
    autocast = (lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)) if bf16 \
        else contextlib.nullcontext
    kwargs = dict(mask_id=shape["mask"], eos_id=shape["eos"], special_ids=[shape["mask"]],
                  pad_id=0, device=device, record_history=False)
    times = {p: [] for p in SAMPLING_PRESETS}
    results = {p: [] for p in SAMPLING_PRESETS}
    for rep in range(reps + 1):  # one warm-up, then `reps` measured, the order alternating
        order = SAMPLING_PRESETS if rep % 2 == 0 else SAMPLING_PRESETS[::-1]
        for preset in order:
            sync(device)
            start = time.perf_counter()
            with autocast():
                result = generate(sampler_model(model), prompts, settings[preset], **kwargs)
            sync(device)
            if rep:
                times[preset].append(time.perf_counter() - start)
                results[preset].append(result)
    model.train()
    out = {}
    for preset in SAMPLING_PRESETS:
        seconds = spread(times[preset])
        tokens = statistics.median(sum(len(t) for t in r.tokens) for r in results[preset])
        calls = statistics.median(r.nfe for r in results[preset])
        out[preset] = {"settings": settings[preset].as_record(), "prompts": shape["prompts"],
                       "prompt_tokens": shape["prompt"], "seconds_per_batch": seconds,
                       "answer_tokens": tokens, "model_calls": calls,
                       "tokens_per_second": tokens / seconds["median"],
                       "calls_per_second": calls / seconds["median"],
                       "seconds_per_answer": seconds["median"] / shape["prompts"]}
    return out


def lm_eval_speed(model, shape: dict, device: str, bf16: bool, sampling: dict) -> dict:
    """Return seconds per offline-suite item, or {'skipped': why} without ldm.harness."""
    import contextlib

    try:
        from ldm.harness.elbo import mc_elbo, model_logits_at
    except ImportError as err:
        return {"skipped": f"ldm.harness (the lm-eval adapter) is not importable here ({err})"}
    gen = torch.Generator().manual_seed(1)
    requests = [(torch.randint(5, shape["vocab"] - 100, (shape["prompt"],), generator=gen).tolist(),
                 torch.randint(5, shape["vocab"] - 100, (8,), generator=gen).tolist())
                for _ in range(shape["mc_items"])]
    autocast = (lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)) if bf16 \
        else contextlib.nullcontext
    model.eval()
    try:
        times = []
        for rep in range(3):  # one warm-up, two measured
            sync(device)
            start = time.perf_counter()
            with autocast(), torch.inference_mode():
                mc_elbo(model_logits_at(model), requests, mask_id=shape["mask"], pad_id=0,
                        mc_num=shape["mc_num"], batch_size=shape["mc_batch"], device=device)
            sync(device)
            if rep:
                times.append(time.perf_counter() - start)
    except TypeError as err:  # the adapter's signature moved on; say so instead of guessing
        return {"skipped": f"ldm.harness.elbo.mc_elbo has another signature ({err})"}
    finally:
        model.train()
    return {"loglikelihood": {"mc_num": shape["mc_num"], "batch_size": shape["mc_batch"],
                              "context_tokens": shape["prompt"], "continuation_tokens": 8,
                              "seconds_per_item": statistics.median(times) / len(requests)},
            "generate_until": {"sampler": "fast", "max_new_tokens": shape["new_tokens"],
                               "seconds_per_item": sampling["seconds_per_answer"]}}


def report(out: dict) -> None:
    """Print the figures beside their reference points."""
    dev, tr, sa, le = out["device"], out["training"], out["sampling"], out["lm_eval"]
    print(f"device: {dev['name']}; datasheet bf16 dense peak "
          f"{dev['datasheet_peak'] / 1e12 if dev['datasheet_peak'] else float('nan'):.0f} TFLOP/s; "
          f"measured {dev['matmul_dtype']} matmul {dev['measured_matmul'] / 1e12:.3f} TFLOP/s "
          f"(median of 3 between the runs, {dev['measured_matmul_spread']['min'] / 1e12:.3f}-"
          f"{dev['measured_matmul_spread']['max'] / 1e12:.3f})")
    print(f"model: {out['shape']} ({out['parameters'] / 1e6:.1f}M parameters, built from config), "
          f"{'bf16 autocast' if out['bf16'] else 'fp32'}, batch {tr['batch']} x {tr['context']}")
    s = tr["seconds_per_step"]
    print(f"training: {tr['tokens_per_second']:,.0f} tokens/s; step {s['median']:.4f} s "
          f"(min {s['min']:.4f}, max {s['max']:.4f}, {tr['steps']} steps); "
          f"{tr['flops_per_second'] / 1e12:.3f} TFLOP/s")
    if tr.get("peak_memory_gib") is not None:
        print(f"peak memory: {tr['peak_memory_gib']:.1f} GiB")
    if out.get("mfu_datasheet") is not None:
        verdict = "PASS" if out["mfu_datasheet"] >= MFU_TARGET else "FAIL"
        print(f"[{verdict}] MFU vs the card's datasheet peak: {out['mfu_datasheet']:.1%} "
              f"(target >= {MFU_TARGET:.0%})")
    print(f"MFU vs the matmul measured here: {out['mfu_measured']:.1%}")
    for preset, figures in (("fast", sa), ("fast_dual", out["sampling_fast_dual"])):
        b = figures["seconds_per_batch"]
        print(f"sampling ({preset}, {figures['prompts']} prompts of {figures['prompt_tokens']} "
              f"tokens, {figures['settings']['max_new_tokens']} new): "
              f"{figures['tokens_per_second']:,.1f} answer tokens/s, "
              f"{figures['calls_per_second']:.1f} model calls/s, {figures['model_calls']} calls "
              f"per batch; batch {b['median']:.3f} s (min {b['min']:.3f}, max {b['max']:.3f})")
    print(f"fast_dual (dual KV cache) vs fast: {out['dual_speedup']:.2f}x the answer tokens/s")
    if "skipped" in le:
        print(f"lm-eval offline suites: skipped: {le['skipped']}")
    else:
        ll, gu = le["loglikelihood"], le["generate_until"]
        print(f"lm-eval offline suites: loglikelihood item (MC-ELBO, mc_num {ll['mc_num']}) "
              f"{ll['seconds_per_item']:.4f} s; generate_until item (fast, "
              f"{gu['max_new_tokens']} tokens) {gu['seconds_per_item']:.4f} s")


def main(argv=None) -> dict:
    """Run the check; print and write the figures; return them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shape on the CPU in seconds (what the tests run)")
    parser.add_argument("--batch", type=int, help="sequences per training step (default 16 on GPU)")
    parser.add_argument("--steps", type=int, help="measured training steps (after 2 warm-up)")
    parser.add_argument("--compile", action="store_true", help="compile the encoder layers")
    parser.add_argument("--out", default=str(REPO / "outputs" / "gpu_check.json"))
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here; run it on a GPU machine, or --cpu-smoke for the tiny shape")
    name = "cpu-smoke" if args.cpu_smoke else "gpu"
    shape = dict(SHAPES[name])
    shape.update({k: v for k, v in (("batch", args.batch), ("steps", args.steps)) if v})
    device = "cpu" if args.cpu_smoke else "cuda"
    bf16 = device == "cuda"
    torch.manual_seed(0)
    card = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    dtype = torch.bfloat16 if bf16 else torch.float32
    # the matmul peak is measured between the runs, not once: one measurement can be far off
    matmuls = [measured_matmul(device, dtype)]
    model = build(shape, device, args.compile)
    training = train_speed(model, shape, device, bf16)
    matmuls.append(measured_matmul(device, dtype))
    sampling = sampling_speed(model, shape, device, bf16)
    matmuls.append(measured_matmul(device, dtype))
    measured = statistics.median(matmuls)
    lm_eval = lm_eval_speed(model, shape, device, bf16, sampling["fast"])
    peak = datasheet_peak(card) if device == "cuda" else None
    out = {
        "shape": "ModernBERT-large" if name == "gpu" else "tiny (cpu smoke)",
        "parameters": sum(p.numel() for p in model.parameters()), "bf16": bf16,
        "device": {"name": card, "datasheet_peak": peak, "measured_matmul": measured,
                   "measured_matmul_spread": spread(matmuls),
                   "matmul_dtype": str(dtype).replace("torch.", "")},
        "training": training, "sampling": sampling["fast"],
        "sampling_fast_dual": sampling["fast_dual"],
        "dual_speedup": (sampling["fast_dual"]["tokens_per_second"]
                         / sampling["fast"]["tokens_per_second"]),
        "lm_eval": lm_eval,
        "mfu_datasheet": training["flops_per_second"] / peak if peak else None,
        "mfu_measured": training["flops_per_second"] / measured,
        "mfu_target": MFU_TARGET,
    }
    report(out)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"figures written to {path}")
    return out


if __name__ == "__main__":
    main()
