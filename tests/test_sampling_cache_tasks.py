"""The sampling_cache benchmark's own tasks: right answers are checked as the task defines them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import sampling_cache
    finally:
        sys.path.remove(str(BENCHMARKS))
    return sampling_cache


def test_anyorder_accepts_every_order_and_rejects_repeats_missing_words_and_double_spaces(bench):
    ex = bench.examples(1, 3, ["anyorder"])[0]
    words = ex["messages"][0]["content"].removeprefix("Any order: ").split(" ")
    assert sorted(ex["answer"].split(" ")) == sorted(words)
    assert bench.check("anyorder", " ".join(reversed(words)), ex["answer"])
    assert bench.check("anyorder", " ".join(words) + " ", ex["answer"])
    assert not bench.check("anyorder", " ".join([words[0]] + words[:-1]), ex["answer"])
    assert not bench.check("anyorder", " ".join(words[:-1]), ex["answer"])
    assert not bench.check("anyorder", "  ".join(words), ex["answer"])


def test_letters_answers_have_the_asked_length_and_only_given_letters(bench):
    for ex in bench.examples(50, 4, ["letters"]):
        given, dots = ex["messages"][0]["content"].removeprefix("Use ").split(": ")
        letters = set(given.split(" "))
        assert len(ex["answer"]) == len(dots) and set(ex["answer"]) == letters
        assert bench.check("letters", ex["answer"][::-1], ex["answer"])
        assert bench.check("letters", min(letters) * len(dots), ex["answer"])
        assert not bench.check("letters", ex["answer"][:-1], ex["answer"])
        outside = next(c for c in "abcdefghijklmnopqrstuvwxyz" if c not in letters)
        assert not bench.check("letters", outside + ex["answer"][1:], ex["answer"])


def test_task_examples_are_reproducible_and_alternate_types(bench):
    tasks = ["letters", "anyorder", "copy"]
    first = bench.examples(9, 7, tasks)
    assert first == bench.examples(9, 7, tasks)
    assert [ex["task"] for ex in first] == tasks * 3
    assert first != bench.examples(9, 8, tasks)
