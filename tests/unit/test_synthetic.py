"""dataset=synthetic_tasks: seeded instruction/answer pairs whose answers are checked exactly."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm.data import synthetic
from ldm.data.synthetic import MAX_DIFFICULTY, TASK_TYPES, check, conversations, generate
from ldm.errors import ConfigError

DIFFICULTIES = range(1, MAX_DIFFICULTY + 1)
PER_DIFFICULTY = 1200  # 200 of each type per difficulty, 6000 in all

PARSERS = {
    "copy": re.compile(r"Copy: ([a-z]+(?: [a-z]+)*)"),
    "reverse": re.compile(r"Reverse the word: ([a-z]+)"),
    "count": re.compile(r"Count the letter ([a-z]) in: ([a-z]+)"),
    "sort": re.compile(r"Sort ascending: (\d+(?:, \d+)*)"),
    "max": re.compile(r"Largest of: (\d+(?:, \d+)*)"),
    "add": re.compile(r"Add (\d+) and (\d+)\."),
}


def all_examples():
    return [(d, ex) for d in DIFFICULTIES for ex in generate(PER_DIFFICULTY, seed=7, difficulty=d)]


EXAMPLES = all_examples()


def prompt(ex):
    return ex["messages"][0]["content"]


def numbers(text):
    return [int(n) for n in text.split(", ")]


def recompute(task, instruction):
    """The answer to `instruction`, worked out here from its text alone."""
    match = PARSERS[task].fullmatch(instruction)
    assert match, f"{task} prompt {instruction!r} does not have its documented format"
    if task == "copy":
        return match.group(1)
    if task == "reverse":
        return "".join(reversed(match.group(1)))
    if task == "count":
        letter, word = match.groups()
        return str(sum(ch == letter for ch in word))
    if task == "sort":
        return ", ".join(str(n) for n in sorted(numbers(match.group(1))))
    if task == "max":
        return str(sorted(numbers(match.group(1)))[-1])
    return str(int(match.group(1)) + int(match.group(2)))


def perturbations(task, answer, rng):
    """Wrong answers near `answer`: one character changed, dropped or added, list items moved."""
    alnum = [i for i, ch in enumerate(answer) if ch.isalnum()]
    wrong = []
    for i in rng.sample(alnum, min(3, len(alnum))):
        pool = "0123456789" if answer[i].isdigit() else "abcdefghijklmnopqrstuvwxyz"
        wrong.append(answer[:i] + rng.choice(pool.replace(answer[i], "")) + answer[i + 1:])
        wrong.append(answer[:i] + answer[i + 1:])
        wrong.append(answer[:i] + rng.choice(pool) + answer[i:])
    wrong += [answer + "1", "1" + answer, answer + ".", answer.upper(), ""]
    if task == "copy":
        words = answer.split(" ")
        wrong += [" ".join(words[:-1]), " ".join(words[1:]), answer.replace(" ", ""),
                  answer.replace(" ", "  ", 1), " ".join(reversed(words))]
    if task == "reverse":
        wrong += [answer[::-1], answer[1:] + answer[0]]
    if task == "sort":
        items = answer.split(", ")
        j = rng.randrange(len(items) - 1)
        swapped = items[:j] + [items[j + 1], items[j]] + items[j + 2:]
        wrong += [", ".join(swapped), ", ".join(items[:-1]), ", ".join(items[1:]),
                  ", ".join(items + [items[-1]]), ", ".join(reversed(items)),
                  " ".join(items), ";".join(items), answer + ","]
    if task in ("add", "count", "max"):
        wrong += [str(int(answer) + 1), str(int(answer) - 1), "0" + answer, answer + "0"]
    return [w for w in wrong if w != answer]


def test_generator_is_deterministic_per_seed():
    assert generate(300, seed=3, difficulty=2) == generate(300, seed=3, difficulty=2)
    assert generate(300, seed=3) != generate(300, seed=4)
    assert [prompt(e) for e in generate(300, seed=3)] != [prompt(e) for e in generate(300, seed=4)]


def test_fewer_examples_are_a_prefix_of_more():
    assert generate(50, seed=1, difficulty=3) == generate(400, seed=1, difficulty=3)[:50]


def test_examples_have_messages_task_and_answer():
    for ex in generate(60, seed=0):
        assert set(ex) == {"messages", "task", "answer"}
        user, assistant = ex["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] == ex["answer"] and ex["task"] in TASK_TYPES


def test_task_types_include_the_required_ones():
    assert {"copy", "reverse", "sort", "add", "count"} <= set(TASK_TYPES)


def test_answers_are_correct():
    for difficulty, ex in EXAMPLES:
        assert ex["answer"] == recompute(ex["task"], prompt(ex)), (difficulty, ex)


def test_checker_accepts_every_reference_answer():
    for _, ex in EXAMPLES:
        answer = ex["answer"]
        assert check(ex["task"], answer, answer)
        assert check(ex["task"], f"  {answer}\n", answer)


def test_list_checker_ignores_whitespace_around_commas_only():
    assert check("sort", "2,7,9,41", "2, 7, 9, 41")
    assert check("sort", " 2 ,7,  9 , 41 \n", "2, 7, 9, 41")
    assert not check("sort", "2 7 9 41", "2, 7, 9, 41")
    assert not check("sort", "2, 7, 9, 4 1", "2, 7, 9, 41")
    assert not check("add", "4 32", "432")
    assert not check("copy", "frog  milk", "frog milk")


def test_checker_rejects_perturbed_answers():
    rng = random.Random(0)
    for _, ex in EXAMPLES[::3]:
        for wrong in perturbations(ex["task"], ex["answer"], rng):
            assert not check(ex["task"], wrong, ex["answer"]), (ex, wrong)


def test_task_types_are_evenly_mixed():
    counts = Counter(ex["task"] for ex in generate(601, seed=5))
    assert set(counts) == set(TASK_TYPES)
    assert max(counts.values()) - min(counts.values()) <= 1
    chosen = Counter(ex["task"] for ex in generate(10, seed=5, task_types=["add", "sort"]))
    assert chosen == {"add": 5, "sort": 5}
    assert {ex["task"] for ex in generate(4, seed=5, task_types="reverse")} == {"reverse"}


def size(ex):
    """What difficulty scales: answer length, or the word length / list length in the prompt."""
    text = prompt(ex)
    if ex["task"] == "count":
        return len(text.rsplit(" ", 1)[1])
    if ex["task"] == "max":
        return len(text.split(", "))
    return len(ex["answer"])


def test_difficulty_scales_answer_length():
    for task in TASK_TYPES:
        means = []
        for difficulty in DIFFICULTIES:
            sizes = [size(ex) for d, ex in EXAMPLES if d == difficulty and ex["task"] == task]
            means.append(sum(sizes) / len(sizes))
        assert means == sorted(means) and len(set(means)) == len(means), (task, means)
    adds = [ex for d, ex in EXAMPLES if d == MAX_DIFFICULTY and ex["task"] == "add"]
    assert max(len(ex["answer"]) for ex in adds) >= MAX_DIFFICULTY + 1


def test_prompts_and_answers_stay_short_at_every_difficulty():
    for _, ex in EXAMPLES:
        assert len(prompt(ex)) < 60 and 1 <= len(ex["answer"]) < 30, ex


def test_conversations_are_the_message_lists_of_generate():
    assert list(conversations(40, 2, ["copy", "add"], 2)) == [
        ex["messages"] for ex in generate(40, 2, ["copy", "add"], 2)]


@pytest.mark.parametrize("kwargs, named", [
    ({"num_examples": 0}, "num_examples"),
    ({"num_examples": 2.5}, "num_examples"),
    ({"difficulty": 0}, "difficulty"),
    ({"difficulty": MAX_DIFFICULTY + 1}, "difficulty"),
    ({"task_types": ["add", "multiply"]}, "'multiply'"),
    ({"task_types": []}, "task_types"),
    ({"task_types": ["add", "add"]}, "twice"),
])
def test_bad_arguments_are_one_line_config_errors(kwargs, named):
    args = {"num_examples": 10, "seed": 0, **kwargs}
    for make in (generate, conversations):
        with pytest.raises(ConfigError) as err:
            make(**args)
        message = str(err.value)
        assert named in message and "\n" not in message


def test_unknown_task_type_error_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        check("multiply", "6", "6")
    assert "'multiply'" in str(err.value)
    assert all(name in str(err.value) for name in TASK_TYPES)


def test_describe_names_everything_that_changes_the_examples():
    info = synthetic.describe(100, 3, ["sort"], 2)
    assert info["source"] == "synthetic" and info["task_types"] == ["sort"]
    assert info["seed"] == 3 and info["difficulty"] == 2 and info["num_examples"] == 100
    assert "generator_version" in info


def test_dataset_config_is_a_chat_set_of_5000_synthetic_examples():
    conf = Path(__file__).resolve().parents[2] / "conf" / "dataset" / "synthetic_tasks.yaml"
    cfg = OmegaConf.load(conf)
    assert list(cfg.defaults) == ["schema", "_self_"]
    assert (cfg.name, cfg.kind, cfg.source) == ("synthetic_tasks", "chat", "synthetic")
    assert cfg.max_documents == 5000 and cfg.test_split_pct == 0.1 and cfg.split_seed == 0


# --- open tasks (benchmarks/sampling_cache.py trains and asks them) ------------------------------

def test_anyorder_accepts_every_order_and_rejects_repeats_missing_words_and_double_spaces():
    ex = synthetic.open_examples(1, 3, ["anyorder"])[0]
    words = ex["messages"][0]["content"].removeprefix("Any order: ").split(" ")
    assert sorted(ex["answer"].split(" ")) == sorted(words)
    assert check("anyorder", " ".join(reversed(words)), ex["answer"])
    assert check("anyorder", " ".join(words) + " ", ex["answer"])
    assert not check("anyorder", " ".join([words[0]] + words[:-1]), ex["answer"])
    assert not check("anyorder", " ".join(words[:-1]), ex["answer"])
    assert not check("anyorder", "  ".join(words), ex["answer"])


def test_letters_answers_have_the_asked_length_and_only_given_letters():
    for ex in synthetic.open_examples(50, 4, ["letters"]):
        given, dots = ex["messages"][0]["content"].removeprefix("Use ").split(": ")
        letters = set(given.split(" "))
        assert len(ex["answer"]) == len(dots) and set(ex["answer"]) == letters
        assert check("letters", ex["answer"][::-1], ex["answer"])
        assert check("letters", min(letters) * len(dots), ex["answer"])
        assert not check("letters", ex["answer"][:-1], ex["answer"])
        outside = next(c for c in "abcdefghijklmnopqrstuvwxyz" if c not in letters)
        assert not check("letters", outside + ex["answer"][1:], ex["answer"])


def test_phrase_copies_distinct_real_words_within_its_length():
    for ex in synthetic.open_examples(50, 5, ["phrase"]):
        words = ex["answer"].split(" ")
        assert ex["messages"][0]["content"] == f"Copy: {ex['answer']}"
        assert len(set(words)) == len(words) <= synthetic.PHRASE_WORDS[1]
        assert set(words) <= set(synthetic.WORDS) and len(ex["answer"]) <= synthetic.PHRASE_CHARS
        assert check("phrase", f" {ex['answer']}\n", ex["answer"])


def test_open_examples_are_reproducible_alternate_types_and_leave_generate_alone():
    tasks = ["letters", "anyorder", "copy"]
    first = synthetic.open_examples(9, 7, tasks)
    assert first == synthetic.open_examples(9, 7, tasks)
    assert [ex["task"] for ex in first] == tasks * 3
    assert first != synthetic.open_examples(9, 8, tasks)
    assert [ex for ex in first if ex["task"] == "copy"] == generate(9, 7, ["copy"])[:3]
    assert not set(synthetic.OPEN_TASKS) & set(synthetic.TASKS)  # not generate()'s types
    with pytest.raises(ConfigError):
        generate(3, 0, ["letters"])
