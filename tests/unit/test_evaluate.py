"""Held-out evaluation is deterministic and measures what it claims.

Layer: unit, the scoring functions in-process (task=evaluate via run.py: test_evaluate_task.py).
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from ldm.scoring import heldout_nelbo, t_grid


def _model():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    return BertForMaskedLM(cfg).eval()


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(5, 50, (4, 16), generator=gen), "maskable": None,
             "attention_mask": None} for _ in range(2)]


def test_heldout_nelbo_is_the_same_number_twice_and_changes_with_the_seed():
    model, batches = _model(), _batches()
    kwargs = dict(schedule="linear", eps=1e-3, grid_points=4, mask_id=4)
    first = heldout_nelbo(model, batches, seed=0, **kwargs)
    again = heldout_nelbo(model, batches, seed=0, **kwargs)
    other = heldout_nelbo(model, batches, seed=1, **kwargs)
    assert first == again
    assert first["nelbo"] != other["nelbo"]
    assert set(k for k in first if k.startswith("acc_t")) == {
        "acc_t0.00-0.25", "acc_t0.25-0.50", "acc_t0.50-0.75", "acc_t0.75-1.00"}


def test_t_grid_is_the_midpoints_of_equal_bins_of_eps_to_one():
    grid = t_grid(4, 0.2)
    assert torch.allclose(grid, torch.tensor([0.3, 0.5, 0.7, 0.9], dtype=torch.float64))


def test_nelbo_of_a_uniform_predictor_is_log_vocab():
    # a model whose logits are all equal predicts every token with probability 1/V, so
    # E_t[w(t) * t * L * log V] / L = log V under the linear schedule (w = 1/t, E[masked] = tL)
    from ldm.model import SparseMaskedLM

    class UniformSparse(SparseMaskedLM):
        def forward(self, input_ids, attention_mask, positions_mask):
            return torch.zeros(int(positions_mask.sum()), 50)

    batches = [{"input_ids": torch.full((64, 32), 7), "maskable": None, "attention_mask": None}]
    result = heldout_nelbo(UniformSparse(torch.nn.Identity()), batches, schedule="linear",
                           eps=1e-3, grid_points=8, mask_id=4, seed=0)
    assert abs(result["nelbo"] - torch.log(torch.tensor(50.0)).item()) < 0.05


def test_the_nelbo_of_a_row_does_not_depend_on_the_batch_it_is_in():
    model = _model()
    rows = torch.cat([b["input_ids"] for b in _batches()])  # 8 rows
    kwargs = dict(schedule="linear", eps=1e-3, grid_points=4, mask_id=4, seed=3, samples=2)

    def split(size):
        return [{"input_ids": rows[i:i + size], "maskable": None, "attention_mask": None}
                for i in range(0, len(rows), size)]

    whole, pairs, threes = (heldout_nelbo(model, split(n), **kwargs) for n in (8, 2, 3))
    assert whole["nelbo"] == pytest.approx(pairs["nelbo"], rel=1e-6)
    assert whole["nelbo"] == pytest.approx(threes["nelbo"], rel=1e-6)


def test_stratified_t_estimates_the_bound_without_the_bias_of_a_fixed_grid():
    # A model whose loss per masked token is (masked fraction)^2: under the linear schedule the
    # negative ELBO is the integral of t^2 over [0, 1] = 1/3. One fixed t (the midpoint) would
    # report 0.25 however many rows there are; one stratified draw per row averages to 1/3.
    from ldm.model import SparseMaskedLM

    vocab, width = 50, 64

    class FractionSquared(SparseMaskedLM):
        def forward(self, input_ids, attention_mask, positions_mask):
            per_row = positions_mask.sum(1).double()
            loss = (per_row / width) ** 2  # the cross-entropy each masked token should get
            rows = positions_mask.nonzero()[:, 0]
            other = torch.log(torch.expm1(loss[rows]).clamp(min=1e-30) / (vocab - 1))
            logits = other[:, None].expand(-1, vocab).clone()
            logits[:, 7] = 0.0
            return logits.float()

    batches = [{"input_ids": torch.full((128, width), 7), "maskable": None,
                "attention_mask": None} for _ in range(4)]
    result = heldout_nelbo(FractionSquared(torch.nn.Identity()), batches, schedule="linear",
                           eps=1e-3, grid_points=1, mask_id=4, seed=0)
    assert abs(result["nelbo"] - 1 / 3) < 0.03, result["nelbo"]


def test_answer_nelbo_counts_the_answer_and_its_eos_but_not_the_eos_padding():
    # A model sure of EOS everywhere: padding costs nothing, each of the 4 answer words costs
    # about 20 nats. Over all 16 maskable positions that is 4 * 20 / 16 = 5 per token, the
    # padded number; over the 5 real answer tokens (4 words + their EOS) 4 * 20 / 5 = 16.
    import numpy as np

    from ldm.model import SparseMaskedLM
    from ldm.train.data import chat_collate

    EOS = 3

    class SureOfEos(SparseMaskedLM):
        def forward(self, input_ids, attention_mask, positions_mask):
            logits = torch.zeros(int(positions_mask.sum()), 50)
            logits[:, EOS] = 20.0
            return logits

    ids = np.array([[20, 21, 22, 23] + [EOS] * 12] * 64, dtype=np.uint16)
    rows = {"input_ids": ids, "answer_mask": np.ones_like(ids, dtype=np.uint8),
            "length": np.full(64, 5, dtype=np.uint32)}
    batch = chat_collate(pad_id=0)(rows, "cpu")
    assert int(batch["answer"].sum()) == 64 * 5 and int(batch["maskable"].sum()) == 64 * 16
    result = heldout_nelbo(SureOfEos(torch.nn.Identity()), [batch], schedule="linear", eps=1e-3,
                           grid_points=8, mask_id=4, seed=0)
    assert abs(result["nelbo"] - 5.0) < 0.5
    assert abs(result["answer_nelbo"] - 16.0) < 1.6
    assert result["answer_tokens"] == 64 * 5 and result["maskable_tokens"] == 64 * 16
