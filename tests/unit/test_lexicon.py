"""The word questions (antonym, plural, category, synonym) behind experiment=premise."""

from __future__ import annotations

from collections import Counter

import pytest

from ldm.data import build_lexicon, lexicon, synthetic
from ldm.data.pretrain import split_of
from ldm.errors import ConfigError
from conftest import compose_config

WORD_TYPES = ["antonym", "plural", "category", "synonym"]


def words_of(example) -> set:
    """Return the words a question asks about and answers with."""
    return {example["messages"][0]["content"].rsplit(" ", 1)[1], example["answer"]}


def test_the_shipped_lexicon_uses_every_word_once():
    lines = [(t, w, a) for t, pool in lexicon.entries().items() for w, a in pool]
    counts = Counter(word for _, w, a in lines for word in (w, a))
    assert len(lines) == 1600 and max(counts.values()) == 1
    assert {t for t, _, _ in lines} == set(WORD_TYPES)
    assert ("antonym", "good", "bad") in lines and lexicon.LEXICON.with_name("LEXICON_LICENSE").is_file()


def test_heldout_word_questions_ask_about_words_no_training_example_has():
    cfg = compose_config(["task=prepare", "dataset=premise_words"])
    ds = cfg.dataset
    examples = synthetic.generate(ds.max_documents, ds.split_seed, list(ds.task_types))
    train, test = set(), []
    for i, ex in enumerate(examples):
        if split_of(i, ds.split_seed, ds.test_split_pct) == "test":
            test.append(ex)
        else:
            train |= words_of(ex)
    assert len(test) > 100 and {ex["task"] for ex in test} == set(WORD_TYPES)
    assert not any(words_of(ex) & train for ex in test)
    # the SFT mix begins with the same questions, so it holds out the same ones
    mix = compose_config(["task=prepare", "dataset=premise_sft"]).dataset.mix[0]
    assert (mix.max_documents, list(mix.task_types)) == (ds.max_documents, list(ds.task_types))


def test_word_types_are_asked_for_by_name_and_checked_exactly():
    assert not set(WORD_TYPES) & set(synthetic.TASK_TYPES)  # the default mix is unchanged
    assert {ex["task"] for ex in synthetic.generate(60, seed=1)} <= set(synthetic.TASK_TYPES)
    first = synthetic.generate(8, seed=3, task_types=WORD_TYPES)
    assert [ex["task"] for ex in first[:4]] == WORD_TYPES
    assert first[0]["messages"][0]["content"] == "Give the opposite of the word: good"
    assert synthetic.check("plural", " lines ", "lines") and not synthetic.check("plural", "line", "lines")
    assert "lexicon" in synthetic.describe(8, 3, WORD_TYPES)
    assert "lexicon" not in synthetic.describe(8, 3, ["copy"])


def test_asking_for_more_questions_than_the_lexicon_has_fails_clearly():
    with pytest.raises(ConfigError, match="lower dataset.max_documents"):
        synthetic.generate(4 * 400 + 1, seed=0, task_types=WORD_TYPES)


@pytest.mark.parametrize("noun,plural", [("cat", "cats"), ("box", "boxes"), ("church", "churches"),
                                         ("city", "cities"), ("day", "days"), ("woman", "women")])
def test_regular_plurals_invert_wordnets_detachment_rules(noun, plural):
    assert build_lexicon.regular_plural(noun) == plural


def test_building_without_wordnet_says_how_to_install_it(tmp_path, capsys):
    assert build_lexicon.main(["--wordnet", str(tmp_path), "--out", str(tmp_path / "x.tsv")]) == 1
    assert "apt-get install wordnet-base" in capsys.readouterr().err
    assert not (tmp_path / "x.tsv").exists()


@pytest.mark.skipif(not (build_lexicon.WORDNET / "data.noun").is_file(),
                    reason="Debian's wordnet-base is not installed (make lexicon installs it)")
def test_the_shipped_lexicon_is_what_the_builder_makes(tmp_path):
    out = tmp_path / "lexicon.tsv"
    assert build_lexicon.main(["--out", str(out)]) == 0
    assert out.read_text() == lexicon.LEXICON.read_text()


def test_premise_arms_differ_only_in_their_start_and_seed():
    from omegaconf import OmegaConf

    from ldm.tasks.chain import stage_commands

    chain = compose_config(["experiment=premise"])
    commands = stage_commands(chain)
    sft = {name: compose_config(args[2:]) for name, args in commands.items() if name.startswith("sft_")}
    assert sorted(sft) == [f"sft_{arm}{seed}" for arm in "abc" for seed in range(3)]

    def settings(cfg):
        tree = OmegaConf.to_container(cfg, resolve=True)
        for key in ("seed", "run_name", "init_from"):
            tree.pop(key)
        for key in ("name", "source", "pretrained", "arch", "architecture", "missing_keys_ok"):
            tree["model"].pop(key)  # where the weights come from: the one thing the arms vary
        return tree

    reference = settings(sft["sft_a0"])
    assert all(settings(cfg) == reference for cfg in sft.values())
    assert {cfg.seed for cfg in sft.values()} == {0, 1, 2}
    assert sft["sft_b1"].model.name == "minilm_random"
    assert sft["sft_c2"].init_from.endswith("premise-pretrain") and sft["sft_c2"].model.name == "minilm"
    # every export is asked the same held-out questions with the same sampler
    words = [compose_config(a[2:]) for n, a in commands.items() if n.startswith("words_")]
    assert len(words) == 9 and all(w.dataset.name == "premise_words" for w in words)
    assert len({OmegaConf.to_yaml(w.sampler) for w in words}) == 1


def test_premise_faq_stage_answers_exactly_the_mixs_heldout_faq_pairs():
    from ldm.tasks.chain import stage_commands

    commands = stage_commands(compose_config(["experiment=premise"]))
    faq = compose_config(commands["faq_a0"][2:])
    mix = faq.dataset
    words = mix.mix[0].max_documents
    faq_count = 503  # the construction FAQ's pairs, after the word questions
    held = [i for i in range(words + faq_count) if split_of(i, mix.split_seed, mix.test_split_pct) == "test"]
    # the test split keeps index order, so its last rows are the FAQ's held-out pairs
    assert faq.task.answers_from_end and faq.task.max_examples == sum(i >= words for i in held)
