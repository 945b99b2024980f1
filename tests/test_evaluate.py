"""Held-out evaluation is deterministic and measures what it claims."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM

from ldm.evaluate import heldout_nelbo, t_grid


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
