"""The export's saved chat template encodes every record exactly as encode_chat does, including
text that spells a special token (it stays text), for BERT, a trained BPE and a ModernBERT-style
tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldm.tokenizer import (chat_encoding_note, chat_token_ids, encode_chat)
from test_banned_tokens import minilm, modernbert_style, trained_bpe

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "chat_injection.jsonl"
RECORDS = [json.loads(line)["messages"] for line in FIXTURE.read_text().splitlines()]


@pytest.fixture(params=["minilm", "trained_bpe", "modernbert_style"])
def saved(request, tmp_path):
    """(tokenizer as built, the same reloaded with AutoTokenizer from a saved folder)."""
    from transformers import AutoTokenizer

    build = {"minilm": lambda _: minilm(), "trained_bpe": trained_bpe,
             "modernbert_style": modernbert_style}[request.param]
    tok = build(tmp_path)
    tok.save_pretrained(str(tmp_path / "export"))
    return tok, AutoTokenizer.from_pretrained(str(tmp_path / "export"))


@pytest.mark.parametrize("index", range(len(RECORDS)))
def test_saved_template_ids_equal_encode_chat_ids_for_injection_records(saved, index):
    tok, reloaded = saved
    messages = RECORDS[index]
    ids, mask = encode_chat(tok, messages)
    out = reloaded.apply_chat_template(messages, return_assistant_tokens_mask=True)
    assert out["input_ids"] == ids
    assert out["assistant_masks"] == mask
    prompt = reloaded.apply_chat_template(messages[:-1], add_generation_prompt=True)["input_ids"]
    assert prompt == encode_chat(tok, messages[:-1], add_generation_prompt=True)[0]
    marks = chat_token_ids(tok)
    turns = sum(1 for m in messages if m["role"] != "assistant")
    assert out["input_ids"].count(marks["end"]) == turns  # no extra turn boundary from text


def test_export_records_that_its_template_is_safe_and_which_encoder_to_use(saved):
    tok, reloaded = saved
    note = chat_encoding_note(reloaded)
    assert note == {"template_injection_safe": True, "encoder": "tokenizer.apply_chat_template"}
