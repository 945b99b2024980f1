"""Sampling speed with long few-shot prompts: KV cache, block-only logits, entropy-bounded commits.

    .venv/bin/python benchmarks/sampling_cache.py [--arch bert modernbert] [--short-steps 1000]
        [--steps 400 [60]] [--eval-prompts 16] [--reps 5]

1. Trains a tiny BERT and a tiny ModernBERT (hidden 128, 4 layers, no dropout, a byte-level
   tokenizer of 262 tokens without merges: one token per character, the same whatever text it
   is trained on) with ordinary run.py runs, in two stages, so that the model learns the tasks
   where a step is cheap and then only has to find them in a long prompt. Both stages use
   `dataset.padding=answer`: a row is its prompt plus exactly `answer_positions` answer tokens
   (the answer, its EOS, then EOS padding), laid out like the sampler's canvas (prompt +
   max_new_tokens masks); rows of different lengths are batched with attention-masked padding.
   A model this small reads the room left for its answer from where the row ends.
   - stage 1: SFT from scratch on the short synthetic tasks (`dataset=synthetic_tasks`, the
     `--tasks` types, default copy and reverse, made-up words) at ctx48 with an answer area of
     `--short-answer` (12) tokens; its exact match on 40 short prompts (canvas = prompt + 12)
     is printed, to tell an undertrained stage 1 from a stage 2 that did not transfer. With an
     answer area of 64 already in stage 1 (ctx128), ModernBERT answered 0 of those 40 prompts
     right after 800 steps (each row then holds ~55 positions of EOS padding to ~10 of answer).
     With 12, the quickstart's SFT of the same model learned both tasks in 1,000 steps, but the
     recorded run's stage 1 (benchmarks/RESULTS.md) answered 0 of 40 with both architectures;
   - stage 2: SFT from the stage-1 export (`init_from`: its weights, model group and tokenizer,
     with which the few-shot chats are prepared) on few-shot chats with an answer area of
     `--max-new` (64) tokens, context 1,024 (the models' positions). Each user turn holds
     solved examples of the tasks and then one to solve; the prompt is 256-512 tokens (drawn
     uniformly; leading spaces fill what the examples leave), and the answer is the synthetic
     task's exactly checkable one. The BERT variant has absolute position embeddings for 1,024
     positions (modernbert_tiny's max_positions); those past 48 are first trained here.
2. In one process, answers the same held-out prompts, each `--eval-length` (512) tokens
   (canvas = prompt + 64 masks, as in training; batched), with each setting: original, llada,
   fast, fast+prefix, fast+dual, entropy_bound, entropy_bound+dual. Timings are the median of
   `--reps` (default 5) repetitions, the settings' order alternating between repetitions, with
   the min-max spread; tokens/s counts the answer positions decoded (committed, EOS padding
   included) per second. Also reported: exact match (overall and per task), model calls (NFE)
   per answer and model-equivalent compute per answer (estimated forward FLOPs of the encoder +
   head over those of one uncached full forward of the canvas).
3. Prints the goals with PASS/FAIL: fast+dual >= 3x the tokens/s of fast at <= 1 point less
   exact match; the best setting >= 15x the tokens/s of original at equal or better exact match.
   Saves accuracy vs tokens/s as sampling_cache.png next to RESULTS.md (`--plot`), the rows as
   results.json under `--outputs`.

`--reuse` skips a stage whose export (same architecture, tasks, step counts and answer areas)
exists; `--steps 0` evaluates the stage-1 export. A quick end-to-end check of the script (a few
minutes, the numbers mean nothing):
    ... sampling_cache.py --short-steps 20 --steps 5 --short-examples 500 --examples 200
        --eval-prompts 2 --batch-eval 2 --reps 1 --outputs /tmp/sc --plot /tmp/sc/plot.png
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from sampling_speed import run  # noqa: E402  (runs run.py with LDM_OUTPUTS set)

VOCAB = 262  # byte-level BPE without merges: the same tokenizer whatever text it is trained on
SHORT = 48  # stage-1 context: a short task prompt + its answer area (--short-answer)
LONG = 1024  # stage-2 context (the models' positions): rows are at most PROMPTS[1] + --max-new
PROMPTS = (256, 512)  # few-shot prompt lengths in tokens, chat marks included: stage 2 draws them
# uniformly; the held-out prompts are --eval-length long (the longest by default)
# No dropout (ModernBERT's default): BERT's default attention dropout of 0.1 sends attention on
# CPU down the slow path, a training step at ctx512 4x slower.
ARCH = ["model.arch.hidden_size=128", "model.arch.num_hidden_layers=4",
        "model.arch.num_attention_heads=4", "model.arch.intermediate_size=256",
        "model.dropout=0.0"]
ARCHES = {
    "modernbert": ["model=modernbert_tiny", *ARCH],
    "bert": ["model=modernbert_tiny", "model.architecture=bert", *ARCH,
             "+model.arch.type_vocab_size=1"],
}
SETTINGS = [  # label, preset, overrides
    ("original", "original", {}),
    ("llada", "llada", {}),
    ("fast", "fast", {"cache": "none"}),
    ("fast+prefix", "fast", {"cache": "prefix"}),
    ("fast+dual", "fast", {"cache": "dual"}),
    ("entropy_bound", "entropy_bound", {"cache": "none"}),
    ("entropy_bound+dual", "entropy_bound", {"cache": "dual"}),
]
CHAT_MARKS = 3  # the user, end and assistant marks around a one-turn prompt's text


def few_shot(n: int, seed: int, tasks, lengths) -> list:
    """Return n chat examples: solved examples of random tasks, then one to solve.

    Each prompt is a length drawn uniformly from `lengths` (lo, hi) tokens, chat marks included;
    its user text has that length less CHAT_MARKS characters (the byte-level tokenizer makes one
    token of each): solved examples are added while they fit, and leading spaces fill what is
    left.
    """
    from ldm.data import synthetic

    pool = synthetic.generate(n * 16, seed, tasks)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        target = pool[i]
        chars = rng.randint(*lengths) - CHAT_MARKS
        head, tail = "Solved examples:", f"\nNow solve:\n{target['messages'][0]['content']}"
        budget = chars - len(head) - len(tail)
        lines = []
        while True:
            demo = pool[rng.randrange(n, len(pool))]
            line = f"\n{demo['messages'][0]['content']}\n=> {demo['answer']}"
            if len(line) > budget:
                break
            lines.append(line)
            budget -= len(line)
        text = " " * budget + head + "".join(lines) + tail
        out.append({"messages": [{"role": "user", "content": text},
                                 {"role": "assistant", "content": target["answer"]}],
                    "task": target["task"], "answer": target["answer"]})
    return out


def sampler_settings(preset: str, overrides: dict, max_new: int) -> dict:
    """Return the sampler settings of conf/sampler/<preset>.yaml plus overrides, as a dict."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(REPO / "conf" / "sampler" / f"{preset}.yaml")
    node.pop("defaults")
    node.pop("name")
    node.max_new_tokens = max_new
    out = OmegaConf.to_container(node, resolve=True)
    out.update(overrides)
    return out


