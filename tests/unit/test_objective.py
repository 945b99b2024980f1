"""Specification of the negative-ELBO objective and of one training step."""

import math

import pytest
import torch
from transformers import AutoModelForMaskedLM, BertConfig, ModernBertConfig

from ldm.errors import ConfigError
from ldm.model import SparseMaskedLM
from ldm.masking import NORMALIZERS
from ldm.train.objective import diffusion_loss, diffusion_step

VOCAB = 50
MASK_ID = 4


def tiny_bert(seed=0):
    """Return a tiny random BERT masked LM without dropout."""
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return AutoModelForMaskedLM.from_config(cfg)


def tiny_modernbert(seed=0):
    """Return a tiny random ModernBERT masked LM."""
    torch.manual_seed(seed)
    cfg = ModernBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                           local_attention=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           cls_token_id=1, sep_token_id=2)
    return AutoModelForMaskedLM.from_config(cfg, attn_implementation="sdpa")


def fixed_batch():
    """Return a tiny noised batch: logits [B, L, V], ids, masked, maskable, attention, t."""
    g = torch.Generator().manual_seed(0)
    B, L, V = 3, 5, 7
    logits = torch.randn(B, L, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, L), generator=g)
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    maskable = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]).bool()
    masked = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]).bool()
    t = torch.tensor([0.3, 0.8, 0.5], dtype=torch.float64)
    return logits, ids, masked, maskable, attention, t


def reference_loss(logits, ids, masked, maskable, attention, t, schedule, normalizer):
    """Return the loss computed with plain Python loops and the math module."""
    B, L, V = logits.shape

    def weight(tb):
        if schedule == "linear":
            return 1.0 / tb
        x = math.pi * tb / 2
        return (math.pi / 2) * math.sin(x) / (1 - math.cos(x))

    def nll(b, i):
        row = [float(logits[b, i, v]) for v in range(V)]
        log_z = math.log(sum(math.exp(x) for x in row))
        return log_z - row[int(ids[b, i])]

    per_seq, n_masked, n_real = [], 0, 0
    for b in range(B):
        total = 0.0
        for i in range(L):
            n_real += int(attention[b, i])
            if masked[b, i]:
                total += weight(float(t[b])) * nll(b, i)
                n_masked += 1
        per_seq.append(total)
    if normalizer == "token":
        return sum(per_seq) / n_real
    if normalizer == "masked":
        return sum(per_seq) / n_masked
    if normalizer == "maskable":
        return sum(per_seq) / sum(int(maskable[b, i]) for b in range(B) for i in range(L))
    ratios = []
    for b in range(B):
        answer = sum(int(maskable[b, i]) for i in range(L))
        if answer:
            ratios.append(per_seq[b] / answer)
    return sum(ratios) / len(ratios)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_loss_equals_hand_written_reference(normalizer, schedule):
    logits, ids, masked, maskable, attention, t = fixed_batch()
    expected = reference_loss(logits, ids, masked, maskable, attention, t, schedule, normalizer)
    dense = diffusion_loss(logits, ids, masked, t, schedule, normalizer, maskable, attention)
    sparse = diffusion_loss(logits[masked], ids, masked, t, schedule, normalizer, maskable,
                            attention)
    assert float(dense) == pytest.approx(expected, rel=1e-6)
    assert float(sparse) == pytest.approx(expected, rel=1e-6)


def test_token_normalizer_without_attention_mask_divides_by_all_positions():
    logits, ids, masked, maskable, attention, t = fixed_batch()
    with_all = reference_loss(logits, ids, masked, maskable, torch.ones_like(attention), t,
                              "linear", "token")
    assert float(diffusion_loss(logits, ids, masked, t, "linear", "token")) == pytest.approx(
        with_all, rel=1e-6)


def test_unknown_normalizer_is_a_config_error_listing_known_ones():
    logits, ids, masked, maskable, attention, t = fixed_batch()
    with pytest.raises(ConfigError, match=r"'answer'.*token, sequence, masked"):
        diffusion_loss(logits, ids, masked, t, "linear", "answer", maskable)


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_batch_with_nothing_masked_gives_finite_zero_loss_with_gradient(normalizer):
    model = tiny_bert()
    ids = torch.randint(5, VOCAB, (2, 8))
    nothing = torch.zeros_like(ids, dtype=torch.bool)
    loss, stats = diffusion_step(model, ids, nothing, None, "linear", "uniform", 1e-3, MASK_ID,
                                 normalizer)
    assert float(loss.detach()) == 0.0 and loss.grad_fn is not None
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)
    assert int(stats["num_masked"]) == 0 and float(stats["masked_fraction"]) == 0.0


def test_step_never_masks_prompt_or_padding_and_reports_stats():
    model = tiny_modernbert()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (4, 12), generator=g)
    attention = torch.ones_like(ids)
    attention[:, 10:] = 0
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, 6:] = True  # the last two of these are padding, so never targets
    loss, stats = diffusion_step(model, ids, answer, attention, "cosine", "antithetic", 0.5,
                                 MASK_ID, "sequence", generator=g)
    assert torch.isfinite(loss) and loss.grad_fn is not None
    assert 0 < int(stats["num_masked"]) <= 16
    assert float(stats["masked_fraction"]) == pytest.approx(int(stats["num_masked"]) / 16)
    assert 0.5 <= float(stats["mean_t"]) <= 1.0
    assert all(not v.requires_grad for v in stats.values())


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_sparse_step_equals_dense_step_with_or_without_the_sparse_wrapper(normalizer):
    model = tiny_bert()
    ids = torch.randint(5, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for net, sparse in ((model, True), (model, False), (SparseMaskedLM(model), True)):
        g = torch.Generator().manual_seed(7)
        loss, _ = diffusion_step(net, ids, None, None, "linear", "uniform", 1e-3, MASK_ID,
                                 normalizer, generator=g, sparse=sparse)
        losses.append(float(loss.detach()))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert losses[2] == pytest.approx(losses[0], rel=1e-6)


def test_padding_is_not_a_target_when_everything_is_maskable():
    model = tiny_bert()
    ids = torch.randint(5, VOCAB, (2, 10))
    attention = torch.ones_like(ids)
    attention[1, 4:] = 0
    g = torch.Generator().manual_seed(0)
    _, stats = diffusion_step(model, ids, None, attention, "linear", "uniform", 0.999, MASK_ID,
                              "token", generator=g)
    assert int(stats["num_masked"]) == 14  # t ~ 1 masks every real token and nothing else


def test_unknown_time_sampling_in_a_step_is_a_config_error():
    with pytest.raises(ConfigError, match="'random'"):
        diffusion_step(tiny_bert(), torch.ones(1, 4, dtype=torch.long), None, None, "linear",
                       "random", 1e-3, MASK_ID, "token")


def test_overfitting_one_batch_drives_the_loss_down():
    model = tiny_bert(seed=3)
    ids = torch.randint(5, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    batch = ids.repeat(16, 1)

    def held_out_loss():
        model.eval()
        with torch.no_grad():
            total = sum(float(diffusion_step(model, batch, None, None, "linear", "antithetic",
                                             1e-3, MASK_ID, "token",
                                             generator=torch.Generator().manual_seed(s))[0])
                        for s in range(4))
        model.train()
        return total / 4

    before = held_out_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss, _ = diffusion_step(model, batch, None, None, "linear", "antithetic", 1e-3, MASK_ID,
                                 "token", generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_loss()
    assert after < before / 10, (before, after)
