"""Synthetic instruction tasks whose answers can be checked exactly, from a seeded generator.

Made to measure a sampler's speed against its accuracy with a small model trained for minutes on
CPU with a character-level tokenizer: at every difficulty, prompts are under 60 characters and
answers under 30. Difficulty is an integer in 1..MAX_DIFFICULTY and sets the size of each task:

  task     prompt                           answer       size at difficulty d = 1, 2, 3, 4, 5
  copy     Copy: frog milk                  frog milk    words x letters: 2x3-4, 2x4-5, 3x3-4,
                                                         3x4-5, 4x3-5
  reverse  Reverse the word: tsoke          ekost        letters: 3-4, 4-5, 5-6, 6-7, 7-9
  count    Count the letter e in: beteno    2            letters of the word, as for reverse
  sort     Sort ascending: 9, 2, 41, 7      2, 7, 9, 41  d + 2 distinct numbers in 0..99
  max      Largest of: 12, 7, 55            55           d + 2 distinct numbers in 0..99
  add      Add 47 and 385.                  432          one operand d + 1 digits, the other
                                                         1..d + 1 digits (order random)

Word tasks (antonym, plural, category, synonym; ldm/data/lexicon.py) ask about real English words
from a WordNet-derived file: example k of a type is that type's question k (difficulty is ignored),
and no word is in two questions, so held-out questions ask about words no training example has.

Copy draws its words from WORDS (~120 real words, a phrase of distinct words); count draws
made-up words (random lowercase letters); reverse draws a real word of the right length from WORDS
in REAL_WORD_RATE of its prompts and a made-up word in the rest. From the small word list a
held-out prompt is often a training prompt too (a few dozen words of 3-4 letters at difficulty 1),
so exact match there would measure memory; the made-up words are new prompts. The real words are
a foothold: a small model learns them first (few, often repeated) and finds the position rule
from them, where from made-up words alone it found it late or not at all (see the quickstart's
seed table, benchmarks/RESULTS.md); copy's phrases combine words, so most held-out copy prompts at difficulty 1
are training prompts too, and evaluation reports exact match on the unseen ones apart.

Mixing: example i has task type `task_types[i % len(task_types)]` (round robin, so counts differ
by at most one) and its own random stream seeded from (seed, i, type, difficulty), so
`generate(m, seed)` is the first m examples of `generate(n, seed)` for m <= n.

Checking: surrounding whitespace is ignored, and for sort whitespace around the commas too
("2,7 , 9" == "2, 7, 9"). Everything else must match the reference character for character: no
leading zeros, no extra words, no trailing period, no other separator.

Open tasks (OPEN_TASKS; benchmarks/sampling_cache.py trains and asks them), outside TASKS so that
`generate` and prepared data are unchanged: `open_examples` mixes them with the types above.
  phrase   Copy: garden frog winter ...     (the same)   4-9 real words, at most 56 characters:
                                                         answers filling most of a 64-position
                                                         answer area, as chat answers do
  anyorder Any order: sky leg tree          tree sky leg 2-3 words of 3-4 letters, any order
  letters  Use a k e: .......               kaekkea      as many letters as dots (6-12), each one
                                                         of the 2-3 given letters
anyorder and letters have several right answers (training answers are random ones), so what comes
next is open until the model commits a choice and a well-trained model still needs several calls
per answer, as with open-ended text; a task with one right answer is filled in one call once
learned.

"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Sequence, Tuple, Union

from ldm.errors import ConfigError

Conversation = List[Dict[str, str]]
Maker = Callable[[random.Random, int], Tuple[str, str]]
Checker = Callable[[str, str], bool]
TaskTypes = Union[None, str, Sequence[str]]  # None = all of TASK_TYPES; a str = that one type

GENERATOR_VERSION = 3  # bump when any example for a given (seed, types, difficulty) changes
MAX_DIFFICULTY = 5

WORDS = (
    # 3 letters
    "cat dog sun red box cup hat map pen sky top war oil ice egg arm leg sea toy bus "
    # 4 letters
    "tree fish bird rain snow milk door book hand road ship king gold star moon wind lamp coat "
    "ring frog "
    # 5 letters
    "stone apple bread chair house water light plant river smile train horse cloud grass music "
    "table heart sweet green night "
    # 6 letters
    "garden window orange yellow silver winter summer bridge planet forest rabbit castle pencil "
    "basket doctor butter candle dragon flower mirror "
    # 7 letters
    "kitchen blanket chicken morning picture teacher balloon rainbow weather diamond pumpkin "
    "holiday monster captain freedom journey village lantern thunder cottage "
    # 8 and 9 letters
    "elephant mountain sandwich umbrella computer dinosaur notebook princess treasure sunlight "
    "football chocolate butterfly adventure beautiful crocodile telephone pineapple wonderful"
).split()

# difficulty -> (words, fewest letters, most letters) for copy
COPY_SIZES = {1: (2, 3, 4), 2: (2, 4, 5), 3: (3, 3, 4), 4: (3, 4, 5), 5: (4, 3, 5)}
# difficulty -> (fewest letters, most letters) of the word for reverse and count
WORD_LENGTHS = {1: (3, 4), 2: (4, 5), 3: (5, 6), 4: (6, 7), 5: (7, 9)}
ABSENT_LETTER_RATE = 0.2  # share of count prompts whose letter is not in the word (answer 0)
REAL_WORD_RATE = 0.5  # share of reverse prompts that reverse a real word (the rest: made-up words)

_LIST_SEPARATOR = re.compile(r"\s*,\s*")


def _words(lo: int, hi: int) -> List[str]:
    return [w for w in WORDS if lo <= len(w) <= hi]


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    """Return a random string of lo..hi lowercase letters (a made-up word)."""
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _numbers(rng: random.Random, difficulty: int) -> List[int]:
    return rng.sample(range(100), difficulty + 2)


def _join(numbers: Iterable[int]) -> str:
    return ", ".join(str(n) for n in numbers)


# --- generators: (rng, difficulty) -> (instruction, answer) -------------------------------------

def make_copy(rng: random.Random, difficulty: int) -> Tuple[str, str]:
    """Return a copy instruction and its answer, the same words."""
    n, lo, hi = COPY_SIZES[difficulty]
    phrase = " ".join(rng.sample(_words(lo, hi), n))
    return f"Copy: {phrase}", phrase


def make_reverse(rng: random.Random, difficulty: int) -> Tuple[str, str]:
    """Return a reverse-the-word instruction and its answer, the letters backwards."""
    lo, hi = WORD_LENGTHS[difficulty]
    real = _words(lo, hi)
    word = rng.choice(real) if real and rng.random() < REAL_WORD_RATE else _letters(rng, lo, hi)
    return f"Reverse the word: {word}", word[::-1]


def make_count(rng: random.Random, difficulty: int) -> Tuple[str, str]:
    """Return a count-the-letter instruction and its answer, the number of occurrences."""
    word = _letters(rng, *WORD_LENGTHS[difficulty])
    if rng.random() < ABSENT_LETTER_RATE:
        letter = rng.choice(sorted(set(string.ascii_lowercase) - set(word)))
    else:
        letter = rng.choice(word)
    return f"Count the letter {letter} in: {word}", str(word.count(letter))


def make_sort(rng: random.Random, difficulty: int) -> Tuple[str, str]:
    """Return a sort instruction and its answer, the numbers ascending, comma-separated."""
    numbers = _numbers(rng, difficulty)
    return f"Sort ascending: {_join(numbers)}", _join(sorted(numbers))


def make_max(rng: random.Random, difficulty: int) -> Tuple[str, str]:
    """Return a largest-number instruction and its answer, the largest number."""
    numbers = _numbers(rng, difficulty)
    return f"Largest of: {_join(numbers)}", str(max(numbers))


def make_add(rng: random.Random, difficulty: int) -> Tuple[str, str]:
    """Return an addition instruction and its answer, the sum in decimal."""
    digits = difficulty + 1
    a = rng.randint(10 ** (digits - 1), 10 ** digits - 1)
    other = rng.randint(1, digits)
    b = rng.randint(10 ** (other - 1) if other > 1 else 0, 10 ** other - 1)
    if rng.random() < 0.5:
        a, b = b, a
    return f"Add {a} and {b}.", str(a + b)


# --- checkers: (answer_text, reference) -> bool -------------------------------------------------

def check_exact(answer_text: str, reference: str) -> bool:
    """Return whether the answer equals the reference, ignoring surrounding whitespace."""
    return answer_text.strip() == reference.strip()


def check_list(answer_text: str, reference: str) -> bool:
    """Return whether the answer is the reference list, ignoring whitespace around the commas."""
    def normal(text: str) -> str:
        return _LIST_SEPARATOR.sub(", ", text.strip())
    return normal(answer_text) == normal(reference)


@dataclass(frozen=True)
class Task:
    """A task type: its name, its generator and its checker (`lexical`: make takes the ordinal)."""

    name: str
    make: Maker
    check: Checker
    lexical: bool = False


def _lexical(kind: str) -> Task:
    from ldm.data import lexicon

    return Task(kind, lambda ordinal, _difficulty: lexicon.question(kind, ordinal), check_exact,
                lexical=True)


TASKS: Dict[str, Task] = {t.name: t for t in (
    Task("copy", make_copy, check_exact),
    Task("reverse", make_reverse, check_exact),
    Task("sort", make_sort, check_list),
    Task("add", make_add, check_exact),
    Task("count", make_count, check_exact),
    Task("max", make_max, check_exact),
    *(_lexical(kind) for kind in ("antonym", "plural", "category", "synonym")),
)}
# the generated types (the default: None); the word types are asked for by name
TASK_TYPES: Tuple[str, ...] = tuple(n for n, t in TASKS.items() if not t.lexical)
LEXICAL_TYPES: Tuple[str, ...] = tuple(n for n, t in TASKS.items() if t.lexical)


# --- validation ---------------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_task_types(task_types: TaskTypes) -> Tuple[str, ...]:
    """Return the task type names to generate (all of TASK_TYPES for None); ConfigError if bad."""
    if task_types is None:
        return TASK_TYPES
    names = (task_types,) if isinstance(task_types, str) else tuple(task_types)
    accepted = ", ".join(TASKS)
    if not names:
        raise ConfigError(f"task_types is empty; name at least one of: {accepted} "
                          "(or None for all)")
    for name in names:
        if name not in TASKS:
            raise ConfigError(f"unknown synthetic task type {name!r}; known: {accepted}")
    if len(set(names)) != len(names):
        raise ConfigError(f"task_types {list(names)} names a type twice; name each at most once")
    return names


def _validate(num_examples: int, difficulty: int) -> None:
    if not _is_int(num_examples) or num_examples < 1:
        raise ConfigError(f"num_examples must be an integer >= 1, got {num_examples!r}")
    if not _is_int(difficulty) or not 1 <= difficulty <= MAX_DIFFICULTY:
        raise ConfigError(f"difficulty must be an integer in 1..{MAX_DIFFICULTY}, "
                          f"got {difficulty!r}")


# --- the data set -------------------------------------------------------------------------------

def _examples(num_examples: int, seed: int, task_types, difficulty: int) -> Iterator[dict]:
    names = validate_task_types(task_types)
    _validate(num_examples, difficulty)
    for i in range(num_examples):
        task = TASKS[names[i % len(names)]]
        # a str seed is hashed with sha512: stable across processes and Python versions
        rng = random.Random(f"synthetic:{seed}:{i}:{task.name}:{difficulty}")
        instruction, answer = task.make(i // len(names) if task.lexical else rng, difficulty)
        yield {
            "messages": [{"role": "user", "content": instruction},
                         {"role": "assistant", "content": answer}],
            "task": task.name,
            "answer": answer,
        }


def generate(num_examples: int, seed: int, task_types: TaskTypes = None,
             difficulty: int = 1) -> List[dict]:
    """Return `num_examples` dicts {messages, task, answer}, identical for identical arguments."""
    return list(_examples(num_examples, seed, task_types, difficulty))


def conversations(num_examples: int, seed: int, task_types: TaskTypes = None,
                  difficulty: int = 1) -> Iterator[Conversation]:
    """Return an iterator of the user/assistant message lists of `generate(...)`, made lazily."""
    names = validate_task_types(task_types)  # fail now, not at the first next()
    _validate(num_examples, difficulty)
    return (ex["messages"] for ex in _examples(num_examples, seed, names, difficulty))


def check(task: str, answer_text: str, reference: str) -> bool:
    """Return whether `answer_text` is a correct answer for a `task` example with `reference`
    (a type of TASKS or of OPEN_TASKS)."""
    if task in OPEN_CHECKS:
        return OPEN_CHECKS[task](answer_text, reference)
    if task not in TASKS:
        raise ConfigError(f"unknown synthetic task type {task!r}; known: "
                          f"{', '.join((*TASKS, *OPEN_TASKS))}")
    return TASKS[task].check(answer_text, reference)


def describe(num_examples: int, seed: int, task_types: TaskTypes = None,
             difficulty: int = 1) -> dict:
    """Return what identifies a generated data set, for the prepared data's fingerprint."""
    names = validate_task_types(task_types)
    _validate(num_examples, difficulty)
    desc = {"source": "synthetic", "generator_version": GENERATOR_VERSION,
            "num_examples": num_examples, "seed": seed, "task_types": list(names),
            "difficulty": difficulty}
    if any(TASKS[n].lexical for n in names):  # only then, so other data keeps its fingerprint
        from ldm.data import lexicon

        desc["lexicon"] = lexicon.identity()
    return desc