def measure(model, tok, jobs, settings, batch: int, seed: int) -> dict:
    """Answer every job once; return seconds, tokens, exact matches, NFE and FLOPs."""
    import torch

    from ldm.data import synthetic
    from ldm.sampling import SamplerSettings, generate, hf_logits_fn
    from ldm.sampling.decode import never_emitted_ids

    fn = hf_logits_fn(model)
    settings = SamplerSettings.from_config(settings, model.config.max_position_embeddings)
    banned = never_emitted_ids(tok, model.config.vocab_size)
    seconds = tokens = correct = nfe = flops = 0.0
    by_task = {}  # task -> [correct, answers]
    for start in range(0, len(jobs), batch):
        part = jobs[start:start + batch]
        began = time.perf_counter()
        result = generate(fn, [j["ids"] for j in part], settings, mask_id=tok.mask_token_id,
                          eos_id=tok.eos_token_id, special_ids=banned,
                          pad_id=tok.pad_token_id, record_history=False,
                          generator=torch.Generator().manual_seed(seed + start))
        seconds += time.perf_counter() - began
        nfe += result.nfe * len(part)
        flops += result.flops
        # Throughput counts the answer positions each setting decoded (committed), EOS padding
        # included: an answer that ends early is cheaper, but a model that answers with EOS at
        # once would otherwise score 0 tokens/s whatever the sampler's speed.
        tokens += sum(result.committed)
        for job, ids in zip(part, result.tokens):
            answer = tok.decode(ids, skip_special_tokens=True).strip()
            ok = synthetic.check(job["task"], answer, job["answer"])
            correct += ok
            counts = by_task.setdefault(job["task"], [0, 0])
            counts[0] += ok
            counts[1] += 1
    return {"seconds": seconds, "tokens": tokens, "correct": correct, "nfe": nfe, "flops": flops,
            "by_task": by_task}


