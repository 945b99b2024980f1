"""Weighted mixtures of data sources: `dataset.mixture=[{source: ..., weight: ...}, ...]`.

Each next example (conversation or document) comes from a source drawn with probability
weight / sum of weights, from a seeded generator, so the same mixture gives the same stream.
`dataset.mixture_stop` says what happens when a source runs out:

  first_exhausted  stop there: the realised proportions follow the weights, nothing repeats
  all_used         carry on with the sources left until every one is used up: every example
                   of every source appears once; the weights set how they are interleaved

What was drawn is counted as it is yielded (`Mixture.realised()`), so the prepared manifest
records the realised proportions of exactly the examples that went into the data. A component
is a dict: `source` and `weight` (default 1), plus the fields of that kind of source --
hub: `path`, `name` (config), `split` (slices allowed), `text_field` (text);
local: `paths` (and `txt_unit`, `text_field` for text); synthetic_tasks: `max_documents`,
`task_types`, `difficulty`; any: `max_documents` (cap on that source), `skip_bad_records`.
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from ldm.errors import ConfigError

CHAT_SOURCES = ("hub", "local", "construction_faq", "synthetic_tasks")
TEXT_SOURCES = ("hub", "local", "shakespeare")
ALIASES = {"synthetic": "synthetic_tasks"}
STOPS = ("first_exhausted", "all_used")
KEYS = ("source", "weight", "path", "name", "split", "text_field", "paths", "txt_unit",
        "max_documents", "task_types", "difficulty", "skip_bad_records")


def _weight(index: int, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"dataset.mixture[{index}].weight={value!r} is not a finite number; "
                          "accepted: a number >= 0 (relative share of the mixture)")
    if value < 0:
        raise ConfigError(f"dataset.mixture[{index}].weight={value} is negative; accepted: a "
                          "number >= 0 (relative share of the mixture)")
    return float(value)


def components(mixture: Sequence[Any], kind: str, stop: str = "first_exhausted",
               skip_bad_records: bool = False) -> List[Dict[str, Any]]:
    """Return the mixture's components as complete dicts; ConfigError naming the bad entry."""
    accepted = CHAT_SOURCES if kind == "chat" else TEXT_SOURCES
    if stop not in STOPS:
        raise ConfigError(f"dataset.mixture_stop={stop!r}; accepted: {', '.join(STOPS)}")
    if not mixture:
        raise ConfigError("dataset.mixture is empty; give it sources, e.g. 'dataset.mixture="
                          "[{source: construction_faq, weight: 1}, {source: local, paths: "
                          "[/data/chat.jsonl], weight: 2}]' (sources: "
                          f"{', '.join(accepted)})")
    parts = []
    for i, entry in enumerate(mixture):
        if not isinstance(entry, dict) or "source" not in entry:
            raise ConfigError(f"dataset.mixture[{i}]={entry!r} needs a 'source' "
                              f"({', '.join(accepted)}) and a 'weight'")
        unknown = sorted(set(entry) - set(KEYS))
        if unknown:
            raise ConfigError(f"dataset.mixture[{i}] has unknown key(s) {', '.join(unknown)}; "
                              f"accepted: {', '.join(KEYS)}")
        source = ALIASES.get(entry["source"], entry["source"])
        if source not in accepted:
            raise ConfigError(f"dataset.mixture[{i}].source={entry['source']!r} is not a {kind} "
                              f"source; accepted: {', '.join(accepted)}")
        part = {"source": source, "weight": _weight(i, entry.get("weight", 1.0)),
                "path": None, "name": None, "split": "train", "text_field": "text", "paths": [],
                "txt_unit": "file", "max_documents": None, "task_types": [], "difficulty": 1,
                "skip_bad_records": skip_bad_records}
        part.update({k: v for k, v in entry.items() if k not in ("source", "weight")})
        if source == "hub" and not part["path"]:
            raise ConfigError(f"dataset.mixture[{i}] is a hub source without a path; e.g. "
                              "{source: hub, path: allenai/tulu-3-sft-mixture, split: train}")
        if source == "local" and not part["paths"]:
            raise ConfigError(f"dataset.mixture[{i}] is a local source without paths; e.g. "
                              "{source: local, paths: [/data/*.jsonl]}")
        if source == "synthetic_tasks" and part["max_documents"] is None:
            raise ConfigError(f"dataset.mixture[{i}] is a synthetic_tasks source without "
                              "max_documents (the number of examples it generates)")
        parts.append(part)
    if sum(p["weight"] for p in parts) <= 0:
        raise ConfigError("every dataset.mixture weight is 0; give at least one source a "
                          "weight > 0 (weights are relative shares)")
    return parts