# --- open tasks: long answers, or several right ones (see the module docstring) -----------------

OPEN_TASKS = ("phrase", "anyorder", "letters")
PHRASE_WORDS = (4, 9)
PHRASE_CHARS = 56
ANYORDER_WORDS = (2, 3)
LETTERS = (2, 3)  # distinct letters given
LETTER_DOTS = (6, 12)  # letters asked for


def make_phrase(rng: random.Random) -> Tuple[str, str]:
    """Return a copy instruction of PHRASE_WORDS distinct real words (at most PHRASE_CHARS
    characters) and its answer, the same words."""
    words = rng.sample(WORDS, rng.randint(*PHRASE_WORDS))
    while len(" ".join(words)) > PHRASE_CHARS:
        words.pop()
    phrase = " ".join(words)
    return f"Copy: {phrase}", phrase


def make_anyorder(rng: random.Random) -> Tuple[str, str]:
    """Return an any-order instruction and one right answer (the words in a random order)."""
    words = rng.sample(_words(3, 4), rng.randint(*ANYORDER_WORDS))
    answer = rng.sample(words, len(words))
    return f"Any order: {' '.join(words)}", " ".join(answer)


def make_letters(rng: random.Random) -> Tuple[str, str]:
    """Return a letters instruction and one right answer (random letters, each given one used)."""
    letters = rng.sample(string.ascii_lowercase, rng.randint(*LETTERS))
    dots = rng.randint(*LETTER_DOTS)
    answer = letters + [rng.choice(letters) for _ in range(dots - len(letters))]
    return f"Use {' '.join(letters)}: {'.' * dots}", "".join(rng.sample(answer, dots))