def train_stage(label: str, prepare: list, sft: list, steps: int, batch: int, outputs: Path,
                export: Path, reuse: bool) -> bool:
    """Prepare the data and run the SFT of one stage; return False when an export is reused."""
    if reuse and (export / "config.json").is_file():
        print(f"{label}: reusing {export}", flush=True)
        return False
    prep = run(["task=prepare", *prepare, "tracking=off"], outputs)
    train = run(["task=sft", *sft, f"run_name={export.name}", "task.resume=false",
                 f"task.max_steps={steps}", f"task.global_batch_size={batch}",
                 f"hardware.micro_batch_size={batch}", "task.eval_every=0",
                 "task.eval_batches=1", "task.eval_samples=0", "task.save_every=0",
                 "task.keep_last=1", "task.log_every=100", "tracking=off"], outputs)
    print(f"{label}: data prepared in {prep:.0f} s, {steps} steps x {batch} rows trained in "
          f"{train:.0f} s ({train / steps:.2f} s/step, start-up and export included)", flush=True)
    return True


def bench_arch(arch: str, args, outputs: Path, data_file: Path) -> list:
    """Train `arch` in two stages (or reuse its exports with --reuse); return the timed rows."""
    tasks = list(args.tasks)
    steps = args.steps[args.arch.index(arch)] if len(args.steps) > 1 else args.steps[0]
    name = f"sampling-cache-{arch}-{'-'.join(tasks)}"
    short = outputs / "models" / f"{name}-short{args.short_steps}-answer{args.short_answer}"
    long = outputs / "models" / (f"{name}-short{args.short_steps}-answer{args.short_answer}"
                                  f"-long{steps}-answer{args.max_new}")
    # every row is its prompt + exactly --max-new answer positions (answer, EOS, EOS padding),
    # laid out like the sampler's canvas; rows of a batch are padded with attention masking
    answer = ["dataset.padding=answer", f"dataset.answer_positions={args.max_new}"]
    short_data = [*ARCHES[arch], f"model.vocab_size={VOCAB}", f"context=ctx{SHORT}",
                  "dataset=synthetic_tasks", f"dataset.task_types=[{','.join(tasks)}]",
                  f"dataset.max_documents={args.short_examples}", "dataset.padding=answer",
                  f"dataset.answer_positions={args.short_answer}"]
    trained = train_stage(
        f"[{arch}] stage 1 (ctx{SHORT}, {args.short_examples} {'/'.join(tasks)} examples)",
        short_data, [*short_data, f"task.lr={args.short_lr}", "task.warmup_steps=50"],
        args.short_steps, args.short_batch, outputs, short, args.reuse)
    print(f"[{arch}] stage 1 exact match on 40 short prompts: {short_exact(short, args)}",
          flush=True)
    if steps == 0:  # stage 1 only: the held-out few-shot prompts go to its export
        return evaluate_arch(arch, args, short)
    # stage 2: the export brings its model group and tokenizer (the data is encoded with it)
    few = [f"init_from={short}", f"context=ctx{LONG}", "dataset=local_chat",
           f"dataset.paths=[{data_file}]", *answer]
    train_stage(f"[{arch}] stage 2 ({args.examples} few-shot chats of {PROMPTS[0]}-{PROMPTS[1]} "
                f"prompt tokens + {args.max_new})", few,
                [*few, f"task.lr={args.lr}", "task.warmup_steps=20"], steps, args.batch,
                outputs, long, args.reuse and not trained)  # a new stage 1 needs a new stage 2
    return evaluate_arch(arch, args, long)