def label(part: Dict[str, Any]) -> str:
    """Return a short readable name of a component (the hub id, file or package it reads)."""
    if part["source"] == "hub":
        return f"hub:{part['path']}" + (f":{part['name']}" if part.get("name") else "")
    if part["source"] == "local":
        return "local:" + ",".join(Path(str(p)).name for p in part["paths"])
    return part["source"]


def labels(parts: Sequence[Dict[str, Any]]) -> List[str]:
    """Return unique component names (a repeated name gets #2, #3, ...)."""
    out: List[str] = []
    for part in parts:
        name = label(part)
        if name in out:
            name = f"{name}#{sum(1 for o in out if o.split('#')[0] == name) + 1}"
        out.append(name)
    return out


def hub_entry(part: Dict[str, Any]) -> dict:
    """Return the `dataset.hub` entry a hub component stands for."""
    return {"path": part["path"], "name": part["name"], "split": part["split"] or "train",
            "text_field": part["text_field"]}


class Mixture:
    """A seeded weighted interleaving of re-iterable sources; counts what each pass yields.

    `openers[i]()` returns a fresh iterator of source i. Calling the mixture starts a new pass
    (counts reset), so a first pass that trains a tokenizer does not skew the recorded counts.
    """

    def __init__(self, names: Sequence[str], openers: Sequence[Callable[[], Iterator]],
                 weights: Sequence[float], seed: int, stop: str = "first_exhausted",
                 sources: Sequence[Any] = ()):
        if stop not in STOPS:
            raise ConfigError(f"dataset.mixture_stop={stop!r}; accepted: {', '.join(STOPS)}")
        self.names, self.openers, self.weights = list(names), list(openers), list(weights)
        self.seed, self.stop, self.sources = seed, stop, list(sources)
        self.counts = [0] * len(self.names)
        self.exhausted: List[str] = []

    @property
    def skipped_bad(self) -> int:
        """Return the bad records the component sources skipped in the last pass."""
        return sum(int(getattr(s, "skipped_bad", 0)) for s in self.sources)

    def __call__(self) -> Iterator:
        """Return a fresh iterator over the mixture (resetting the counts)."""
        self.counts = [0] * len(self.names)
        self.exhausted = []
        return self._stream()

    def _stream(self) -> Iterator:
        rng = random.Random(self.seed)
        active = [i for i, w in enumerate(self.weights) if w > 0]
        iterators = {i: iter(self.openers[i]()) for i in active}
        while active:
            i = active[0] if len(active) == 1 else \
                rng.choices(active, weights=[self.weights[j] for j in active])[0]
            try:
                item = next(iterators[i])
            except StopIteration:
                self.exhausted.append(self.names[i])
                if self.stop == "first_exhausted":
                    return
                active.remove(i)
                continue
            self.counts[i] += 1
            yield item

    def realised(self) -> Dict[str, Any]:
        """Return the mixture's weights, target shares and realised counts and shares."""
        total = sum(self.counts)
        weight_sum = sum(self.weights)
        return {
            "stop": self.stop, "seed": self.seed, "examples": total,
            "exhausted": list(self.exhausted),
            "sources": {name: {"weight": w, "target": w / weight_sum, "examples": n,
                               "proportion": n / total if total else 0.0}
                        for name, w, n in zip(self.names, self.weights, self.counts)},
        }


def metric_name(name: str) -> str:
    """Return `name` with the characters mlflow refuses in metric keys replaced by '_'."""
    return re.sub(r"[^\w.\-/ ]", "_", name)


def mixture_metrics(manifest: Dict[str, Any]) -> Dict[str, float]:
    """Return mlflow metrics of a manifest's realised mixture (empty for a single source)."""
    mix = manifest.get("mixture")
    if not mix:
        return {}
    out = {"mixture.examples": float(mix["examples"])}
    for name, st in mix["sources"].items():
        key = metric_name(name)
        out[f"mixture.{key}.proportion"] = float(st["proportion"])
        out[f"mixture.{key}.target"] = float(st["target"])
        out[f"mixture.{key}.examples"] = float(st["examples"])
    return out


def manifest_record(stream) -> Optional[Callable[[], Dict[str, Any]]]:
    """Return a callable giving the manifest's `mixture` record, or None for a single source."""
    if not isinstance(stream, Mixture):
        return None
    return lambda: {"mixture": stream.realised()}


def print_realised(manifest: Dict[str, Any]) -> None:
    """Print a mixture's target and realised shares (nothing for a single source)."""
    mix = manifest.get("mixture")
    if not mix:
        return
    print(f"mixture ({mix['stop']}, seed {mix['seed']}): {mix['examples']:,} examples drawn")
    for name, st in mix["sources"].items():
        print(f"  {name}: weight {st['weight']:g}, target {st['target']:.1%}, "
              f"realised {st['proportion']:.1%} ({st['examples']:,})")


