"""Offline task suites in lm-eval's custom-task format, built from prepared held-out data.

    cloze      LAMBADA-style: a held-out passage without its last word; scored by log-likelihood
               (perplexity of the word) and greedy match (acc) -- output_type loglikelihood
    choice     the real continuation of a held-out passage against continuations taken from other
               passages; accuracy of the likelihood ranking (acc, and acc_norm per byte)
    synthetic  the held-out synthetic verifiable tasks as generate_until with exact match, using
               the same prompts, answers and checker as task=evaluate

A suite folder holds one `<task>.yaml` and one `<task>.jsonl` per task and a `suite.json` saying
what it was built from; pass it to the harness with `--include_path <folder>`.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ldm.errors import ConfigError, DataError

OFFLINE_TASKS = ("cloze", "choice", "synthetic")
TEXT_TASKS = ("cloze", "choice")
HARNESS_NAMES = {name: f"ldm_{name}" for name in OFFLINE_TASKS}
WORD = re.compile(r"[A-Za-z]{3,}")

_CLOZE = """task: ldm_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_CHOICE = """task: ldm_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_SYNTHETIC = """task: ldm_synthetic
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: {max_gen_toks}
  ldm_chat: true
process_results: !function ldm.harness.scoring.process_synthetic
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def check_task_names(names: Sequence[str], hub: bool) -> List[str]:
    """Return the task names; raise ConfigError for an unknown offline task or an empty list."""
    if not names:
        raise ConfigError("benchmark.tasks is empty; name at least one task")
    if not hub:
        unknown = [n for n in names if n not in OFFLINE_TASKS]
        if unknown:
            raise ConfigError(f"benchmark.tasks: unknown offline task {unknown[0]!r}; accepted: "
                              f"{', '.join(OFFLINE_TASKS)} (hub suites: benchmark=bert_chat, "
                              "benchmark=llada_base)")
    return list(names)


def heldout_documents(test_split, eos_id: int) -> List[List[int]]:
    """Return the token ids of the held-out documents of packed text rows (split at EOS)."""
    import numpy as np

    if len(test_split) == 0:
        raise DataError("the test split is empty; prepare with a larger dataset.test_split_pct")
    ids = np.concatenate([np.asarray(r, dtype=np.int64)
                          for r in test_split.with_format("numpy")["input_ids"]])
    cuts = np.flatnonzero(ids == eos_id)
    docs, start = [], 0
    for cut in [*cuts.tolist(), len(ids)]:
        if cut > start:
            docs.append(ids[start:cut].tolist())
        start = cut + 1
    return docs


def _windows(words: List[str], size: int, stride: int) -> List[int]:
    return list(range(size, len(words), stride))


def _spread(items: List, count: int) -> List:
    """Return `count` items spread evenly over the list (all of them if fewer)."""
    if len(items) <= count:
        return items
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def cloze_items(documents: List[str], count: int, context_words: int,
                fits: Callable[[str, str], bool]) -> List[Dict]:
    """Return up to `count` {context, target} items: a passage and its next (alphabetic) word."""
    candidates = []
    for doc in documents:
        words = doc.split()
        for p in _windows(words, context_words, context_words + 1):
            if WORD.fullmatch(words[p]):
                candidates.append((" ".join(words[p - context_words:p]), words[p]))
    items = [{"context": c, "target": t} for c, t in _spread(candidates, count * 2) if fits(c, t)]
    return items[:count]


