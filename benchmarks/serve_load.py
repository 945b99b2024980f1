"""The API under load: N concurrent clients vs the same N requests one after another.

    .venv/bin/python benchmarks/serve_load.py --checkpoint outputs/models/<sft export>
        [--clients 8] [--repeats 5] [--preset llada] [--max-tokens 32] [--window-ms 20]

Starts `python run.py task=serve serve.page=false` on the export (a process of its own, as a
user runs it), then, `--repeats` times: sends the N requests one after another (each waits for
the previous answer), and the same N requests from N client threads at once, with the official
`openai` client. Prints answers per second of each way (median and min-max over the repeats),
their ratio (goal: >= 3x, PASS/FAIL), p50/p95 latency, failed requests (goal: none), and
whether every concurrent answer equals its sequential one (greedy settings: batch-mates must not
change an answer). The prompts are the export's kind of prompt: synthetic tasks for a
synthetic_tasks export, questions otherwise (`--prompt` gives your own).

Before the server starts, the model's own batching ceiling on this machine is measured in this
process with the server's thread count: the N prompts' first sampler call (encoder over the
canvas, head on the first block) made one prompt at a time vs once over the N left-padded
canvases. Their ratio is the most any batching server can gain per model call here: where one
prompt already keeps the cores busy, it is near 1x whatever the server does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL = 3.0
SYNTHETIC = ["Copy: tree king", "Reverse the word: tsoke", "Copy: frog fish", "Reverse the word: "
             "plimo", "Copy: milk stone river", "Reverse the word: dravel", "Copy: lamp",
             "Reverse the word: quon", "Copy: bird cloud", "Reverse the word: senta"]
QUESTIONS = ["How thick must a fire wall be?", "Who signs the building permit?",
             "When is a structural engineer required?", "How wide must an exit door be?",
             "What does a site inspection check?", "How high must a guard rail be?",
             "Can I build a deck without a permit?", "What is a load-bearing wall?",
             "How far apart must smoke detectors be?", "What insulation does a roof need?"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(checkpoint: str, port: int, preset: str, window_ms: int, threads: int):
    """Return the server process once it listens (python run.py task=serve serve.page=false)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "run.py"), "task=serve", f"checkpoint={checkpoint}",
         "serve.page=false", f"serve.port={port}", f"serve.batch_window_ms={window_ms}",
         f"sampler={preset}", "tracking=off"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "serving " in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc
    raise SystemExit("the server did not start:\n" + "".join(lines[-30:]))


def ask(client, prompt: str, args) -> tuple:
    """Return (answer or None on failure, seconds)."""
    began = time.perf_counter()
    try:
        reply = client.chat.completions.create(
            model=args.model, messages=[{"role": "user", "content": prompt}],
            max_tokens=args.max_tokens, temperature=0)
        return reply.choices[0].message.content, time.perf_counter() - began
    except Exception as err:  # noqa: BLE001 - counted as a failed request
        print(f"  failed: {type(err).__name__}: {err}", flush=True)
        return None, time.perf_counter() - began


def sequential(client, prompts, args):
    """Return (seconds, answers, latencies) of the prompts sent one after another."""
    began = time.perf_counter()
    out = [ask(client, p, args) for p in prompts]
    return time.perf_counter() - began, [a for a, _ in out], [s for _, s in out]


def concurrent(client, prompts, args):
    """Return (seconds, answers, latencies) of the prompts sent from one thread each at once."""
    out = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts) + 1)

    def one(i):
        barrier.wait()
        out[i] = ask(client, prompts[i], args)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    barrier.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began, [a for a, _ in out], [s for _, s in out]


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def spread(values, fmt="{:.2f}"):
    return (f"{fmt.format(statistics.median(values))} "
            f"({fmt.format(min(values))}-{fmt.format(max(values))})")


