"""Held-out evaluation: the negative ELBO per token, its perplexity bound, accuracy by t bucket;
and the scoring of sampled answers (SQuAD token F1, exact-match summaries).

Deterministic by construction: a fixed subset of held-out rows, and for each row one t drawn
inside each of K equal strata of [eps, 1] (stratified sampling of the ELBO's integral over t,
an unbiased estimate, unlike midpoint quadrature on a fixed grid) with its mask, from generators
seeded per (row, stratum, sample). The same model gives the same numbers at every step of every
run and at any batch size, so curves are comparable and a run's last evaluation equals
task=evaluate's on its export.
"""

from __future__ import annotations

import collections
import math
import re
import string
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ldm.data.sft import last_answer_start
from ldm.masking import get_schedule
from ldm.model import logits_at

BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)


def t_grid(points: int, eps: float) -> torch.Tensor:
    """Return `points` midpoints of equal bins of [eps, 1] (the strata's centres)."""
    return eps + (1.0 - eps) * (torch.arange(points, dtype=torch.float64) + 0.5) / points


def row_generator(seed: int, row: int, stratum: int, sample: int) -> torch.Generator:
    """Return the CPU generator of one held-out row's draw in one t stratum.

    Seeded by the row's index in the split, not its batch, so the estimate does not depend on
    the batch size: training-time evaluation and task=evaluate draw the same t and masks.
    """
    return torch.Generator().manual_seed(((seed * 7919 + row) * 1009 + stratum) * 131 + sample)


@torch.no_grad()
def heldout_nelbo(
    model,
    batches: Iterable[Dict[str, Optional[torch.Tensor]]],
    *,
    schedule: str,
    eps: float,
    grid_points: int,
    mask_id: int,
    seed: int = 0,
    samples: int = 1,
) -> Dict[str, float]:
    """Return {nelbo, ppl_bound, acc_t<lo>-<hi>...} over `batches` (input_ids, maskable, attention_mask).

    nelbo is per maskable token: the mean over t of w(t) * (sum of masked-token NLL) / maskable
    tokens. t is drawn by stratified sampling: [eps, 1] is cut into `grid_points` equal strata
    and each row draws one t uniformly inside each stratum (`samples` times, each with its own
    mask), all from generators seeded per row. So the number is deterministic for a seed and,
    unlike a fixed grid of t, an unbiased estimate of the negative ELBO.
    On EOS-padded chat rows the maskable tokens are mostly padding, so batches that carry an
    `answer` mask (the answer tokens and their closing EOS, padding excluded) also give
    answer_nelbo / answer_ppl_bound: the same terms summed over those tokens only, divided by
    their number, with answer_tokens and maskable_tokens counted beside them.
    """
    sched = get_schedule(schedule)
    total_bound = 0.0
    total_tokens = 0.0
    answer_bound = 0.0
    answer_tokens = 0.0
    has_answer = False
    correct = torch.zeros(len(BUCKETS) - 1, dtype=torch.float64)
    counted = torch.zeros(len(BUCKETS) - 1, dtype=torch.float64)
    first_row = 0
    for batch in batches:
        ids = batch["input_ids"]
        maskable = batch.get("maskable")
        attention = batch.get("attention_mask")
        if maskable is None:
            maskable = attention.bool() if attention is not None else torch.ones_like(ids, dtype=torch.bool)
        maskable = maskable.bool()
        total_tokens += float(maskable.sum())
        rows, width = ids.shape
        answer = batch.get("answer")
        if answer is not None:
            has_answer = True
            answer = answer.bool()
            answer_tokens += float(answer.sum())
        for k in range(grid_points):
            for s in range(samples):
                gens = [row_generator(seed, first_row + r, k, s) for r in range(rows)]
                offset = torch.stack([torch.rand((), dtype=torch.float64, generator=g)
                                      for g in gens])
                t = eps + (1.0 - eps) * (k + offset) / grid_points  # [rows] float64
                u = torch.stack([torch.rand(width, generator=g) for g in gens]).to(ids.device)
                prob = sched.mask_prob(t).float().to(ids.device)
                masked = (u < prob[:, None]) & maskable
                if not masked.any():
                    continue
                noisy = ids.masked_fill(masked, mask_id)
                logits = logits_at(model, noisy, attention, masked).float()
                targets = ids[masked]
                nll = F.cross_entropy(logits, targets, reduction="none").double().cpu()
                row_of = masked.nonzero()[:, 0].cpu()  # row-major, as logits_at returns them
                weight = sched.weight(t).double().cpu()[row_of]  # each masked token's row w(t)
                total_bound += float((weight * nll).sum()) / (grid_points * samples)
                if answer is not None:
                    in_answer = answer[masked].cpu()
                    answer_bound += float((weight * nll)[in_answer].sum()) / (grid_points * samples)
                bucket = (t * (len(BUCKETS) - 1)).long().clamp(max=len(BUCKETS) - 2)[row_of]
                hits = (logits.argmax(-1) == targets).double().cpu()
                correct.index_add_(0, bucket, hits)
                counted.index_add_(0, bucket, torch.ones_like(hits))
        first_row += rows
    nelbo = total_bound / max(total_tokens, 1.0)
    out = {"nelbo": nelbo, "ppl_bound": math.exp(min(nelbo, 700.0))}
    if has_answer:
        answer_nelbo = answer_bound / max(answer_tokens, 1.0)
        out.update({"answer_nelbo": answer_nelbo,
                    "answer_ppl_bound": math.exp(min(answer_nelbo, 700.0)),
                    "answer_tokens": answer_tokens, "maskable_tokens": total_tokens})
    for i in range(len(BUCKETS) - 1):
        if counted[i] > 0:
            out[f"acc_t{BUCKETS[i]:.2f}-{BUCKETS[i + 1]:.2f}"] = float(correct[i] / counted[i])
    return out


