"""The Monte Carlo ELBO behind `loglikelihood`: exact where it must be, unbiased, batch-proof.

Layer: unit, the harness's ELBO functions in-process (the adapter: test_benchmark_adapter.py;
the task: test_benchmark_task.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from ldm.harness.elbo import exact_elbo, mc_elbo, model_logits_at, stratified_ks
from ldm.errors import ConfigError
from ldm.sampling.decode import guided_logits

PAD, MASK, VOCAB = 0, 4, 40


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    m = BertForMaskedLM(cfg).eval()
    with torch.no_grad():  # sharpen the random model so positions really depend on each other
        m.cls.predictions.decoder.weight.mul_(8.0)
    return m


def exact_logprob_with_last_masked(model, context, token, cfg_scale=0.0):
    ids = torch.tensor([context + [MASK]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
        if cfg_scale > 0:
            uncond = torch.tensor([[MASK] * len(context) + [MASK]])
            logits = guided_logits(logits, model(input_ids=uncond).logits[0, -1], cfg_scale)
    return float(torch.log_softmax(logits.double(), -1)[token])


def estimate(model, requests, **kw):
    args = dict(mask_id=MASK, pad_id=PAD, mc_num=4, batch_size=8, seed=0)
    args.update(kw)
    return mc_elbo(model_logits_at(model), requests, **args)


def test_one_token_continuation_is_the_exact_log_probability_with_that_position_masked(model):
    context, token = [5, 9, 11, 7, 20], 13
    (value,) = estimate(model, [(context, [token])], mc_num=7)
    assert value == pytest.approx(exact_logprob_with_last_masked(model, context, token), abs=1e-5)


def test_guided_one_token_estimate_is_the_log_softmax_of_the_guided_logits(model):
    context, token = [5, 9, 11, 7, 20], 13
    (value,) = estimate(model, [(context, [token])], mc_num=3, cfg_scale=1.5)
    exact = exact_logprob_with_last_masked(model, context, token, cfg_scale=1.5)
    assert value == pytest.approx(exact, abs=1e-5)
    (plain,) = estimate(model, [(context, [token])], mc_num=3)
    assert abs(plain - value) > 1e-3, "guidance must change the number"


def test_mean_of_many_estimates_converges_to_the_exact_elbo(model):
    context, continuation = [5, 9, 11], [13, 21, 8, 30]
    exact = exact_elbo(model_logits_at(model), context, continuation, mask_id=MASK)
    # one request repeated with different seeds: each estimate uses 4 stratified samples
    values = [estimate(model, [(context, continuation)], seed=s)[0] for s in range(300)]
    mean = sum(values) / len(values)
    spread = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    assert spread > 0.05, "the masks must really vary"
    assert abs(mean - exact) < 4 * spread / math.sqrt(len(values)) + 1e-6
    # and the exact ELBO is a lower bound that is not trivially loose or wrong-signed
    assert exact < 0


def test_k_is_stratified_across_samples_not_drawn_independently():
    ks = stratified_ks(5, 10, torch.Generator().manual_seed(3))
    assert sorted(ks) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert sorted(stratified_ks(4, 3, torch.Generator().manual_seed(1))) != [1, 1, 1]


def test_batching_and_padding_never_change_a_number(model):
    requests = [([5, 9, 11, 7], [13, 21]), ([6], [8, 30, 12, 14, 15]), ([7, 7, 9, 10, 11, 12], [9]),
                ([22, 23], [24, 25, 26])]
    alone = [estimate(model, [r], mc_num=6)[0] for r in requests]
    together = estimate(model, requests, mc_num=6, batch_size=24)
    small = estimate(model, list(reversed(requests)), mc_num=6, batch_size=5)[::-1]
    assert together == pytest.approx(alone, abs=1e-5)
    assert small == pytest.approx(alone, abs=1e-5)


def test_estimator_settings_out_of_range_are_refused(model):
    with pytest.raises(ConfigError, match="mc_num=0"):
        estimate(model, [([5], [6])], mc_num=0)
    with pytest.raises(ConfigError, match="empty continuation"):
        estimate(model, [([5], [])])
