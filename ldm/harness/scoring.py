"""Scoring functions the offline task YAMLs name with `!function`."""

from __future__ import annotations

from typing import Dict, List


def process_synthetic(doc: dict, results: List[str]) -> Dict[str, float]:
    """Return {exact_match: 1.0 or 0.0} by the synthetic tasks' own checker (as task=evaluate)."""
    from ldm.data import synthetic

    answer = results[0].strip() if results else ""
    return {"exact_match": float(synthetic.check(doc["task"], answer, doc["answer"]))}