def short_exact(export: Path, args, prompts: int = 40) -> str:
    """Return a stage-1 export's exact match per task on short prompts (llada, one block).

    Each canvas is the prompt + --short-answer masks, laid out like the rows it was trained on.
    """
    import torch

    from ldm.data import synthetic
    from ldm.model import load_model
    from ldm.sampling import SamplerSettings, generate, hf_logits_fn
    from ldm.sampling.decode import never_emitted_ids
    from ldm.sampling.prompts import Prompt, encode_prompt
    from ldm.tokenizer import load_tokenizer

    model = load_model("export", str(export)).eval()
    tok = load_tokenizer(str(export))
    banned = never_emitted_ids(tok, model.config.vocab_size)
    counts = {}  # task -> [correct, prompts]
    with torch.inference_mode():
        for ex in synthetic.generate(prompts, 20_000 + args.seed, args.tasks):
            ids = encode_prompt(tok, Prompt(ex["messages"][0]["content"]), True)
            node = {**sampler_settings("llada", {}, args.short_answer), "block_length": None}
            result = generate(hf_logits_fn(model), [ids], SamplerSettings.from_config(node),
                              mask_id=tok.mask_token_id, eos_id=tok.eos_token_id,
                              special_ids=banned, pad_id=tok.pad_token_id, record_history=False)
            answer = tok.decode(result.tokens[0], skip_special_tokens=True).strip()
            done = counts.setdefault(ex["task"], [0, 0])
            done[0] += synthetic.check(ex["task"], answer, ex["answer"])
            done[1] += 1
    return ", ".join(f"{task} {ok}/{n}" for task, (ok, n) in sorted(counts.items()))


def evaluate_arch(arch: str, args, export: Path) -> list:
    """Time every setting on the held-out prompts with the export; return the table rows."""
    import torch

    from ldm.model import load_model
    from ldm.sampling.cache import uncached_flops
    from ldm.sampling.prompts import Prompt, encode_prompt
    from ldm.tokenizer import load_tokenizer

    model = load_model("export", str(export)).eval()
    tok = load_tokenizer(str(export))
    jobs = []
    lengths = (args.eval_length, args.eval_length)
    for ex in few_shot(args.eval_prompts, 10_000 + args.seed, args.tasks, lengths):
        ids = encode_prompt(tok, Prompt(ex["messages"][0]["content"]), True)
        jobs.append({"ids": ids, "task": ex["task"], "answer": ex["answer"]})
    lengths = [len(j["ids"]) for j in jobs]
    if set(lengths) != {args.eval_length}:
        raise SystemExit(f"held-out prompts of {min(lengths)}-{max(lengths)} tokens, not "
                         f"{args.eval_length}: the tokenizer is not one token per character")
    width = max(lengths) + args.max_new
    positions = model.config.max_position_embeddings
    print(f"[{arch}] {len(jobs)} held-out prompts of {min(lengths)}-{max(lengths)} tokens "
          f"(mean {statistics.mean(lengths):.0f}), canvas = prompt + {args.max_new} "
          f"(the model has {positions} positions)", flush=True)
    full = uncached_flops(model.config, 1, width, width)
    settings = [(label, sampler_settings(p, o, args.max_new)) for label, p, o in SETTINGS]
    runs = {label: [] for label, _ in settings}
    with torch.inference_mode():
        measure(model, tok, jobs[:args.batch_eval], settings[2][1], args.batch_eval, 0)  # warm-up
        for rep in range(args.reps):
            began = time.perf_counter()
            order = settings if rep % 2 == 0 else settings[::-1]
            for label, s in order:
                runs[label].append(measure(model, tok, jobs, s, args.batch_eval, args.seed))
            print(f"[{arch}] repetition {rep + 1}/{args.reps} done "
                  f"({time.perf_counter() - began:.0f} s)", flush=True)
            rows = table_rows(arch, settings, runs, len(jobs), full)
            if rep + 1 < args.reps:  # so that an interrupted run still shows what it measured
                report(rows)
    return rows