def fixed_batches(data, num_batches: int, batch_size: int, collate: Callable, device,
                  max_rows: Optional[int] = None):
    """Yield the first num_batches x batch_size rows of `data` (at most `max_rows`), batched."""
    rows = min(len(data), num_batches * batch_size, max_rows or len(data))
    view = data.with_format("numpy")
    for start in range(0, rows, batch_size):
        yield collate(view[start:min(start + batch_size, rows)], device)


# --- answers to held-out prompts --------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def f1_tokens(text: str) -> List[str]:
    """Return SQuAD's normalised tokens of `text`: lowercase, no punctuation or articles."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return _ARTICLES.sub(" ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    """Return the SQuAD token F1 of `prediction` against `reference` (1.0 when both are empty)."""
    pred, gold = f1_tokens(prediction), f1_tokens(reference)
    if not pred or not gold:
        return float(pred == gold)
    same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def heldout_answers(test_split, count: int, from_end: bool = False
                    ) -> List[Tuple[List[int], List[int]]]:
    """Return (prompt ids, reference ids) of the last answer of the first `count` held-out rows
    (the last `count` rows with from_end=True, in split order).

    The prompt is everything before the row's last answer span (earlier answers included, so a
    multi-turn conversation is asked its last question in context); the reference runs from
    there to the row's length (the answer and its EOS, without the EOS padding).
    """
    out = []
    view = test_split.with_format("numpy")
    total = len(test_split)
    rows = range(max(0, total - count), total) if from_end else range(min(count, total))
    for i in rows:
        row = view[i]
        ids, mask = np.asarray(row["input_ids"]), np.asarray(row["answer_mask"]).astype(bool)
        length = int(row["length"]) if "length" in row else len(ids)
        if not mask[:length].any():
            continue
        start = last_answer_start(mask[:length])
        if start == 0 or start >= length:
            continue
        out.append((ids[:start].tolist(), ids[start:length].tolist()))
    return out


def answer_metrics(records: Sequence[Dict]) -> Dict[str, float]:
    """Return exact_match (overall and per task type) or f1, mean nfe, seconds and tokens/s.

    Records carry nfe, seconds and tokens, and either `correct` (with `task`) or `f1`.
    """
    if not records:
        return {}
    out: Dict[str, float] = {"examples": float(len(records))}
    scored = [r for r in records if "correct" in r]
    if scored:
        out["exact_match"] = sum(r["correct"] for r in scored) / len(scored)
        for task in sorted({r["task"] for r in scored}):
            mine = [r["correct"] for r in scored if r["task"] == task]
            out[f"exact_match.{task}"] = sum(mine) / len(mine)
        unseen = [r for r in scored if r.get("seen_in_training") is False]
        if any("seen_in_training" in r for r in scored):
            # held-out prompts that are not also training prompts: what the model generalises to
            out["unseen_examples"] = float(len(unseen))
            if unseen:
                out["exact_match_unseen"] = sum(r["correct"] for r in unseen) / len(unseen)
            for task in sorted({r["task"] for r in unseen}):
                mine = [r["correct"] for r in unseen if r["task"] == task]
                out[f"exact_match_unseen.{task}"] = sum(mine) / len(mine)
    with_f1 = [r["f1"] for r in records if "f1" in r]
    if with_f1:
        out["f1"] = sum(with_f1) / len(with_f1)
    seconds = sum(r["seconds"] for r in records)
    out["mean_nfe"] = sum(r["nfe"] for r in records) / len(records)
    out["seconds_per_answer"] = seconds / len(records)
    out["mean_answer_tokens"] = sum(r["tokens"] for r in records) / len(records)
    out["tokens_per_second"] = sum(r["tokens"] for r in records) / seconds if seconds > 0 else 0.0
    return out


def synthetic_references(manifest: dict, tok, prompts: List[List[int]], data_dir: Path,
                         command: str) -> List[Tuple[str, str]]:
    """Return (task type, reference answer) for each held-out synthetic prompt, in order."""
    return [(ex["task"], ex["answer"])
            for ex in synthetic_examples(manifest, tok, prompts, data_dir, command)]


def synthetic_examples(manifest: dict, tok, prompts: List[List[int]], data_dir: Path,
                       command: str) -> List[dict]:
    """Return the regenerated synthetic example (task, messages, answer) of each held-out prompt.

    The examples are regenerated from the generator settings the data was prepared with (its
    manifest) and the held-out ones picked with the same split rule; each test row is matched to
    the next held-out example with the same prompt ids (examples dropped as overlong are skipped).
    """
    from ldm.data import synthetic
    from ldm.data.pretrain import split_of
    from ldm.errors import DataError
    from ldm.tokenizer import encode_chat

    src = manifest.get("source")
    if (not isinstance(src, dict) or src.get("source") != "synthetic"
            or src.get("generator_version") != synthetic.GENERATOR_VERSION):
        raise DataError(f"{data_dir} does not hold synthetic examples of generator version "
                        f"{synthetic.GENERATOR_VERSION}; re-run `{command} task.force=true`")
    examples = synthetic.generate(src["num_examples"], src["seed"], src["task_types"],
                                  src["difficulty"])
    seed, pct = manifest["split_seed"], manifest["test_split_pct"]
    held = (ex for i, ex in enumerate(examples) if split_of(i, seed, pct) == "test")
    out = []
    for n, prompt in enumerate(prompts):
        for ex in held:
            if encode_chat(tok, ex["messages"][:-1], add_generation_prompt=True)[0] == prompt:
                out.append(ex)
                break
        else:
            raise DataError(f"held-out row {n} of {data_dir} matches no regenerated synthetic "
                            f"example; re-run `{command} task.force=true`")
    return out


def prompts_in_training(manifest: dict) -> set:
    """Return the user prompts of a synthetic data set's training split (regenerated).

    A small generator space repeats prompts (copy combines words of a short list; max and sort
    draw 3 numbers of 0..99 at difficulty 1; half of reverse's words are real words of a short
    list; made-up words rarely repeat): a held-out prompt may also be a training prompt, and the
    summary counts those apart.
    """
    from ldm.data import synthetic
    from ldm.data.pretrain import split_of

    src = manifest["source"]
    examples = synthetic.generate(src["num_examples"], src["seed"], src["task_types"],
                                  src["difficulty"])
    seed, pct = manifest["split_seed"], manifest["test_split_pct"]
    return {ex["messages"][0]["content"] for i, ex in enumerate(examples)
            if split_of(i, seed, pct) == "train"}


def answer_jobs(tok, test_split, count: int, *, synthetic_data: bool, manifest: dict,
                data_dir: Path, command: str, from_end: bool = False) -> List[dict]:
    """Return the answer jobs (prompt ids, task type, reference) of `count` held-out rows.

    Synthetic tasks carry their type and the regenerated reference (checked exactly) and whether
    the prompt is also a training prompt; other chat data the decoded reference (scored by F1).
    """
    pairs = heldout_answers(test_split, count, from_end=from_end)
    if synthetic_data:
        refs = synthetic_references(manifest, tok, [p for p, _ in pairs], data_dir, command)
    else:
        refs = [(None, tok.decode(r, skip_special_tokens=True).strip()) for _, r in pairs]
    jobs = [{"prompt_ids": p, "task": task, "reference": ref}
            for (p, _), (task, ref) in zip(pairs, refs)]
    if synthetic_data:
        # a synthetic prompt is <|user|> body <|end|> <|assistant|>, the body encoded alone
        texts = sorted(prompts_in_training(manifest))
        trained = {tuple(ids) for ids in tok(texts, add_special_tokens=False,
                                             split_special_tokens=True)["input_ids"]}
        for job in jobs:
            job["seen_in_training"] = tuple(job["prompt_ids"][1:-2]) in trained
    return jobs


def answer_all(model, tok, jobs: List[dict], settings, *, mask_id: int,
               batch_size: int, seed: int, device, progress: bool = True) -> List[dict]:
    """Sample an answer for every job (prompt ids + reference) in batches; return the records.

    `settings` is the task's `SamplerSettings`, checked against the model's positions.
    """
    import torch
    from tqdm.auto import tqdm

    from ldm.data import synthetic
    from ldm.sampling.decode import never_emitted_ids
    from ldm.sampling.sampler import generate, sampler_model

    logits_fn = sampler_model(model)
    factor = 2 if settings.cfg_scale > 0 else 1
    records = []
    starts = range(0, len(jobs), batch_size)
    for b, start in enumerate(tqdm(starts, desc="answers", unit="batch", disable=not progress)):
        batch = jobs[start:start + batch_size]
        calls = torch.zeros(len(batch), dtype=torch.long)

        def count(step, calls=calls):
            # a row that commits at a step was in that step's model call(s)
            calls.add_(step.committed.any(1).long())

        began = time.perf_counter()
        result = generate(logits_fn, [j["prompt_ids"] for j in batch], settings, mask_id=mask_id,
                          eos_id=tok.eos_token_id,
                          special_ids=never_emitted_ids(tok, model.config.vocab_size),
                          pad_id=tok.pad_token_id,
                          generator=torch.Generator().manual_seed(seed * 1_000_003 + b),
                          device=device, record_history=False, on_step=count)
        seconds = (time.perf_counter() - began) / len(batch)
        for job, tokens, nfe in zip(batch, result.tokens, calls.tolist()):
            answer = tok.decode(tokens, skip_special_tokens=True).strip()
            record = {"prompt": tok.decode(job["prompt_ids"], skip_special_tokens=False),
                      "reference": job["reference"], "answer": answer}
            if "seen_in_training" in job:
                record["seen_in_training"] = job["seen_in_training"]
            if job.get("task") is not None:
                record["task"] = job["task"]
                record["correct"] = bool(synthetic.check(job["task"], answer, job["reference"]))
            else:
                record["f1"] = token_f1(answer, job["reference"])
            record.update({"nfe": nfe * factor, "seconds": seconds, "tokens": len(tokens),
                           "tokens_per_second": len(tokens) / seconds if seconds > 0 else 0.0})
            records.append(record)
    return records
