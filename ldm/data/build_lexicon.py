"""Build ldm/data/lexicon.tsv, the word questions of the lexical tasks, from WordNet 3.0.

    python -m ldm.data.build_lexicon [--wordnet /usr/share/wordnet] [--per-type 400]
    (or: make lexicon, which installs Debian's wordnet-base first when run as root)

Reads the WordNet database files (Debian package `wordnet-base`, format in wndb(5WN)) and
writes one line per question: type, word, answer. Four types, each from the word's most frequent
sense (WordNet lists a lemma's senses by their frequency in its semantically tagged corpus):

  antonym   an adjective and its direct antonym (the `!` pointer between two words)
  plural    a noun and its plural: the irregular form from noun.exc, else the inverse of
            WordNet's own morphy detachment rules (s, ses, xes, zes, ches, shes, ies, men), so
            every plural here reduces to its noun by morphy(7WN)
  category  a noun and the first word of its sense's hypernym (`@`), e.g. oak -> tree
  synonym   a word and another word of the same synset

Every word (asked or answered) is used once in the whole file, so a question's words appear in
no other question: any split of the lines is a split of the words. Words are lowercase letters
only, 3 to 12 of them. Lines of a type run from the most to the least frequent word.

WordNet 3.0 Copyright 2006 by Princeton University; redistributed under its license, whose notice
is in ldm/data/LEXICON_LICENSE.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

WORDNET = Path("/usr/share/wordnet")
OUT = Path(__file__).with_name("lexicon.tsv")
TYPES = ("antonym", "plural", "category", "synonym")
WORD = re.compile(r"^[a-z]{3,12}$")
POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}


class MissingWordNet(RuntimeError):
    """WordNet's database files are not where they were looked for."""


def _lines(path: Path) -> Iterator[str]:
    with open(path, encoding="latin-1") as f:
        for line in f:
            if not line.startswith("  "):  # the license header lines start with two spaces
                yield line.rstrip("\n")


def read_index(folder: Path, pos: str) -> List[Tuple[str, int, List[int]]]:
    """Return (lemma, tagged-sense count, synset offsets by frequency) of index.<pos>."""
    out = []
    for line in _lines(folder / f"index.{pos}"):
        f = line.split()
        n_ptr = int(f[3])
        tagged = int(f[5 + n_ptr])
        offsets = [int(x) for x in f[6 + n_ptr:]]
        out.append((f[0], tagged, offsets))
    return out


class Synsets:
    """The synsets of one data.<pos> file, read lazily by byte offset."""

    def __init__(self, folder: Path, pos: str):
        self.data = (folder / f"data.{pos}").read_bytes()

    def get(self, offset: int) -> Tuple[List[str], List[Tuple[str, int, str, int, int]]]:
        """Return (words, pointers (symbol, offset, pos, source word, target word)) of a synset."""
        end = self.data.index(b"\n", offset)
        f = self.data[offset:end].decode("latin-1").split(" | ")[0].split()
        n_words = int(f[3], 16)
        words = [f[4 + 2 * i].lower() for i in range(n_words)]
        at = 4 + 2 * n_words
        ptrs = []
        for i in range(int(f[at])):
            sym, off, pos, st = f[at + 1 + 4 * i: at + 5 + 4 * i]
            ptrs.append((sym, int(off), pos, int(st[:2], 16), int(st[2:], 16)))
        return words, ptrs


def regular_plural(noun: str) -> str:
    """Return the plural that WordNet's morphy detachment rules reduce to `noun`."""
    if noun.endswith("man"):
        return noun[:-3] + "men"
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def candidates(folder: Path) -> Dict[str, List[Tuple[int, str, str]]]:
    """Return type -> [(frequency, word, answer)] before the one-use rule, most frequent first."""
    nouns, adjs = Synsets(folder, "noun"), Synsets(folder, "adj")
    data = {"n": nouns, "a": adjs, "s": adjs, "v": Synsets(folder, "verb")}
    irregular: Dict[str, str] = {}
    for line in _lines(folder / "noun.exc"):
        plural, *singulars = line.split()
        for s in singulars:
            irregular.setdefault(s, plural)
    out: Dict[str, List[Tuple[int, str, str]]] = {t: [] for t in TYPES}
    for pos in ("adj", "noun", "verb"):
        for lemma, tagged, offsets in read_index(folder, pos):
            if tagged < 1 or not WORD.match(lemma):
                continue
            syn = data[pos[0]] if pos != "adj" else adjs
            words, ptrs = syn.get(offsets[0])
            others = [w for w in words if w != lemma and WORD.match(w)]
            if others:
                out["synonym"].append((tagged, lemma, others[0]))
            if pos == "adj":
                number = words.index(lemma) + 1 if lemma in words else 0
                for sym, off, p, src, dst in ptrs:
                    if sym == "!" and src == number and p in ("a", "s"):
                        target = adjs.get(off)[0][dst - 1]
                        if WORD.match(target):
                            out["antonym"].append((tagged, lemma, target))
                        break
            if pos == "noun":
                plural = irregular.get(lemma, regular_plural(lemma))
                if WORD.match(plural) and plural != lemma:
                    out["plural"].append((tagged, lemma, plural))
                for sym, off, p, _, _ in ptrs:
                    if sym == "@":
                        head = nouns.get(off)[0][0]
                        if WORD.match(head) and head != lemma:
                            out["category"].append((tagged, lemma, head))
                        break
    for rows in out.values():
        rows.sort(key=lambda r: (-r[0], r[1]))
    return out


def build(folder: Path, per_type: int) -> List[Tuple[str, str, str]]:
    """Return (type, word, answer) lines: each word used once, types taking turns by frequency."""
    if not (folder / "data.noun").is_file():
        raise MissingWordNet(
            f"no WordNet database at {folder} (data.noun missing): install Debian's wordnet-base "
            "(`apt-get install wordnet-base`, or `make lexicon` as root) or pass --wordnet DIR")
    pools = candidates(folder)
    used: set = set()
    chosen: Dict[str, List[Tuple[str, str, str]]] = {t: [] for t in TYPES}
    cursor = {t: 0 for t in TYPES}
    while any(len(chosen[t]) < per_type and cursor[t] < len(pools[t]) for t in TYPES):
        for t in TYPES:  # one line per type per turn, so no type takes every common word
            while len(chosen[t]) < per_type and cursor[t] < len(pools[t]):
                _, word, answer = pools[t][cursor[t]]
                cursor[t] += 1
                if word not in used and answer not in used:
                    used.update((word, answer))
                    chosen[t].append((t, word, answer))
                    break
    return [line for t in TYPES for line in chosen[t]]


def main(argv: Optional[List[str]] = None) -> int:
    """Write the lexicon file; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wordnet", type=Path, default=WORDNET)
    parser.add_argument("--per-type", type=int, default=400)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    try:
        lines = build(args.wordnet, args.per_type)
    except MissingWordNet as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    header = ("# type\tword\tanswer -- made by `python -m ldm.data.build_lexicon` from WordNet 3.0 "
              "(Copyright 2006 Princeton University; license in LEXICON_LICENSE)\n")
    args.out.write_text(header + "".join("\t".join(l) + "\n" for l in lines))
    counts = {t: sum(1 for l in lines if l[0] == t) for t in TYPES}
    print(f"wrote {args.out}: {len(lines)} questions ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
