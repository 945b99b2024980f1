"""Specification of the masked-diffusion sampler (ldm.sampling), on scripted fake models and a
tiny random BERT.

Layer: unit, the sampler's functions in-process (task=sample's steps: test_sample_task.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import BertConfig, BertForMaskedLM

from ldm.config import SamplerConfig
from ldm.errors import ConfigError
from ldm.sampling import SamplerSettings, commit_schedule, sampler_model, unmask_probability
from ldm.sampling import generate as generate_with

PAD, UNK, CLS, EOS, MASK = 0, 1, 2, 3, 4
SPECIAL = [PAD, UNK, CLS, EOS, MASK]
NEVER = {PAD, UNK, CLS, MASK}
IDS = dict(mask_id=MASK, eos_id=EOS, special_ids=SPECIAL, pad_id=PAD)
VOCAB = 16
ORIGINAL = dict(rule="original", temperature=1.0, early_stop=False)
CONF = Path(__file__).resolve().parents[2] / "conf" / "sampler"


SETTING_NAMES = set(SamplerSettings.__dataclass_fields__)


def generate(model_fn, prompts, **kwargs):
    """Call the sampler with the sampler settings among `kwargs` gathered in SamplerSettings."""
    settings = {k: kwargs.pop(k) for k in list(kwargs) if k in SETTING_NAMES}
    settings.setdefault("block_length", None)
    return generate_with(model_fn, prompts, SamplerSettings(**settings), **kwargs)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class AnswerScript:
    """Fake model: logits at answer position j are script[j] whatever the padding, where the
    script may be chosen by the prompt's first real token; prompt positions get zeros. Records
    every input it is called with."""

    def __init__(self, script: torch.Tensor | dict[int, torch.Tensor], max_new_tokens: int):
        self.script, self.max_new_tokens = script, max_new_tokens
        self.inputs: list[torch.Tensor] = []

    @property
    def calls(self) -> int:
        return len(self.inputs)

    def __call__(self, input_ids, attention_mask):
        self.inputs.append(input_ids.clone())
        batch, width = input_ids.shape
        logits = torch.zeros(batch, width, VOCAB)
        first_real = attention_mask.argmax(1)
        for row in range(batch):
            script = self.script
            if isinstance(script, dict):
                script = script[int(input_ids[row, first_real[row]])]
            logits[row, width - self.max_new_tokens :] = script
        return logits


class NoisyModel:
    """Fake model returning fresh random logits on every call: the worst case for stability."""

    def __init__(self, seed: int = 0, vocab: int = VOCAB):
        self.gen, self.vocab, self.calls = torch.Generator().manual_seed(seed), vocab, 0

    def __call__(self, input_ids, attention_mask):
        self.calls += 1
        return torch.randn(*input_ids.shape, self.vocab, generator=self.gen) * 3


def sure_script(tokens: list[int], confidences: list[float], vocab: int = VOCAB) -> torch.Tensor:
    """Return [N, V] logits whose argmax at j is tokens[j], with logit margin confidences[j]."""
    script = torch.zeros(len(tokens), vocab)
    for j, (tok, conf) in enumerate(zip(tokens, confidences)):
        script[j, tok] = conf
    return script


@pytest.fixture(scope="module")
def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=128,
    )
    return sampler_model(BertForMaskedLM(config).eval())


def commits_per_step(result) -> list[list[int]]:
    return [step.committed.sum(1).tolist() for step in result.history]


def test_commit_schedule_gives_the_remainder_to_the_earliest_steps():
    assert commit_schedule(10, 4) == [3, 3, 2, 2]
    assert commit_schedule(8, 8) == [1] * 8
    assert commit_schedule(7, 3) == [3, 2, 2]
    model = NoisyModel()
    result = generate(model, [[7, 8]], **IDS, max_new_tokens=10, steps=4, block_length=10)
    assert commits_per_step(result) == [[3], [3], [2], [2]]


@pytest.mark.parametrize(
    "options",
    [
        dict(block_length=6, steps=12, temperature=1.0),
        dict(block_length=12, steps=4, remasking="random", temperature=0.7, top_k=5),
        dict(block_length=6, steps=12, threshold=0.3, remasking="margin"),
        dict(block_length=12, steps=12, rule="original", temperature=1.0, early_stop=False),
    ],
    ids=["low_confidence", "random", "threshold", "original"],
)
def test_committed_tokens_never_change_across_the_history(options):
    result = generate(
        NoisyModel(seed=1),
        [[5, 6, 7], [8], [9, 10, 11, 12, 13]],
        **IDS,
        max_new_tokens=12,
        generator=seeded(0),
        **options,
    )
    before = torch.full_like(result.history[0].answer, MASK)
    for step in result.history:
        filled = before != MASK
        assert torch.equal(step.answer[filled], before[filled])
        assert torch.equal(step.committed, filled.logical_not() & (step.answer != MASK))
        before = step.answer
    assert torch.equal(before, result.answer)


def test_one_position_commits_per_step_when_steps_equal_max_new_tokens():
    model = NoisyModel()
    result = generate(
        model, [[5, 6], [7]], **IDS, max_new_tokens=8, steps=8, block_length=4, early_stop=False
    )
    assert commits_per_step(result) == [[1, 1]] * 8
    assert result.nfe == model.calls == 8
    assert result.committed == [8, 8]


def test_threshold_fills_an_easy_span_in_one_step_and_commits_at_least_one_per_step():
    # Answer positions 0-3 are near-certain; 4-7 are hesitant, never reaching the threshold.
    script = sure_script([5, 6, 7, 8, 9, 10, 11, 12], [30, 30, 30, 30, 1.0, 1.2, 1.1, 0.9])
    model = AnswerScript(script, max_new_tokens=8)
    result = generate(
        model, [[13]], **IDS, max_new_tokens=8, steps=8, block_length=8, threshold=0.9
    )
    first = result.history[0].committed[0]
    assert first.tolist() == [True] * 4 + [False] * 4
    assert all(counts[0] >= 1 for counts in commits_per_step(result))
    assert commits_per_step(result)[1:] == [[1]] * 4  # only the most confident one each
    assert result.history[1].committed[0, 5]  # ... which is the most confident (1.2)
    assert result.nfe == model.calls == 5 < 8
    assert result.tokens == [[5, 6, 7, 8, 9, 10, 11, 12]]


def test_threshold_with_a_small_step_budget_still_fills_the_block_within_budget():
    script = sure_script(list(range(5, 13)), [1.0] * 8)  # nothing reaches the threshold
    kwargs = dict(max_new_tokens=8, steps=3, block_length=8, threshold=0.99)
    result = generate(AnswerScript(script, 8), [[13]], **IDS, **kwargs)
    assert commits_per_step(result) == [[3], [3], [2]]
    assert result.committed == [8]


def test_blocks_fill_strictly_left_to_right():
    # Later positions are more confident, so without blocks the answer would fill right to left.
    n, block = 12, 4
    script = sure_script([5 + j % 8 for j in range(n)], [1.0 + j for j in range(n)])
    kwargs = dict(max_new_tokens=n, steps=6, block_length=block, early_stop=False)
    result = generate(AnswerScript(script, n), [[13], [14, 15]], **IDS, **kwargs)
    before = torch.full_like(result.answer, MASK)
    for step in result.history:
        lo, hi = step.block * block, (step.block + 1) * block
        assert not step.committed[:, :lo].any() and not step.committed[:, hi:].any()
        assert (before[:, :lo] != MASK).all(), "an earlier block was still unfinished"
        assert (step.answer[:, hi:] == MASK).all(), "a later block was started early"
        before = step.answer
    assert [s.block for s in result.history] == [0, 0, 1, 1, 2, 2]


def test_mask_and_special_tokens_are_never_emitted_but_eos_is():
    # The model's favourites are the mask and special tokens; EOS is the best allowed token.
    script = torch.zeros(6, VOCAB)
    script[:, MASK], script[:, PAD], script[:, CLS], script[:, UNK] = 50.0, 40.0, 30.0, 20.0
    script[:, EOS], script[:, 9] = 10.0, 9.0
    kwargs = dict(max_new_tokens=6, steps=6, block_length=6, early_stop=False)
    for temperature in (0.0, 1.0):
        result = generate(
            AnswerScript(script, 6),
            [[5, 6]],
            **IDS,
            **kwargs,
            temperature=temperature,
            generator=seeded(0),
        )
        assert not NEVER & set(result.tokens[0])
        assert EOS in result.tokens[0]


def test_a_bare_logits_function_is_an_opaque_model_that_samples_the_same_answers(tiny_bert):
    from ldm.sampling import SamplerModel

    opaque = SamplerModel.of(lambda ids, attn: tiny_bert(ids, attn))
    assert tiny_bert.family == "bert" and opaque.model is None and opaque.family is None
    kwargs = dict(max_new_tokens=8, steps=8, block_length=4, early_stop=False)
    seen = generate(tiny_bert, [[10, 11, 12], [20]], **IDS, **kwargs)
    unseen = generate(opaque, [[10, 11, 12], [20]], **IDS, **kwargs)
    assert seen.tokens == unseen.tokens
    # only the model the sampler sees into has its head run on the block alone, and its cost
    assert seen.flops > 0 and unseen.flops == 0


def test_tiny_bert_never_emits_mask_or_special_tokens(tiny_bert):
    for options in (dict(temperature=0.0), dict(temperature=2.0, top_p=0.95)):
        kwargs = dict(max_new_tokens=16, steps=8, block_length=8, early_stop=False, **options)
        result = generate(tiny_bert, [[10, 11, 12], [20]], **IDS, **kwargs, generator=seeded(0))
        emitted = {t for row in result.tokens for t in row}
        assert not NEVER & emitted and len(result.tokens[0]) == 16


def test_eos_early_stop_trims_after_eos_and_runs_fewer_model_calls_than_steps():
    # EOS at answer position 3 is committed first, but the answer is only done once positions
    # 0-2 are filled too: 4 model calls, not 1 and not the 16 the budget allows.
    script = sure_script([5, 6, 7, EOS] + [EOS] * 12, [5.0, 4.0, 3.0, 9.0] + [1.0] * 12)
    model = AnswerScript(script, 16)
    kwargs = dict(max_new_tokens=16, steps=16, block_length=16)
    result = generate(model, [[8, 9]], **IDS, **kwargs)
    assert result.tokens == [[5, 6, 7]] and result.eos == [True]
    assert result.nfe == model.calls == result.steps_run == len(result.history) == 4
    assert result.committed == [4]
    full = generate(AnswerScript(script, 16), [[8, 9]], **IDS, **kwargs, early_stop=False)
    assert full.nfe == 16 and full.tokens[0][:4] == [5, 6, 7, EOS] and len(full.tokens[0]) == 16


def test_early_stop_trims_each_prompt_of_a_batch_at_its_own_eos():
    # Two prompts of different lengths share the script, but each answer ends where it ends.
    script = sure_script([5, 6, EOS, 7, EOS, EOS, EOS, EOS], [8, 7, 6, 5, 4, 3, 2, 1])
    model = AnswerScript(script, 8)
    result = generate(model, [[9], [10, 11, 12]], **IDS, max_new_tokens=8, steps=8, block_length=8)
    assert result.tokens == [[5, 6], [5, 6]] and result.nfe == 3


def test_greedy_decoding_is_deterministic(tiny_bert):
    kwargs = dict(max_new_tokens=16, steps=8, block_length=8, temperature=0.0)
    runs = [
        generate(tiny_bert, [[10, 11], [12]], **IDS, **kwargs, generator=seeded(seed))
        for seed in (0, 0, 1)
    ]
    assert runs[0].tokens == runs[1].tokens == runs[2].tokens
    assert all(torch.equal(a.answer, b.answer) for a, b in zip(runs[0].history, runs[2].history))


def test_sampling_with_the_same_generator_seed_is_reproducible(tiny_bert):
    kwargs = dict(max_new_tokens=16, steps=8, block_length=8, temperature=1.5)
    first, again, other = (
        generate(tiny_bert, [[10, 11]], **IDS, **kwargs, generator=seeded(seed)).tokens
        for seed in (3, 3, 4)
    )
    assert first == again and first != other


def test_cfg_scale_zero_is_unguided_with_one_conditional_call_per_step():
    prompt = [5, 6, 7]
    script = sure_script(list(range(5, 13)), [float(j) for j in range(8)])
    model = AnswerScript(script, 8)
    plain = generate(model, [prompt], **IDS, max_new_tokens=8, steps=8, block_length=8)
    assert plain.nfe == model.calls == 8
    assert all(ids[0, :3].tolist() == prompt for ids in model.inputs), "prompt was masked"
    # With a prompt-blind model cond == uncond bitwise, so guidance must change nothing but cost.
    guided_model = AnswerScript(script, 8)
    guided = generate(
        guided_model, [prompt], **IDS, max_new_tokens=8, steps=8, block_length=8, cfg_scale=2.0
    )
    assert guided.tokens == plain.tokens
    assert guided.nfe == guided_model.calls == 16
    assert [ids[0, :3].tolist() for ids in guided_model.inputs[1::2]] == [[MASK] * 3] * 8


def test_cfg_pushes_logits_away_from_the_unconditional_prediction():
    # cond prefers 5 only slightly over 6; uncond prefers 5 strongly, so guidance picks 6:
    # uncond + 2 * (cond - uncond) -> token 5: 2.0, token 6: 3.8.
    def model(input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, VOCAB)
        prompt_masked = (input_ids[:, :1] == MASK).float()[:, :, None]
        logits[..., 5] = 2.0
        logits[..., 6] = 1.9 * (1 - prompt_masked)
        return logits

    kwargs = dict(max_new_tokens=2, steps=2, block_length=2, early_stop=False)
    assert generate(model, [[8]], **IDS, **kwargs).tokens == [[5, 5]]
    assert generate(model, [[8]], **IDS, **kwargs, cfg_scale=1.0).tokens == [[6, 6]]


@pytest.mark.parametrize(
    "options",
    [
        dict(remasking="low_confidence"),
        dict(remasking="margin"),
        dict(remasking="entropy", cfg_scale=0.5),
        dict(remasking="low_confidence", threshold=0.02),
    ],
    ids=["low_confidence", "margin", "entropy_cfg", "threshold"],
)
def test_batched_greedy_equals_one_prompt_at_a_time_for_prompts_of_different_lengths(
    tiny_bert, options
):
    prompts = [[10, 11, 12, 13, 14], [20, 21], [30, 31, 32, 33, 34, 35, 36, 37, 38]]
    kwargs = dict(**IDS, max_new_tokens=16, steps=8, block_length=8, **options)
    batched = generate(tiny_bert, prompts, **kwargs)
    for i, prompt in enumerate(prompts):
        alone = generate(tiny_bert, [prompt], **kwargs)
        assert alone.tokens[0] == batched.tokens[i]
        assert alone.committed[0] == batched.committed[i]


def test_left_padded_tensor_prompts_match_list_prompts(tiny_bert):
    prompts = [[10, 11, 12], [20]]
    ids = torch.tensor([[10, 11, 12], [PAD, PAD, 20]])
    attention = torch.tensor([[1, 1, 1], [0, 0, 1]])
    kwargs = dict(**IDS, max_new_tokens=8, steps=8, block_length=8)
    from_list = generate(tiny_bert, prompts, **kwargs)
    from_tensor = generate(tiny_bert, ids, attention_mask=attention, **kwargs)
    assert from_list.tokens == from_tensor.tokens
    with pytest.raises(ConfigError, match="left-padded"):
        generate(tiny_bert, ids.flip(1), attention_mask=attention.flip(1), **kwargs)


def test_original_rule_commits_max_new_tokens_over_steps_per_step_on_average():
    # Kept masked w.p. s/t, so E[commits at step k] = N (1 - k/S) * 1/(S - k) = N / S.
    n, steps, rows = 32, 8, 64
    assert [unmask_probability(k, steps) for k in range(steps)] == pytest.approx(
        [1 / (steps - k) for k in range(steps)]
    )
    assert unmask_probability(steps - 1, steps) == 1.0
    kwargs = dict(max_new_tokens=n, steps=steps, block_length=n, **ORIGINAL)
    result = generate(NoisyModel(), [[5]] * rows, **IDS, **kwargs, generator=seeded(1234))
    assert [s.step for s in result.history] == list(range(steps))
    per_step = torch.stack([s.committed.sum(1) for s in result.history]).double()  # [S, B]
    mean = per_step.mean(1)
    # Each entry is a mean of 64 counts with sd <= 2.8, so 1.0 is more than 3.5 standard errors.
    assert (mean - n / steps).abs().max() < 1.0, mean.tolist()
    assert per_step.std() > 0.5  # genuinely random, not the fixed schedule
    assert result.committed == [n] * rows and result.nfe == steps


def test_a_step_that_would_commit_nothing_is_skipped_without_a_model_call():
    model = NoisyModel()
    kwargs = dict(max_new_tokens=8, steps=8, block_length=8, **ORIGINAL)
    result = generate(model, [[5]], **IDS, **kwargs, generator=seeded(0))
    assert result.steps_skipped > 0
    assert result.steps_run + result.steps_skipped == 8
    assert model.calls == result.nfe == result.steps_run == len(result.history)
    assert all(s.committed.any() for s in result.history)
    assert result.committed == [8]


def test_finished_prompts_are_left_out_of_later_model_calls():
    scripts = {
        10: sure_script([5, EOS, 6, 7, 8, 9], [9, 8, 3, 2, 1, 0.5]),
        11: sure_script([5, 6, 7, EOS, EOS, EOS], [9, 8, 7, 6, 1, 0.5]),
    }
    model = AnswerScript(scripts, 6)
    result = generate(model, [[10], [11, 12]], **IDS, max_new_tokens=6, steps=6, block_length=6)
    assert result.tokens == [[5], [5, 6, 7]] and result.eos == [True, True]
    assert [ids.shape[0] for ids in model.inputs] == [2, 2, 1, 1]


GOOD = dict(max_new_tokens=8, steps=8, block_length=4, max_positions=16)


def validate_sampler_args(prompt_length=4, **kwargs):
    """Build the settings and check a prompt of `prompt_length`; return the number of blocks."""
    settings = SamplerSettings(**kwargs)
    settings.check_prompt(prompt_length)
    return settings.num_blocks


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(prompt_length=10), "max_positions=16"),
        (dict(max_new_tokens=32, steps=32, max_positions=16), "max_new_tokens=32 exceeds"),
        (dict(max_new_tokens=0, block_length=None, steps=1), "max_new_tokens=0"),
        (dict(block_length=3), "block_length=3"),
        (dict(block_length=0), "block_length=0"),
        (dict(steps=0), "steps=0"),
        (dict(steps=9), "steps=9"),
        (dict(steps=3), "divisible by the number of blocks 2"),
        (dict(threshold=0.0), "threshold=0.0"),
        (dict(threshold=1.5), "threshold=1.5"),
        (dict(remasking="lowest"), "remasking='lowest'"),
        (dict(rule="ancestral"), "rule='ancestral'"),
        (dict(temperature=-0.1), "temperature=-0.1"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_p=1.2), "top_p=1.2"),
        (dict(top_k=0), "top_k=0"),
        (dict(cfg_scale=-1.0), "cfg_scale=-1.0"),
        (dict(rule="original", threshold=0.9), "threshold=0.9 needs sampler.rule='commit'"),
    ],
)
def test_bad_sampler_arguments_raise_one_line_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as error:
        validate_sampler_args(**{**GOOD, **bad})
    assert "\n" not in str(error.value)


def test_generate_rejects_bad_arguments_before_calling_the_model():
    model = NoisyModel()
    with pytest.raises(ConfigError, match="max_positions=8"):
        generate(model, [[5, 6, 7]], **IDS, max_new_tokens=8, steps=8, max_positions=8)
    with pytest.raises(ConfigError, match="pad_id"):
        generate(model, [[5, 6], [7]], mask_id=MASK, eos_id=EOS, max_new_tokens=8, steps=8)
    assert model.calls == 0
    assert validate_sampler_args(**GOOD) == 2


@pytest.mark.parametrize("preset", ["original", "llada", "fast", "fast_dual", "entropy_bound"])
def test_sampler_presets_fit_the_schema_and_run(preset, tiny_bert):
    raw = OmegaConf.load(CONF / f"{preset}.yaml")
    assert list(raw.pop("defaults")) == ["schema", "_self_"]
    node = OmegaConf.merge(OmegaConf.structured(SamplerConfig), raw)
    assert node.name == preset and node.max_new_tokens == 64 and node.steps == 64
    node.max_new_tokens = 32  # interpolated fields follow
    options = OmegaConf.to_container(node, resolve=True)
    options.pop("name")
    assert options["steps"] == 32
    if preset == "original":
        assert options["block_length"] == 32 and options["rule"] == "original"
        assert options["early_stop"] is False
    if preset == "fast":
        assert options["threshold"] == 0.9 and options["block_length"] == 32
    if preset == "fast_dual":  # fast with the dual cache, nothing else changed
        fast = OmegaConf.to_container(OmegaConf.load(CONF / "fast.yaml"))
        mine = OmegaConf.to_container(OmegaConf.load(CONF / "fast_dual.yaml"))
        assert fast["cache"] == "none" and mine["cache"] == "dual"
        assert {k: v for k, v in mine.items() if k not in ("name", "cache")} == \
            {k: v for k, v in fast.items() if k not in ("name", "cache")}
    result = generate(
        tiny_bert, [[10, 11]], **IDS, **options, max_positions=128, generator=seeded(0)
    )
    assert result.nfe <= 32 and not NEVER & set(result.tokens[0])