def table_rows(arch: str, settings, runs: dict, answers: int, full: float) -> list:
    """Return one row per setting: medians and spread over the repetitions run so far."""
    rows = []
    for label, _ in settings:
        reps = runs[label]
        speeds = [r["tokens"] / max(r["seconds"], 1e-9) for r in reps]
        rows.append({"arch": arch, "setting": label, "tokens_per_s": statistics.median(speeds),
                     "spread": (min(speeds), max(speeds)),
                     "exact": statistics.mean(r["correct"] for r in reps) / answers,
                     "nfe": reps[0]["nfe"] / answers,
                     "compute": reps[0]["flops"] / answers / full,
                     "tokens": reps[0]["tokens"] / answers, "reps": len(reps),
                     "answers": answers,
                     "by_task": {task: statistics.mean(r["by_task"][task][0] for r in reps) / n
                                 for task, (_, n) in sorted(reps[0]["by_task"].items())}})
    return rows


def report(rows: list) -> list:
    """Print the table and the goals; return (text, ok) goals (ok None: a note on the goals)."""
    print(f"\n{'arch':<11}{'setting':<20}{'exact':>7}{'tok/s':>8}{'spread':>15}{'vs fast':>8}"
          f"{'vs orig':>8}{'NFE':>6}{'model-eq':>9}{'tokens':>7}  exact by task")
    goals = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        mine = {r["setting"]: r for r in rows if r["arch"] == arch}
        fast, original = mine["fast"], mine["original"]
        for r in mine.values():
            lo, hi = r["spread"]
            print(f"{arch:<11}{r['setting']:<20}{r['exact']:>7.1%}{r['tokens_per_s']:>8.1f}"
                  f"{f'{lo:.1f}-{hi:.1f}':>15}{r['tokens_per_s'] / fast['tokens_per_s']:>7.2f}x"
                  f"{r['tokens_per_s'] / original['tokens_per_s']:>7.1f}x{r['nfe']:>6.1f}"
                  f"{r['compute']:>9.2f}{r['tokens']:>7.1f}  "
                  + " ".join(f"{task} {value:.0%}" for task, value in r["by_task"].items()))
        dual = mine["fast+dual"]
        ratio = dual["tokens_per_s"] / fast["tokens_per_s"]
        loss = (fast["exact"] - dual["exact"]) * 100
        goals.append((f"{arch}: fast+dual {ratio:.2f}x the tokens/s of fast (>= 3x), "
                      f"{loss:+.1f} points exact match lost (<= 1)", ratio >= 3 and loss <= 1))
        eligible = [r for r in mine.values() if r["exact"] >= original["exact"]]
        best = max(eligible or mine.values(), key=lambda r: r["tokens_per_s"])
        speedup = best["tokens_per_s"] / original["tokens_per_s"]
        goals.append((f"{arch}: best setting at >= original's exact match, {best['setting']}, is "
                      f"{speedup:.1f}x original's tokens/s (>= 15x); exact {best['exact']:.1%} vs "
                      f"{original['exact']:.1%}", bool(eligible) and speedup >= 15))
        reps = min(r["reps"] for r in mine.values())
        note = f"{arch}: {fast['answers']} held-out prompts, {reps} repetition(s)"
        if reps < 5:
            note += "; the goals ask for the median of at least 5"
        if not any(r["exact"] for r in mine.values()):
            note += "; no setting answers any prompt right, so the accuracy half says nothing"
        goals.append((note, None))
    print()
    for text, ok in goals:
        print(f"[{'NOTE' if ok is None else 'PASS' if ok else 'FAIL'}] {text}")
    return goals


