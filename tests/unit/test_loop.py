"""The loop's pieces: learning-rate schedule, weight-decay groups, data order, batch layout."""

from __future__ import annotations


import numpy as np
import pytest
from transformers import BertConfig, BertForMaskedLM

from ldm.errors import ConfigError
from ldm.train.data import BatchPlan, check_batch_layout
from ldm.train.loop import lr_factor, param_groups


def test_warmup_is_linear_then_cosine_decays_to_the_floor():
    f = lr_factor("cosine", warmup=10, total=110, min_ratio=0.1)
    assert [round(f(s), 3) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_schedule_depends_on_optimizer_steps_only_not_on_process_count():
    # the loop steps the scheduler once per optimizer step on every process, so the lr at a
    # given step is the same whether 1 or 8 processes share the global batch
    f = lr_factor("linear", warmup=5, total=50, min_ratio=0.0)
    assert [f(s) for s in range(50)] == [lr_factor("linear", 5, 50, 0.0)(s) for s in range(50)]
    assert f(27) == pytest.approx(1 - 22 / 45)
    assert lr_factor("constant", 0, 50, 0.0)(40) == 1.0


def test_unknown_lr_schedule_is_refused():
    with pytest.raises(ConfigError, match="task.lr_schedule='warm'"):
        lr_factor("warm", 0, 10, 0.0)


def test_norms_biases_and_embeddings_get_no_weight_decay():
    model = BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32))
    decay, plain = param_groups(model, 0.01, ["bias", "norm", "embeddings"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("bias" not in names[id(p)] and "LayerNorm" not in names[id(p)] and
               "embeddings" not in names[id(p)] for p in decay["params"])
    assert any("LayerNorm" in names[id(p)] for p in plain["params"])
    assert decay["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0


def test_data_order_is_a_function_of_seed_and_step_and_covers_each_epoch_once():
    plan = BatchPlan(num_rows=10, seed=3, global_batch=4, micro_batch=2, accumulation=2, processes=1)
    again = BatchPlan(num_rows=10, seed=3, global_batch=4, micro_batch=2, accumulation=2, processes=1)
    rows = np.concatenate([plan.indices(s, m, 0) for s in range(5) for m in range(2)])
    assert rows.tolist() == np.concatenate([again.indices(s, m, 0) for s in range(5)
                                            for m in range(2)]).tolist()
    assert sorted(rows[:10].tolist()) == list(range(10)) == sorted(rows[10:].tolist())
    assert rows[:10].tolist() != rows[10:].tolist(), "each epoch has its own order"


def test_ranks_read_disjoint_rows_whose_union_is_the_single_process_batch():
    one = BatchPlan(100, 0, global_batch=8, micro_batch=4, accumulation=2, processes=1)
    two = BatchPlan(100, 0, global_batch=8, micro_batch=4, accumulation=1, processes=2)
    for step in range(20):
        single = set(one.indices(step, 0, 0)) | set(one.indices(step, 1, 0))
        r0, r1 = set(two.indices(step, 0, 0)), set(two.indices(step, 0, 1))
        assert not r0 & r1 and r0 | r1 == single


def test_batch_numbers_that_disagree_name_every_number():
    with pytest.raises(ConfigError) as err:
        check_batch_layout(global_batch=256, micro_batch=32, accumulation=2, processes=2)
    message = str(err.value)
    for needle in ("task.global_batch_size=256", "micro_batch_size=32",
                   "gradient_accumulation_steps=2", "2 process(es) = 128"):
        assert needle in message