# --- opening the components --------------------------------------------------------------------

def open_chat_mixture(parts: Sequence[Dict[str, Any]], seed: int, stop: str,
                      streaming: bool) -> tuple:
    """Return (Mixture of conversations, description for the fingerprint) of chat components."""
    import itertools

    from ldm.data import synthetic
    from ldm.data.chat_sources import open_chat_source

    names, openers, sources, descs = labels(parts), [], [], []
    for part in parts:
        if part["source"] == "synthetic_tasks":
            args = (part["max_documents"], seed, part["task_types"] or None, part["difficulty"])
            openers.append(lambda args=args: synthetic.conversations(*args))
            descs.append(synthetic.describe(*args))
            continue
        source, desc = open_chat_source(
            part["source"], hub=[hub_entry(part)] if part["source"] == "hub" else [],
            paths=list(part["paths"]), streaming=streaming,
            skip_bad_records=part["skip_bad_records"])
        cap = part["max_documents"]
        openers.append(lambda s=source, cap=cap: itertools.islice(s(), cap))
        sources.append(source)
        descs.append({**desc, "max_documents": cap})
    mix = Mixture(names, openers, [p["weight"] for p in parts], seed, stop, sources)
    return mix, describe(names, parts, descs, seed, stop)


def open_text_mixture(parts: Sequence[Dict[str, Any]], seed: int, stop: str, streaming: bool,
                      cache_dir: Optional[str | Path]) -> tuple:
    """Return (Mixture of document strings, description for the fingerprint) of text components."""
    import itertools

    from ldm.data.sources import open_text_source

    names, openers, descs = labels(parts), [], []
    for part in parts:
        docs, desc = open_text_source(
            part["source"], hub=[hub_entry(part)] if part["source"] == "hub" else [],
            paths=list(part["paths"]), text_field=part["text_field"], txt_unit=part["txt_unit"],
            streaming=streaming, cache_dir=cache_dir)
        cap = part["max_documents"]
        openers.append(lambda d=docs, cap=cap: itertools.islice((r["text"] for r in d), cap))
        descs.append({**desc, "max_documents": cap})
    mix = Mixture(names, openers, [p["weight"] for p in parts], seed, stop)
    return mix, describe(names, parts, descs, seed, stop)


def describe(names, parts, descs, seed: int, stop: str) -> Dict[str, Any]:
    """Return what identifies a mixture: each source, its weight, the seed and the stop rule."""
    return {"mixture": [{"name": n, "weight": p["weight"], **d}
                        for n, p, d in zip(names, parts, descs)],
            "seed": seed, "stop": stop}


def describe_named(parts: Sequence[Dict[str, Any]], kind: str, seed: int, stop: str) -> Dict[str, Any]:
    """Return what a mixture names without reading or downloading it (open_*_mixture's shape)."""
    from ldm.data import synthetic

    descs = []
    for part in parts:
        hub = [hub_entry(part)] if part["source"] == "hub" else []
        if part["source"] == "synthetic_tasks":
            desc = synthetic.describe(part["max_documents"], seed, part["task_types"] or None,
                                      part["difficulty"])
        elif kind == "chat":
            from ldm.data.chat_sources import describe_chat_source

            desc = {**describe_chat_source(part["source"], hub=hub, paths=list(part["paths"])),
                    "max_documents": part["max_documents"]}
        else:
            from ldm.data.sources import describe_text_source

            desc = {**describe_text_source(part["source"], hub=hub, paths=list(part["paths"]),
                                           text_field=part["text_field"],
                                           txt_unit=part["txt_unit"]),
                    "max_documents": part["max_documents"]}
        descs.append(desc)
    return describe(labels(parts), parts, descs, seed, stop)


def validate(parts: Sequence[Dict[str, Any]], kind: str, streaming: bool) -> None:
    """Check each component cheaply (files exist, package installed, hub reachable)."""
    if kind == "chat":
        from ldm.data import synthetic
        from ldm.data.chat_sources import validate_chat_source

        for part in parts:
            if part["source"] == "synthetic_tasks":
                synthetic.validate_task_types(part["task_types"] or None)
                continue
            validate_chat_source(part["source"],
                                 [hub_entry(part)] if part["source"] == "hub" else [],
                                 list(part["paths"]), streaming)
        return
    from ldm.data.sources import validate_text_source

    for part in parts:
        validate_text_source(part["source"], [hub_entry(part)] if part["source"] == "hub" else [],
                             list(part["paths"]), streaming)
