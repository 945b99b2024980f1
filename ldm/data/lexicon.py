"""Word questions with one right answer each, from the shipped WordNet-derived lexicon.tsv.

The tasks antonym, plural, category and synonym of ldm/data/synthetic.py read their questions
here: example k of a type is line k of that type in the file, so every example is a different
question, and since the file uses each word once (ldm/data/build_lexicon.py), a split of the
examples is a split of the words: a held-out question's words appear in no training example.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Tuple

from ldm.errors import ConfigError

LEXICON = Path(__file__).with_name("lexicon.tsv")
PROMPTS = {
    "antonym": "Give the opposite of the word: {}",
    "plural": "Give the plural of the noun: {}",
    "category": "Name the category of: {}",
    "synonym": "Give a word that means the same as: {}",
}


@lru_cache(maxsize=1)
def entries() -> Dict[str, List[Tuple[str, str]]]:
    """Return type -> [(word, answer)] in the file's order (most frequent word first)."""
    if not LEXICON.is_file():
        raise ConfigError(f"the lexicon {LEXICON} is missing; make it with `make lexicon` "
                          "(Debian's wordnet-base)")
    out: Dict[str, List[Tuple[str, str]]] = {t: [] for t in PROMPTS}
    for line in LEXICON.read_text().splitlines():
        if line and not line.startswith("#"):
            kind, word, answer = line.split("\t")
            out[kind].append((word, answer))
    return out


def identity() -> str:
    """Return a short hash of the lexicon file, for the prepared data's fingerprint."""
    return hashlib.sha256(LEXICON.read_bytes()).hexdigest()[:16]


def question(kind: str, ordinal: int) -> Tuple[str, str]:
    """Return the instruction and answer of question `ordinal` of type `kind`."""
    pool = entries()[kind]
    if ordinal >= len(pool):
        raise ConfigError(f"the lexicon has {len(pool)} {kind} questions; asked for number "
                          f"{ordinal + 1}: lower dataset.max_documents")
    word, answer = pool[ordinal]
    return PROMPTS[kind].format(word), answer
