"""Sampling speed with long few-shot prompts: KV cache, block-only logits, entropy-bounded commits.

    .venv/bin/python benchmarks/sampling_cache.py [--arch bert modernbert] [--eval-prompts 32]
        [--reps 5] [--reuse]     (training steps and learning rates per architecture: DEFAULTS)

1. Trains a tiny BERT and a tiny ModernBERT (hidden 128, 4 layers, no dropout, a byte-level
   tokenizer of 262 tokens without merges: one token per character, the same whatever text it
   is trained on) with ordinary run.py runs, in two stages, so that the model learns the tasks
   where a step is cheap and then only has to find them in a long prompt. Both stages use
   `dataset.padding=answer`: a row is its prompt plus exactly `answer_positions` answer tokens
   (the answer, its EOS, then EOS padding), laid out like the sampler's canvas (prompt +
   max_new_tokens masks); rows of different lengths are batched with attention-masked padding.
   A model this small reads the room left for its answer from where the row ends.
   - stage 1: SFT from scratch on the short synthetic tasks (`--tasks`) with an answer area of
     `--short-answer` (16) tokens at ctx48, laid out as the quickstart's task model; its exact
     match on 40 short prompts (canvas = prompt + 16) is printed, to tell an undertrained stage
     1 from a stage 2 that did not transfer. BERT (post-LayerNorm) learns nothing at the lr of
     3e-3 that ModernBERT learns with, and its tasks at 1e-3. The default tasks are the open
     tasks `letters` and `anyorder` (ldm.data.synthetic.OPEN_TASKS): answers with several
     right forms, so that even a well-trained model must commit its choices over several calls,
     as with open-ended text. With one right answer (the library's copy and reverse), a trained
     model fills a block in one call and the cache has nothing to save (benchmarks/RESULTS.md, fourth
     run). `--short-offset N` starts each prompt after 0..N spaces (absolute positions up to N
     for BERT); `--tasks ... phrase` adds a long-answer task (copy 4-9 real words, answers of up
     to 56 tokens), which needs an answer area of 64 already in stage 1.
   - stage 2: SFT from the stage-1 export (`init_from`: its weights, model group and tokenizer,
     with which the few-shot chats are prepared) on few-shot chats with an answer area of
     `--max-new` (64) tokens, context 1,024 (the models' positions). Each user turn holds
     solved examples of the tasks and then one to solve; the prompt is `--prompts` tokens
     (drawn uniformly, 48-512 by default: the short ones bridge from stage 1's layout; leading
     spaces fill what the examples leave), and the answer is the task's exactly checkable one.
     The BERT variant has absolute position embeddings for 1,024 positions (modernbert_tiny's
     max_positions); those past 48 are first trained here, and it learns only with prompts of
     one length (DEFAULTS: exactly 512, the held-out length), so that the task and its answer
     sit at the same absolute positions in every row, as in stage 1. On 48-512-token prompts it
     answered EOS at once on every prompt (600 and 1,200 steps). A BERT trained this way answers
     512-token prompts only.
   What did not learn, on this CPU (benchmarks/RESULTS.md has the figures): stage 1's skill
   alone on few-shot prompts; the few-shot layout from scratch with an answer area of 64; stage
   1 with an answer area of 64 (phrase); BERT's stage 1 with offsets up to 160; anyorder with
   4-6 words (2-3 are learned in part).
2. In one process, answers the same held-out prompts, each `--eval-length` (512) tokens (canvas
   = prompt + 64 masks, as in training; batched), with each setting: original, llada, fast,
   fast+prefix, fast+dual, entropy_bound, entropy_bound+dual. Timings are the median of `--reps`
   (default 5) repetitions, the settings' order alternating between repetitions, with the
   min-max spread; tokens/s counts each answer's whole area (--max-new positions, decoded or EOS
   by early stop) per second, the same for every setting, so its ratios are ratios of time per
   answer; "decoded" is the positions a setting committed per answer (early stop ends an answer
   at the block holding its EOS). Exact match is the task's check: one right answer for the
   library's tasks, any right one for letters and anyorder. Also reported: exact match (overall
   and per task), model calls (NFE) per answer and model-equivalent compute per answer
   (estimated forward FLOPs of the encoder + head over those of one uncached full forward of the
   canvas), and the milliseconds of one full forward of a batch through transformers (what
   `cache=none` runs) and through the cache's own layer loop (what starts each cached block), so
   that a reader can tell the cache's saving from a difference between the two implementations.
3. Prints the goals with PASS/FAIL: fast+dual >= 3x the tokens/s of fast at <= 1 point less
   exact match; the best setting >= 15x the tokens/s of original at equal or better exact match.
   Saves accuracy vs tokens/s as sampling_cache.png next to RESULTS.md (`--plot`), the rows as
   results.json under `--outputs`.

`--reuse` skips a stage whose export (same architecture, tasks, step counts, learning rates,
prompt lengths and answer areas) exists; `--steps 0` evaluates the stage-1 export. A quick
end-to-end check of the script (a few minutes, the numbers mean nothing):
    ... sampling_cache.py --short-steps 20 --steps 5 --short-examples 500 --examples 200
        --eval-prompts 2 --batch-eval 2 --reps 1 --outputs /tmp/sc --plot /tmp/sc/plot.png
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from ldm.data.synthetic import OPEN_TASKS, check, open_examples
from ldm.config import load_preset

from sampling_speed import run  # benchmarks/sampling_speed.py: run.py with LDM_OUTPUTS set

REPO = Path(__file__).resolve().parents[1]

VOCAB = 262  # byte-level BPE without merges: the same tokenizer whatever text it is trained on
# per-architecture defaults of --steps, --lr, --short-steps, --short-lr, --short-offset and
# --prompts: those of the recorded run (benchmarks/RESULTS.md)
DEFAULTS = {"steps": {"bert": 700, "modernbert": 1500}, "lr": {"bert": 1e-3, "modernbert": 1e-3},
            "short_steps": {"bert": 2000, "modernbert": 2000},
            "short_lr": {"bert": 1e-3, "modernbert": 3e-3},
            "short_offset": {"bert": 0, "modernbert": 0},
            "prompts": {"bert": (512, 512), "modernbert": (48, 512)}}
PER_ARCH = ("steps", "lr", "short_steps", "short_lr", "short_offset")  # one value or one per arch
CONTEXTS = (48, 128, 256)  # stage 1's context: the smallest that holds its longest prompt (chat
# marks included) + --short-answer
LONG = 1024  # stage-2 context (the models' positions): rows are at most PROMPTS[1] + --max-new
PROMPTS = (256, 512)  # the benchmark's few-shot prompt lengths in tokens, chat marks included; the
# held-out prompts are --eval-length long (512); stage 2 trains on --prompts (48-512)
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
    ("fast+dual", "fast_dual", {}),  # = fast with cache: dual (tests/unit/test_sampler.py)
    ("entropy_bound", "entropy_bound", {"cache": "none"}),
    ("entropy_bound+dual", "entropy_bound", {"cache": "dual"}),
]
CHAT_MARKS = 3  # the user, end and assistant marks around a one-turn prompt's text
# The library's types answer in <= 30 tokens, one right answer each; ldm.data.synthetic's open
# tasks (phrase, anyorder, letters) have long answers or several right ones.
TASKS = ("copy", "reverse", "count", "sort", "max", "add", *OPEN_TASKS)


def few_shot(n: int, seed: int, tasks, lengths) -> list:
    """Return n chat examples: solved examples of random tasks, then one to solve.

    Each prompt is a length drawn uniformly from `lengths` (lo, hi) tokens, chat marks included;
    its user text has that length less CHAT_MARKS characters (the byte-level tokenizer makes one
    token of each): solved examples are added while they fit, and leading spaces fill what is
    left. A length too short for the heading and the task gives a prompt of just the task.
    """
    pool = open_examples(n * 16, seed, tasks)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        target = pool[i]
        chars = rng.randint(*lengths) - CHAT_MARKS
        head, tail = "Solved examples:", f"\nNow solve:\n{target['messages'][0]['content']}"
        budget = chars - len(head) - len(tail)
        if budget < 0:
            head, tail = "", target["messages"][0]["content"]
            budget = max(0, chars - len(tail))
        lines = []
        while head:
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

    node = load_preset(preset)
    node.max_new_tokens = max_new
    out = OmegaConf.to_container(node, resolve=True)
    out.pop("name")
    out.update(overrides)
    return out


def measure(model, tok, jobs, settings, batch: int, seed: int) -> dict:
    """Answer every job once; return seconds, tokens, exact matches, NFE and FLOPs."""
    import torch

    from ldm.sampling import SamplerSettings, generate, sampler_model
    from ldm.sampling.decode import never_emitted_ids

    fn = sampler_model(model)
    settings = SamplerSettings.from_config(settings, model.config.max_position_embeddings)
    banned = never_emitted_ids(tok, model.config.vocab_size)
    seconds = tokens = decoded = correct = nfe = flops = 0.0
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
        # Throughput counts each answer's whole area (max_new_tokens positions: decoded, or EOS
        # by early stop), the same for every setting, so its ratios are ratios of time per
        # answer, what a user waits. Counting only decoded positions would credit a setting
        # without early stop (original fills all 64) with the EOS padding it decodes.
        tokens += len(part) * settings.max_new_tokens
        decoded += sum(result.committed)
        for job, ids in zip(part, result.tokens):
            answer = tok.decode(ids, skip_special_tokens=True).strip()
            ok = check(job["task"], answer, job["answer"])
            correct += ok
            counts = by_task.setdefault(job["task"], [0, 0])
            counts[0] += ok
            counts[1] += 1
    return {"seconds": seconds, "tokens": tokens, "decoded": decoded, "correct": correct,
            "nfe": nfe, "flops": flops, "by_task": by_task}


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


def bench_arch(arch: str, args, outputs: Path) -> list:
    """Train `arch` in two stages (or reuse its exports with --reuse); return the timed rows."""
    pick = args.arch.index(arch)
    steps, lr, short_steps, short_lr, short_offset = (
        DEFAULTS[flag][arch] if getattr(args, flag) is None
        else getattr(args, flag)[pick] if len(getattr(args, flag)) > 1 else getattr(args, flag)[0]
        for flag in PER_ARCH)
    lo, hi = args.prompts or DEFAULTS["prompts"][arch]
    name = f"sampling-cache-{arch}-{'-'.join(args.tasks)}"
    offset = f"-offset{short_offset}" if short_offset else ""
    short = (outputs / "models"
             / f"{name}-short{short_steps}{offset}-answer{args.short_answer}-lr{short_lr:g}")
    long = outputs / "models" / f"{short.name}-long{lo}-{hi}x{steps}-answer{args.max_new}-lr{lr:g}"
    short_chats = open_examples(args.short_examples, args.seed + 1, args.tasks)
    if short_offset:  # leading spaces: the task at absolute positions up to the offset
        rng = random.Random(f"offset:{args.seed}")
        for ex in short_chats:
            ex["messages"][0]["content"] = (" " * rng.randint(0, short_offset)
                                            + ex["messages"][0]["content"])
    if set(args.tasks) & set(OPEN_TASKS) or short_offset:  # as chats in a file
        chats = outputs / f"short{offset}.jsonl"
        write_chats(chats, short_chats)
        data = ["dataset=local_chat", f"dataset.paths=[{chats}]"]
    else:
        data = ["dataset=synthetic_tasks", f"dataset.task_types=[{','.join(args.tasks)}]",
                f"dataset.max_documents={args.short_examples}"]
    answer = max(len(ex["answer"]) for ex in short_chats)
    if answer + 1 > min(args.short_answer, args.max_new):
        raise SystemExit(f"answers of up to {answer} tokens + EOS do not fit in --short-answer "
                         f"{args.short_answer} / --max-new {args.max_new}")
    longest = max(len(ex["messages"][0]["content"]) for ex in short_chats) + CHAT_MARKS
    fits = [c for c in CONTEXTS if c >= longest + args.short_answer]
    if not fits:
        raise SystemExit(f"stage 1: prompts of up to {longest} tokens + --short-answer "
                         f"{args.short_answer} do not fit in ctx{CONTEXTS[-1]}")
    ctx = fits[0]
    short_data = [*ARCHES[arch], f"model.vocab_size={VOCAB}", f"context=ctx{ctx}", *data,
                  "dataset.padding=answer", f"dataset.answer_positions={args.short_answer}"]
    trained = train_stage(
        f"[{arch}] stage 1 (ctx{ctx}, {args.short_examples} {'/'.join(args.tasks)} examples)",
        short_data, [*short_data, f"task.lr={short_lr}", "task.warmup_steps=50"],
        short_steps, args.short_batch, outputs, short, args.reuse)
    print(f"[{arch}] stage 1 exact match on 40 short prompts: {short_exact(short, args)}",
          flush=True)
    if steps == 0:  # stage 1 only: the held-out few-shot prompts go to its export
        return evaluate_arch(arch, args, short)
    # stage 2: the export brings its model group and tokenizer (the data is encoded with it);
    # every row is its prompt + exactly --max-new answer positions (answer, EOS, EOS padding),
    # laid out like the sampler's canvas; rows of a batch are padded with attention masking
    few = [f"init_from={short}", f"context=ctx{LONG}", "dataset=local_chat",
           f"dataset.paths=[{few_shot_file(outputs, args, (lo, hi))}]", "dataset.padding=answer",
           f"dataset.answer_positions={args.max_new}"]
    train_stage(f"[{arch}] stage 2 (ctx{LONG}, {args.examples} few-shot chats of {lo}-{hi} "
                f"prompt tokens + {args.max_new})", few,
                [*few, f"task.lr={lr}", "task.warmup_steps=20"], steps, args.batch,
                outputs, long, args.reuse and not trained)  # a new stage 1 needs a new stage 2
    return evaluate_arch(arch, args, long)


def few_shot_file(outputs: Path, args, lengths) -> Path:
    """Write stage 2's few-shot chats of `lengths` (lo, hi) prompt tokens as a messages .jsonl;
    return its path."""
    path = outputs / f"few_shot_{lengths[0]}-{lengths[1]}.jsonl"
    write_chats(path, few_shot(args.examples, args.seed, args.tasks, lengths))
    return path


def write_chats(path: Path, chats: list) -> None:
    """Write chats as a messages .jsonl, unless the file holds them already (its prepared data
    is then reused)."""
    text = "".join(json.dumps({"messages": ex["messages"]}) + "\n" for ex in chats)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def short_exact(export: Path, args, prompts: int = 40) -> str:
    """Return a stage-1 export's exact match per task on short prompts (llada, one block).

    Each canvas is the prompt + --short-answer masks, laid out like the rows it was trained on.
    """
    import torch

    from ldm.model import load_model
    from ldm.sampling import SamplerSettings, generate, sampler_model
    from ldm.sampling.decode import never_emitted_ids
    from ldm.sampling.prompts import Prompt, encode_prompt
    from ldm.tokenizer import load_tokenizer

    model = load_model("export", str(export)).eval()
    tok = load_tokenizer(str(export))
    banned = never_emitted_ids(tok, model.config.vocab_size)
    node = {**sampler_settings("llada", {}, args.short_answer), "block_length": None}
    counts = {}  # task -> [correct, prompts]
    with torch.inference_mode():
        for ex in open_examples(prompts, 20_000 + args.seed, args.tasks):
            ids = encode_prompt(tok, Prompt(ex["messages"][0]["content"]), True)
            result = generate(sampler_model(model), [ids], SamplerSettings.from_config(node),
                              mask_id=tok.mask_token_id, eos_id=tok.eos_token_id,
                              special_ids=banned, pad_id=tok.pad_token_id, record_history=False)
            answer = tok.decode(result.tokens[0], skip_special_tokens=True).strip()
            done = counts.setdefault(ex["task"], [0, 0])
            done[0] += check(ex["task"], answer, ex["answer"])
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
    forwards = {"transformers": [], "cache": []}  # ms of one full forward of a batch
    canvas = torch.tensor([j["ids"] + [tok.mask_token_id] * args.max_new
                           for j in jobs[:args.batch_eval]])
    with torch.inference_mode():
        measure(model, tok, jobs[:args.batch_eval], settings[2][1], args.batch_eval, 0)  # warm-up
        for rep in range(args.reps):
            began = time.perf_counter()
            order = settings if rep % 2 == 0 else settings[::-1]
            for label, s in order:
                runs[label].append(measure(model, tok, jobs, s, args.batch_eval, args.seed))
            for path, ms in full_forward_ms(model, canvas, args.max_new).items():
                forwards[path].append(ms)
            print(f"[{arch}] repetition {rep + 1}/{args.reps} done "
                  f"({time.perf_counter() - began:.0f} s)", flush=True)
            rows = table_rows(arch, settings, runs, len(jobs), full)
            for row in rows:
                row["full_forward_ms"] = {path: (statistics.median(v), min(v), max(v))
                                          for path, v in forwards.items()}
            if rep + 1 < args.reps:  # so that an interrupted run still shows what it measured
                report(rows)
    return rows


def full_forward_ms(model, canvas, max_new: int, calls: int = 3) -> dict:
    """Return the median ms of one full forward of `canvas` through transformers (cache=none)
    and through BlockCache's layer loop (the forward that starts each cached block)."""
    import torch

    from ldm.sampling.cache import BlockCache
    from ldm.sampling.model import sampler_model

    attn = torch.ones_like(canvas)
    rows = torch.arange(canvas.shape[0])
    lo = canvas.shape[1] - max_new
    hi = lo + min(32, max_new)  # the presets' first block
    sampled = sampler_model(model)
    cache = BlockCache(sampled, "dual", canvas.shape[0])
    paths = {"transformers": lambda block: sampled.block_logits(canvas, attn, lo, hi),
             "cache": lambda block: cache.logits(canvas, attn, rows, lo, hi, block)}
    times = {path: [] for path in paths}
    for call in range(calls):
        for path, forward in paths.items():
            began = time.perf_counter()
            forward(call)  # a new block each call: the cache runs its full forward
            times[path].append(1000 * (time.perf_counter() - began))
    return {path: statistics.median(t) for path, t in times.items()}


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
                     "decoded": reps[0]["decoded"] / answers, "reps": len(reps),
                     "answers": answers,
                     "by_task": {task: statistics.mean(r["by_task"][task][0] for r in reps) / n
                                 for task, (_, n) in sorted(reps[0]["by_task"].items())}})
    return rows