def model_ceiling(checkpoint: str, prompts, max_tokens: int, block: int, threads: int,
                  repeats: int = 5):
    """Return (seconds of N one-prompt calls, seconds of one N-prompt call): medians."""
    import torch

    from ldm.export import read_export
    from ldm.sampling import sampler_model
    from ldm.tokenizer import encode_chat

    torch.set_num_threads(threads)
    export = read_export(checkpoint)
    tok = export.load_tokenizer()
    model_fn = sampler_model(export.load_model(vocab_size=len(tok)))
    mask_id = export.mask_id if export.mask_id is not None else tok.mask_token_id
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    canvases = [encode_chat(tok, [{"role": "user", "content": p}], add_generation_prompt=True)[0]
                + [mask_id] * max_tokens for p in prompts]
    width = max(len(c) for c in canvases)
    ids = torch.tensor([[pad_id] * (width - len(c)) + c for c in canvases])
    attention = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in canvases])
    lo = width - max_tokens
    hi = lo + min(block, max_tokens)

    def one_by_one():
        for canvas in canvases:
            start = len(canvas) - max_tokens
            model_fn.block_logits(torch.tensor([canvas]),
                                  torch.ones(1, len(canvas), dtype=torch.long), start,
                                  start + hi - lo)

    def together():
        model_fn.block_logits(ids, attention, lo, hi)

    times = {}
    with torch.inference_mode():
        for name, fn in (("alone", one_by_one), ("batched", together)):
            fn()  # warm-up
            runs = []
            for _ in range(repeats):
                began = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - began)
            times[name] = statistics.median(runs)
    return times["alone"], times["batched"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--preset", default="llada")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--window-ms", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat); default: by kind")
    args = parser.parse_args()
    import openai

    checkpoint = str(Path(args.checkpoint).resolve())
    info = json.loads((Path(checkpoint) / "ldm_export.json").read_text())
    pool = args.prompt or (SYNTHETIC if info.get("dataset") == "synthetic_tasks" else QUESTIONS)
    prompts = [pool[i % len(pool)] for i in range(args.clients)]
    args.model = Path(checkpoint).name
    from ldm.config import load_preset

    block = int(load_preset(args.preset).get("block_length") or args.max_tokens)
    alone, batched = model_ceiling(checkpoint, prompts, args.max_tokens, block, args.threads)
    ceiling = alone / batched
    print(f"model alone, {args.threads} threads, one sampler call: {len(prompts)} prompts one at a "
          f"time {alone * 1000:.1f} ms, all {len(prompts)} in one call {batched * 1000:.1f} ms: "
          f"batching ceiling {ceiling:.2f}x per call", flush=True)
    port = free_port()
    proc = start_server(checkpoint, port, args.preset, args.window_ms, args.threads)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               max_retries=0, timeout=600)
        ask(client, prompts[0], args)  # warm-up
        seq_rates, con_rates, ratios, seq_lat, con_lat = [], [], [], [], []
        failed, differ = 0, 0
        for r in range(args.repeats):
            s_time, s_answers, s_lat = sequential(client, prompts, args)
            c_time, c_answers, c_lat = concurrent(client, prompts, args)
            failed += sum(a is None for a in s_answers + c_answers)
            differ += sum(a != b for a, b in zip(s_answers, c_answers))
            seq_rates.append(len(prompts) / s_time)
            con_rates.append(len(prompts) / c_time)
            ratios.append(con_rates[-1] / seq_rates[-1])
            seq_lat += s_lat
            con_lat += c_lat
            print(f"repeat {r + 1}: sequential {s_time:.2f} s, concurrent {c_time:.2f} s, "
                  f"ratio {ratios[-1]:.2f}x", flush=True)
        print(f"\nexport {checkpoint} ({info.get('dataset')}), preset {args.preset}, max_tokens "
              f"{args.max_tokens}, {args.clients} clients, {args.repeats} repeats, batch window "
              f"{args.window_ms} ms, server threads {args.threads}")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"python {platform.python_version()}")
        print(f"example: {prompts[0]!r} -> {s_answers[0]!r}")
        print(f"sequential answers/s  {spread(seq_rates)}")
        print(f"concurrent answers/s  {spread(con_rates)}")
        print(f"ratio                 {spread(ratios)}x (goal >= {GOAL:.0f}x)")
        print(f"model's ceiling       {ceiling:.2f}x (one call of {len(prompts)} prompts vs "
              f"{len(prompts)} calls of one, measured above)")
        print(f"latency sequential    p50 {percentile(seq_lat, 50):.3f} s, p95 "
              f"{percentile(seq_lat, 95):.3f} s")
        print(f"latency concurrent    p50 {percentile(con_lat, 50):.3f} s, p95 "
              f"{percentile(con_lat, 95):.3f} s")
        print(f"failed requests       {failed} of {2 * args.clients * args.repeats}")
        print(f"concurrent answers that differ from their sequential answer: {differ}")
        median = statistics.median(ratios)
        ok = median >= GOAL and failed == 0 and differ == 0
        # three decimals: a median just under the goal must not read as the goal itself
        print(f"{'PASS' if ok else 'FAIL'} (median ratio {median:.3f}x, goal >= {GOAL:.0f}x; "
              f"{failed} failed, {differ} differing)")
        return 0 if ok else 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