def choice_items(documents: List[str], count: int, context_words: int, continuation_words: int,
                 choices: int, seed: int, fits: Callable[[str, str], bool]) -> List[Dict]:
    """Return up to `count` {context, choices, label} items; wrong options from nearby passages."""
    passages = []
    size = context_words + continuation_words
    for doc in documents:
        words = doc.split()
        for p in range(0, len(words) - size + 1, size):
            passages.append((" ".join(words[p:p + context_words]),
                             " ".join(words[p + context_words:p + size])))
    passages = _spread(passages, count * 2)
    n = len(passages)
    if n < choices:
        raise DataError(f"the held-out text has {n} passages of {size} words; the choice task "
                        f"needs at least {choices}: prepare more held-out text")
    items = []
    for i, (context, gold) in enumerate(passages):
        # wrong options from the nearest other passages (in document order: mostly the same
        # work), so that style and token lengths do not give the real continuation away
        wrong = []
        for j in range(2, 2 * n + 2):
            offset = (j // 2) * (1 if j % 2 == 0 else -1)
            other = passages[(i + offset) % n][1]
            if offset != 0 and other != gold and other not in wrong:
                wrong.append(other)
            if len(wrong) == choices - 1:
                break
        options = [gold, *wrong]
        random.Random(seed * 7919 + i).shuffle(options)
        if all(fits(context, o) for o in options) and len(options) == choices:
            items.append({"context": context, "choices": options, "label": options.index(gold)})
        if len(items) == count:
            break
    return items


def write_suite(folder: Path, items: Dict[str, List[Dict]], source: Dict,
                max_gen_toks: int = 64) -> Path:
    """Write each task's YAML and JSONL into `folder`; return the folder."""
    templates = {"cloze": _CLOZE, "choice": _CHOICE, "synthetic": _SYNTHETIC}
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in items.items():
        if not rows:
            raise DataError(f"the {name} task got no items from {source.get('data_dir')}; "
                            "prepare more held-out data")
        data = folder / f"{HARNESS_NAMES[name]}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{HARNESS_NAMES[name]}.yaml").write_text(
            templates[name].format(data=json.dumps(str(data.resolve())),
                                   max_gen_toks=max_gen_toks))
    (folder / "suite.json").write_text(json.dumps({**source, "tasks": {
        HARNESS_NAMES[n]: len(r) for n, r in items.items()}}, indent=2) + "\n")
    return folder


def build_text_items(test_split, tok, tasks: Sequence[str], *, count: int, context_words: int,
                     continuation_words: int, choices: int, seed: int,
                     max_positions: Optional[int]) -> Dict[str, List[Dict]]:
    """Return the items of the cloze and/or choice tasks from a prepared text test split."""
    from ldm.sampling.prompts import encode_text

    docs = [tok.decode(d, skip_special_tokens=True)
            for d in heldout_documents(test_split, tok.eos_token_id)]

    def fits(context: str, continuation: str) -> bool:
        total = len(encode_text(tok, context)) + len(encode_text(tok, " " + continuation))
        if max_positions is not None and total > max_positions:
            raise ConfigError(f"a held-out passage of benchmark.context_words={context_words} "
                              f"words plus its continuation has {total} tokens, more than the "
                              f"model's {max_positions} positions; lower "
                              "benchmark.context_words")
        return True

    out = {}
    if "cloze" in tasks:
        out["cloze"] = cloze_items(docs, count, context_words, fits)
    if "choice" in tasks:
        out["choice"] = choice_items(docs, count, context_words, continuation_words, choices,
                                     seed, fits)
    return out


def build_synthetic_items(test_split, manifest: dict, tok, count: int, data_dir: Path,
                          command: str, max_new_tokens: int,
                          max_positions: Optional[int]) -> List[Dict]:
    """Return {prompt, task, answer} of the held-out synthetic examples task=evaluate answers."""
    from ldm.scoring import heldout_answers, synthetic_examples

    pairs = heldout_answers(test_split, count)
    longest = max((len(p) for p, _ in pairs), default=0)
    if max_positions is not None and longest + max_new_tokens > max_positions:
        raise ConfigError(f"the longest held-out prompt has {longest} tokens; + "
                          f"sampler.max_new_tokens={max_new_tokens} exceeds the model's "
                          f"{max_positions} positions; lower sampler.max_new_tokens")
    examples = synthetic_examples(manifest, tok, [p for p, _ in pairs], data_dir, command)
    return [{"prompt": ex["messages"][0]["content"], "task": ex["task"], "answer": ex["answer"]}
            for ex in examples]