def report(rows: list) -> list:
    """Print the table and the goals; return (text, ok) goals (ok None: a note on the goals)."""
    print(f"\n{'arch':<11}{'setting':<20}{'exact':>7}{'tok/s':>8}{'spread':>15}{'vs fast':>8}"
          f"{'vs orig':>8}{'NFE':>6}{'model-eq':>9}{'decoded':>8}  exact by task")
    goals = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        mine = {r["setting"]: r for r in rows if r["arch"] == arch}
        fast, original = mine["fast"], mine["original"]
        for r in mine.values():
            lo, hi = r["spread"]
            print(f"{arch:<11}{r['setting']:<20}{r['exact']:>7.1%}{r['tokens_per_s']:>8.1f}"
                  f"{f'{lo:.1f}-{hi:.1f}':>15}{r['tokens_per_s'] / fast['tokens_per_s']:>7.2f}x"
                  f"{r['tokens_per_s'] / original['tokens_per_s']:>7.1f}x{r['nfe']:>6.1f}"
                  f"{r['compute']:>9.2f}{r['decoded']:>8.1f}  "
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
        ms = fast.get("full_forward_ms")
        if ms:
            (hf, hf_lo, hf_hi), (own, own_lo, own_hi) = ms["transformers"], ms["cache"]
            goals.append((f"{arch}: one full forward of a batch: transformers (cache=none) "
                          f"{hf:.0f} ms ({hf_lo:.0f}-{hf_hi:.0f}), the cache's layer loop (first "
                          f"call of a cached block) {own:.0f} ms ({own_lo:.0f}-{own_hi:.0f})",
                          None))
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

    fig, ax = plt.subplots(figsize=(8, 5))
    for arch, marker, short in (("bert", "s", "BERT"), ("modernbert", "o", "MB")):
        mine = sorted((r for r in rows if r["arch"] == arch), key=lambda r: r["tokens_per_s"])
        for i, r in enumerate(mine):
            ax.scatter(r["tokens_per_s"], 100 * r["exact"], marker=marker)
            # settings of equal accuracy sit on one line: labels alternate above and below it
            rise = 4 + 9 * (i % 3) if i % 2 == 0 else -10 - 9 * (i % 3)
            ax.annotate(f"{short} {r['setting']}", (r["tokens_per_s"], 100 * r["exact"]),
                        fontsize=6, xytext=(2, rise), textcoords="offset points", rotation=20)
    ax.set_xscale("log")
    ax.set_ylim(-5, 105)
    ax.set_xlabel("answer tokens per second, the whole answer area per answer (CPU, log scale)")
    ax.set_ylabel("right answers on held-out few-shot prompts (%)")
    ax.set_title("sampling with long prompts: cache and commit rules")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", choices=sorted(ARCHES), default=["bert", "modernbert"])
    parser.add_argument("--tasks", nargs="+", default=["letters", "anyorder"], choices=TASKS,
                        help="synthetic task types of both stages and of the held-out prompts")
    parser.add_argument("--short-steps", type=int, nargs="+",
                        help="stage-1 steps: one per --arch or one for all (default: DEFAULTS)")
    parser.add_argument("--short-batch", type=int, default=64)
    parser.add_argument("--short-lr", type=float, nargs="+",
                        help="stage-1 lr: one per --arch or one for all (default: DEFAULTS)")
    parser.add_argument("--short-answer", type=int, default=16,
                        help="stage-1 answer area: answer + EOS padding, in tokens")
    parser.add_argument("--short-examples", type=int, default=8000)
    parser.add_argument("--short-offset", type=int, nargs="+",
                        help="stage-1 prompts start after 0..N leading spaces (uniform): one per "
                             "--arch or one for all (default: DEFAULTS)")
    parser.add_argument("--steps", type=int, nargs="+",
                        help="stage-2 steps (few-shot prompts): one per --arch or one for all "
                             "(default: DEFAULTS); 0: stage 1 only")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, nargs="+",
                        help="stage-2 lr: one per --arch or one for all (default: DEFAULTS)")
    parser.add_argument("--examples", type=int, default=4000, help="few-shot chats of stage 2")
    parser.add_argument("--prompts", type=int, nargs=2, metavar=("LO", "HI"),
                        help="stage-2 prompt lengths in tokens (uniform), for every --arch "
                             "(default: DEFAULTS)")
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--eval-length", type=int, default=PROMPTS[1],
                        help="tokens of every held-out few-shot prompt, chat marks included")
    parser.add_argument("--batch-eval", type=int, default=8)
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="reuse exports of the same run names")
    parser.add_argument("--outputs",
                        default=str(REPO / "outputs" / "benchmarks" / "sampling_cache"))
    parser.add_argument("--plot", default=str(Path(__file__).with_name("sampling_cache.png")))
    args = parser.parse_args()
    if not 2 <= args.max_new <= LONG - PROMPTS[1]:
        parser.error(f"--max-new must be in 2..{LONG - PROMPTS[1]} (the answer area after a "
                     f"prompt of {PROMPTS[1]} tokens within {LONG} positions)")
    if not 64 <= args.eval_length <= PROMPTS[1]:
        parser.error(f"--eval-length must be in 64..{PROMPTS[1]}")
    if args.prompts and not 48 <= args.prompts[0] <= args.prompts[1] <= PROMPTS[1]:
        parser.error(f"--prompts LO HI must satisfy 48 <= LO <= HI <= {PROMPTS[1]}")
    for flag in PER_ARCH:  # unset: the architecture's default
        if getattr(args, flag) is not None and len(getattr(args, flag)) not in (1, len(args.arch)):
            parser.error(f"--{flag.replace('_', '-')} takes one value, or one per --arch")
    outputs = Path(args.outputs)
    outputs.mkdir(parents=True, exist_ok=True)
    rows = []
    for arch in args.arch:
        rows += bench_arch(arch, args, outputs)
    report(rows)
    (outputs / "results.json").write_text(json.dumps(rows, indent=1))
    plot(rows, Path(args.plot))


if __name__ == "__main__":
    main()