def plot(rows: list, path: Path) -> None:
    """Save exact match vs tokens/s per setting and architecture as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for arch, marker, short in (("bert", "s", "BERT"), ("modernbert", "o", "MB")):
        mine = [r for r in rows if r["arch"] == arch]
        for r in mine:
            ax.scatter(r["tokens_per_s"], 100 * r["exact"], marker=marker)
            ax.annotate(f"{short} {r['setting']}", (r["tokens_per_s"], 100 * r["exact"]),
                        fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_ylim(-5, 105)
    ax.set_xlabel("answer tokens per second (CPU, log scale)")
    ax.set_ylabel("exact match on held-out few-shot prompts (%)")
    ax.set_title("sampling with long prompts: cache and commit rules")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", choices=sorted(ARCHES), default=["bert", "modernbert"])
    parser.add_argument("--tasks", nargs="+", default=["copy", "reverse"],
                        help="synthetic task types of both stages and of the held-out prompts")
    parser.add_argument("--short-steps", type=int, default=1000,
                        help=f"stage-1 steps (ctx{SHORT})")
    parser.add_argument("--short-batch", type=int, default=64)
    parser.add_argument("--short-lr", type=float, default=3e-3)
    parser.add_argument("--short-answer", type=int, default=12,
                        help="stage-1 answer area: answer + EOS padding, in tokens")
    parser.add_argument("--short-examples", type=int, default=8000)
    parser.add_argument("--steps", type=int, nargs="+", default=[400],
                        help="stage-2 steps (few-shot prompts), one for every --arch or one for "
                             "all; 0: stage 1 only")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--examples", type=int, default=4000, help="few-shot chats of stage 2")
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--eval-length", type=int, default=PROMPTS[1],
                        help="tokens of every held-out few-shot prompt, chat marks included")
    parser.add_argument("--batch-eval", type=int, default=8)
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="reuse exports of the same run names")
    parser.add_argument("--outputs", default=str(REPO / "outputs" / "benchmarks" / "sampling_cache"))
    parser.add_argument("--plot", default=str(Path(__file__).with_name("sampling_cache.png")))
    args = parser.parse_args()
    if not 2 <= args.max_new <= LONG - PROMPTS[1]:
        parser.error(f"--max-new must be in 2..{LONG - PROMPTS[1]} (the answer area after a "
                     f"prompt of {PROMPTS[1]} tokens within {LONG} positions)")
    if not 64 <= args.eval_length <= PROMPTS[1]:
        parser.error(f"--eval-length must be in 64..{PROMPTS[1]}")
    if len(args.steps) not in (1, len(args.arch)):
        parser.error("--steps takes one value, or one per --arch")
    outputs = Path(args.outputs)
    outputs.mkdir(parents=True, exist_ok=True)
    data_file = outputs / "few_shot.jsonl"
    text = "".join(json.dumps({"messages": ex["messages"]}) + "\n"
                   for ex in few_shot(args.examples, args.seed, args.tasks, PROMPTS))
    if not data_file.is_file() or data_file.read_text() != text:  # same file: prepared data reused
        data_file.write_text(text)
    rows = []
    for arch in args.arch:
        rows += bench_arch(arch, args, outputs, data_file)
    report(rows)
    (outputs / "results.json").write_text(json.dumps(rows, indent=1))
    plot(rows, Path(args.plot))


if __name__ == "__main__":
    main()
