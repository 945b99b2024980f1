"""padding=batch and length-grouped batches: EOS padding per batch (visible, maskable, trained as
in LLaDA's SFT), a seeded resumable bucketing plan, gradient_accumulation_steps=auto, and the rule
between task.max_steps and task.epochs."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import compose_config
from ldm.errors import ConfigError
from ldm.tasks.launch import resolve_schedule, schedule_source
from ldm.train.data import BatchPlan, chat_collate, eos_widths, resolve_accumulation

PAD, EOS = 0, 2


def chat_rows(prompts, answers):
    """Rows as stored unpadded: prompt (mask 0) + answer and its closing EOS (mask 1)."""
    ids, masks = [], []
    for p, a in zip(prompts, answers):
        ids.append(np.array([5] * p + [7] * a + [EOS], dtype=np.uint32))
        masks.append(np.array([0] * p + [1] * (a + 1), dtype=np.uint8))
    return {"input_ids": ids, "answer_mask": masks,
            "length": np.array([len(r) for r in ids], dtype=np.uint32)}


def test_batch_padding_fills_each_row_with_visible_maskable_eos_to_the_rounded_longest_row():
    rows = chat_rows([3, 2, 4], [2, 5, 1])  # lengths 6, 8, 6
    batch = chat_collate(PAD, EOS, multiple=4)(rows, "cpu")
    ids, maskable, answer = batch["input_ids"], batch["maskable"], batch["answer"]
    assert ids.shape == (3, 8)  # longest row 8, already a multiple of 4
    assert batch["attention_mask"] is None  # every position a real token: EOS is visible
    assert ids[0, 6:].tolist() == [EOS, EOS] and maskable[0, 6:].all()
    # the answer proper (what answer tokens/s and the answer NELBO count) leaves the fill out
    assert answer[0].tolist() == [False] * 3 + [True] * 3 + [False] * 2
    assert answer.sum().item() == sum(int(m.sum()) for m in rows["answer_mask"])
    # prompt tokens are never maskable
    assert not maskable[1, :2].any() and not maskable[2, :4].any()
    wider = chat_collate(PAD, EOS, multiple=5)(rows, "cpu")
    assert wider["input_ids"].shape == (3, 10)


def test_batch_padding_gives_the_longest_row_the_least_answer_area_within_the_context():
    rows = chat_rows([10, 2], [3, 2])  # the longest row's answer starts at 10 and is 4 long
    batch = chat_collate(PAD, EOS, min_answer=8, limit=16)(rows, "cpu")
    assert batch["input_ids"].shape[1] == 16  # 10 + 8 = 18, capped at the context (16)
    batch = chat_collate(PAD, EOS, min_answer=5, limit=64)(rows, "cpu")
    assert batch["input_ids"].shape[1] == 15 and batch["input_ids"][0, 14].item() == EOS
    widths = eos_widths(np.array([14, 5]), rows["answer_mask"], 1, 5, 64)
    assert widths.tolist() == [15, 7]


def test_heldout_batches_pad_each_row_to_its_own_width_so_a_row_does_not_depend_on_its_partners():
    rows = chat_rows([3, 2, 9], [2, 1, 6])
    collate = chat_collate(PAD, EOS, multiple=4, per_row=True)
    alone = collate({k: v[:1] for k, v in rows.items()}, "cpu")
    together = collate(rows, "cpu")
    width = alone["input_ids"].shape[1]
    assert width == 8  # 6 rounded up to 4's multiple
    assert together["input_ids"][0, :width].tolist() == alone["input_ids"][0].tolist()
    assert together["maskable"][0, :width].tolist() == alone["maskable"][0].tolist()
    # beyond its own width a row holds attention-masked PAD, never a target
    assert together["attention_mask"][0, width:].sum() == 0
    assert not together["maskable"][0, width:].any()
    assert (together["input_ids"][0, width:] == PAD).all()


def test_dynamic_padding_still_fills_with_attention_masked_pad_that_is_never_a_target():
    rows = chat_rows([3, 2], [2, 5])
    batch = chat_collate(PAD)(rows, "cpu")
    assert batch["input_ids"][0, 6:].tolist() == [PAD, PAD]
    assert batch["attention_mask"][0].tolist() == [1] * 6 + [0] * 2
    assert not batch["maskable"][0, 6:].any()


def long_tailed_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=4.5, sigma=0.8, size=n), 20, 1000).astype(np.int64)


def grouped_plan(n=1000, seed=3, global_batch=16, micro=4, accumulation=2, processes=2,
                 lengths=None, **kw):
    lengths = long_tailed_lengths(n) if lengths is None else lengths
    return BatchPlan(n, seed, global_batch, micro, accumulation, processes, lengths=lengths, **kw)


def test_a_grouped_epoch_reads_every_row_at_most_once_and_all_but_fewer_than_a_batch():
    plan = grouped_plan()
    per_epoch = plan.batches_per_epoch()
    assert per_epoch == 1000 // 16
    for epoch in range(2):
        seen = np.concatenate([plan.grouped_batch(epoch * per_epoch + s) for s in range(per_epoch)])
        assert len(np.unique(seen)) == len(seen) == per_epoch * 16
    first = {int(r) for s in range(per_epoch) for r in plan.grouped_batch(s)}
    second = {int(r) for s in range(per_epoch, 2 * per_epoch) for r in plan.grouped_batch(s)}
    assert first != second  # the rows left over differ from epoch to epoch


def test_processes_and_micro_batches_split_each_grouped_batch_without_overlap():
    plan = grouped_plan()
    for step in (0, 7, 70):
        parts = [plan.indices(step, m, r) for m in range(2) for r in range(2)]
        joined = np.concatenate(parts)
        assert sorted(joined.tolist()) == sorted(plan.grouped_batch(step).tolist())
        assert len(set(joined.tolist())) == 16


def test_the_grouped_plan_is_a_pure_function_of_seed_and_step_so_a_resumed_run_reads_the_same():
    a, b = grouped_plan(), grouped_plan()
    order = [a.indices(s, m, r).tolist() for s in range(0, 130) for m in range(2) for r in range(2)]
    # a fresh plan asked from step 97 on (a resumed run) reads what the first read there
    resumed = [b.indices(s, m, r).tolist() for s in range(97, 130) for m in range(2) for r in range(2)]
    assert resumed == order[97 * 4:]
    assert grouped_plan(seed=4).indices(5, 0, 0).tolist() != a.indices(5, 0, 0).tolist()


def test_grouped_batches_hold_similar_lengths_and_the_first_holds_the_longest_row():
    lengths = long_tailed_lengths(2000, seed=1)
    plan = grouped_plan(n=2000, lengths=lengths)
    plain = BatchPlan(2000, 3, 16, 4, 2, 2)
    assert lengths[plan.grouped_batch(0)].max() == lengths.max()

    def padding(batches):
        widths = np.array([lengths[b].max() for b in batches])
        return 1 - sum(lengths[b].sum() for b in batches) / (16 * widths.sum())

    steps = range(plan.batches_per_epoch())
    grouped = padding([plan.grouped_batch(s) for s in steps])
    shuffled = padding([np.concatenate([plain.indices(s, m, r) for m in range(2) for r in range(2)])
                        for s in steps])
    assert shuffled > 0.5 and grouped < 0.1, (grouped, shuffled)
    # bucket order is shuffled: the batch lengths do not simply fall step after step
    tops = [lengths[plan.grouped_batch(s)].max() for s in steps]
    assert tops != sorted(tops, reverse=True)


def test_grouping_needs_at_least_one_global_batch_of_rows():
    with pytest.raises(ConfigError, match="task.group_by_length"):
        BatchPlan(10, 0, 16, 16, 1, 1, lengths=np.arange(10))


def test_gradient_accumulation_auto_is_the_global_batch_over_micro_batch_and_processes():
    assert resolve_accumulation("auto", 384, 48, 8) == 1
    assert resolve_accumulation("auto", 384, 48, 2) == 4
    assert resolve_accumulation("auto", 2, 1, 1) == 2
    assert resolve_accumulation(3, 24, 8, 1) == 3
    with pytest.raises(ConfigError, match=r"global_batch_size=384 .*micro_batch_size=48 x 3"):
        resolve_accumulation("auto", 384, 48, 3)
    with pytest.raises(ConfigError, match="accepted: an integer >= 1 or auto"):
        resolve_accumulation("some", 8, 8, 1)


def schedule(max_steps, epochs):
    return OmegaConf.create({"task": {"max_steps": max_steps, "epochs": epochs,
                                      "global_batch_size": 8, "warmup_ratio": None,
                                      "warmup_steps": 0}})


def test_an_explicit_max_steps_wins_over_the_recipes_epochs_and_says_so(caplog):
    cfg = schedule(2, 10.0)
    resolve_schedule(cfg, 1000, given={"task.max_steps"})
    assert cfg.task.max_steps == 2
    assert "task.max_steps=2 given on the command line wins over task.epochs=10" in caplog.text
    cfg = schedule(None, 10.0)
    resolve_schedule(cfg, 1000, given=set())
    assert cfg.task.max_steps == 1250
    cfg = schedule(1000, 2.0)
    resolve_schedule(cfg, 1000, given={"task.epochs"})
    assert cfg.task.max_steps == 250


@pytest.mark.parametrize("given", [set(), {"task.max_steps", "task.epochs"}])
def test_max_steps_and_epochs_both_set_with_neither_or_both_given_is_an_error_naming_both(given):
    with pytest.raises(ConfigError, match=r"task.max_steps=1000 and task.epochs=3 are both set"):
        schedule_source(schedule(1000, 3.0), given)


def test_max_steps_null_without_epochs_is_refused():
    with pytest.raises(ConfigError, match="task.max_steps=null needs task.epochs"):
        schedule_source(schedule(None, None), set())


def test_the_chat_recipes_default_to_batch_padding_and_the_epoch_recipe_leaves_steps_to_epochs():
    for overrides in (["task=sft", "dataset=local_chat"], ["task=sft", "dataset=hf_chat"],
                      ["experiment=seed_alpaca_sft"], ["experiment=bert_chat_large"],
                      ["experiment=bert_chat_base"]):
        cfg = compose_config(overrides)
        assert cfg.dataset.padding == "batch", overrides
        assert cfg.task.get("group_by_length") is None  # null: on for batch padding
    large = compose_config(["experiment=bert_chat_large"])
    assert large.task.max_steps is None and large.task.epochs == 10
    assert large.hardware.gradient_accumulation_steps == "auto"
    assert schedule_source(large, set()) == "epochs"
    smoke = compose_config(["experiment=bert_chat_large", "task.max_steps=2"])
    assert schedule_source(smoke, {"task.max_steps"}) == "max_steps"
    assert compose_config(["task=sft", "dataset=construction_faq"]).dataset.padding == "eos"


def test_the_maskable_normalizer_is_dllms_mdlm_loss_computed_from_its_formula():
    """dLLM's MDLM trainer (loss_norm_type "token"): sum over masked positions of CE / t, divided
    by the micro-batch's positions whose label is not -100 (answers and padding) -- written out
    here from that formula, beside ldm's diffusion_loss on the same batch."""
    import torch
    import torch.nn.functional as F

    from ldm.train.objective import diffusion_loss

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (3, 10), generator=gen)
    maskable = torch.zeros(3, 10, dtype=torch.bool)
    maskable[0, 2:], maskable[1, 7:], maskable[2, 4:] = True, True, True  # answers of 8, 3, 6
    masked = maskable & (torch.rand(3, 10, generator=gen) < 0.6)
    t = torch.tensor([0.3, 0.8, 0.55])
    logits = torch.randn(3, 10, 50, generator=gen)

    ce = F.cross_entropy(logits.reshape(-1, 50), ids.reshape(-1), reduction="none").reshape(3, 10)
    dllm = (ce * masked / t[:, None]).sum() / maskable.sum().clamp(min=1)
    ours = diffusion_loss(logits, ids, masked, t, "linear", "maskable", maskable)
    assert torch.allclose(ours, dllm, rtol=1e-5)
    # LLaDA's SFT normalisation (each answer by its own length) is another number on this batch
    llada = ((ce * masked / t[:, None]).sum(1) / maskable.sum(1)).mean()
    sequence = diffusion_loss(logits, ids, masked, t, "linear", "sequence", maskable)
    assert torch.allclose(sequence, llada, rtol=1e-5) and not torch.allclose(sequence, ours)