def check_anyorder(answer_text: str, reference: str) -> bool:
    """Return whether the answer holds the reference's words, each once, in any order, single
    spaces between."""
    return sorted(answer_text.strip().split(" ")) == sorted(reference.split(" "))


def check_letters(answer_text: str, reference: str) -> bool:
    """Return whether the answer has as many letters as the reference, each one of its letters
    (a reference uses every given letter)."""
    answer_text = answer_text.strip()
    return len(answer_text) == len(reference) and set(answer_text) <= set(reference)


OPEN_MAKES: Dict[str, Callable[[random.Random], Tuple[str, str]]] = {
    "phrase": make_phrase, "anyorder": make_anyorder, "letters": make_letters}
OPEN_CHECKS: Dict[str, Checker] = {
    "phrase": check_exact, "anyorder": check_anyorder, "letters": check_letters}


def open_examples(num_examples: int, seed: int, task_types: Sequence[str]) -> List[dict]:
    """Return `num_examples` dicts {messages, task, answer}, the types in round robin: those of
    TASKS are `generate(num_examples, seed, <them>)`'s examples in order, each of OPEN_TASKS is
    drawn from its own stream seeded from (type, seed). Identical for identical arguments."""
    library = [t for t in task_types if t not in OPEN_TASKS]
    drawn = iter(generate(num_examples, seed, library)) if library else iter(())
    rngs = {task: random.Random(f"{task}:{seed}") for task in OPEN_TASKS}
    out = []
    for i in range(num_examples):
        task = task_types[i % len(task_types)]
        if task not in OPEN_TASKS:
            out.append(next(drawn))
            continue
        instruction, answer = OPEN_MAKES[task](rngs[task])
        out.append({"messages": [{"role": "user", "content": instruction},
                                 {"role": "assistant", "content": answer}],
                    "task": task, "answer": answer})
    return out
