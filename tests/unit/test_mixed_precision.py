"""fp16 through a real GradScaler, skipped steps and the lr schedule, DeepSpeed's refusals,
fp32 buffers and exports, FSDP's gradient precision: what a first GPU run relies on, on CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForMaskedLM

from ldm.errors import ConfigError
from ldm.train.data import packed_collate
from ldm.train.distributed import (check_deepspeed, fp32_reduce_policy, fp32_state_dict,
                                   keep_fp32_buffers)
from ldm.train.loop import lr_factor, train
from ldm.train.settings import LoopConfig

STEPS, OVERFLOW_AT = 6, (2, 3)  # 1-based optimizer steps whose gradients are made infinite


class Recorder:
    """A tracker that keeps what the loop logs (mlflow's place in a real run)."""

    def __init__(self):
        self.metrics = []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def last(self, name):
        return [m[name] for _, m in self.metrics if name in m][-1]


def _tiny_bert(seed=0):
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=32,
                                      max_position_embeddings=32))


def _rows():
    return Dataset.from_dict({"input_ids": np.random.default_rng(0).integers(2, 40, (16, 16)).tolist()})


def _fp16_accelerator(monkeypatch, cfg):
    """An Accelerator set up as accelerate sets up fp16 on a GPU, with a real GradScaler on CPU."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=cfg.accumulation,
                              step_scheduler_with_optimizer=False)
    # accelerate makes the scaler only for a GPU; the same object on CPU takes the same path
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    accelerator.native_amp = True
    monkeypatch.setattr(type(accelerator), "mixed_precision", property(lambda self: "fp16"))
    return accelerator


def _inject_overflows(model, steps):
    """Make the gradients infinite on the given (1-based) backward passes, as an fp16 overflow."""
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] in steps else grad

    model.bert.embeddings.word_embeddings.weight.register_hook(hook)


def _train_fp16(monkeypatch, tmp_path, skip_nonfinite):
    cfg = LoopConfig(max_steps=STEPS, global_batch_size=2, micro_batch_size=2, accumulation=1,
                     mask_id=1, lr=1e-3, lr_schedule="linear", warmup_steps=0, progress=False,
                     skip_nonfinite=skip_nonfinite, log_every=1)
    accelerator = _fp16_accelerator(monkeypatch, cfg)
    model = _tiny_bert()
    _inject_overflows(model, OVERFLOW_AT)
    tracker = Recorder()
    final = train(model, None, _rows(), None, packed_collate, cfg, accelerator=accelerator,
                  run_dir=tmp_path / "run", tracker=tracker, export=lambda mlm, step: None)
    saved = json.loads((tmp_path / "run" / "checkpoints" / f"step-{STEPS:07d}" /
                        "trainer_state.json").read_text())
    return accelerator, final, tracker, saved


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_fp16_overflows_are_skipped_by_the_scaler_counted_and_do_not_advance_the_lr(
        monkeypatch, tmp_path, skip_nonfinite):
    accelerator, final, tracker, saved = _train_fp16(monkeypatch, tmp_path, skip_nonfinite)
    scaler = accelerator.scaler
    # two overflows: the scale was halved twice (growth needs 2000 clean steps)
    assert scaler.get_scale() == 2.0 ** 10 * 0.5 ** len(OVERFLOW_AT)
    assert final["scaler_skipped_steps"] == len(OVERFLOW_AT) and final["skipped_steps"] == 0
    assert tracker.last("scaler_skipped_steps") == len(OVERFLOW_AT), "counted in mlflow"
    # the lr schedule advanced once per applied update only, and that survives a resume
    updates = STEPS - len(OVERFLOW_AT)
    assert saved["scheduler_steps"] == updates and saved["scaler_skipped_steps"] == len(OVERFLOW_AT)
    assert tracker.last("lr") == pytest.approx(1e-3 * lr_factor("linear", 0, STEPS, 0.0)(updates))
    assert (tmp_path / "run" / "checkpoints" / f"step-{STEPS:07d}" / "scaler.pt").is_file()


def test_fp16_overflow_step_leaves_the_weights_unchanged(monkeypatch, tmp_path):
    cfg = LoopConfig(max_steps=1, global_batch_size=2, micro_batch_size=2, accumulation=1,
                     mask_id=1, lr=1e-3, lr_schedule="constant", warmup_steps=0, progress=False)
    accelerator = _fp16_accelerator(monkeypatch, cfg)
    model = _tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _inject_overflows(model, (1,))
    final = train(model, None, _rows(), None, packed_collate, cfg, accelerator=accelerator,
                  run_dir=tmp_path / "run", tracker=Recorder(), export=lambda mlm, step: None)
    assert final["scaler_skipped_steps"] == 1
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


def test_skipped_nonfinite_step_does_not_advance_the_lr_schedule(tmp_path):
    from accelerate import Accelerator

    cfg = LoopConfig(max_steps=4, global_batch_size=2, micro_batch_size=2, accumulation=1,
                     mask_id=1, lr=1e-3, lr_schedule="linear", warmup_steps=0, progress=False,
                     skip_nonfinite=True, log_every=1)
    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    model = _tiny_bert()
    _inject_overflows(model, (2,))  # no scaler: a non-finite gradient norm, skipped
    tracker = Recorder()
    final = train(model, None, _rows(), None, packed_collate, cfg, accelerator=accelerator,
                  run_dir=tmp_path / "run", tracker=tracker, export=lambda mlm, step: None)
    assert final["skipped_steps"] == 1 and final["scheduler_steps"] == 3
    assert tracker.last("lr") == pytest.approx(1e-3 * lr_factor("linear", 0, 4, 0.0)(3))


def test_skip_nonfinite_under_deepspeed_is_refused_in_one_line():
    with pytest.raises(ConfigError) as err:
        check_deepspeed("DEEPSPEED", skip_nonfinite=True)
    assert "task.skip_nonfinite=true" in str(err.value) and "\n" not in str(err.value)
    check_deepspeed("DEEPSPEED", skip_nonfinite=False)
    check_deepspeed("MULTI_GPU", skip_nonfinite=True)


def _tiny_modernbert():
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    torch.manual_seed(0)
    return ModernBertForMaskedLM(ModernBertConfig(
        vocab_size=64, pad_token_id=0, eos_token_id=1, bos_token_id=2, cls_token_id=2,
        sep_token_id=1, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=64, global_attn_every_n_layers=3, local_attention=16,
        max_position_embeddings=1024))


def test_rotary_buffers_stay_fp32_when_an_engine_casts_the_model_to_bf16():
    model = _tiny_modernbert()
    rotary = {n: b.clone() for n, b in model.named_buffers() if "inv_freq" in n}
    assert rotary, "ModernBERT keeps its rotary frequencies as buffers"
    with keep_fp32_buffers(model):
        model.to(torch.bfloat16)  # what DeepSpeed's bf16 mode does to the whole module
    for name, buf in model.named_buffers():
        if name in rotary:
            assert buf.dtype == torch.float32, name
            torch.testing.assert_close(buf, rotary[name], rtol=0, atol=0)
    assert model.model.embeddings.tok_embeddings.weight.dtype == torch.bfloat16
    # what the bf16 copy would have cost: the angle at position 1023 of the slowest rotation
    freq = rotary["model.rotary_emb.full_attention_inv_freq"]
    error = (1023 * (freq.to(torch.bfloat16).float() - freq)).abs().max()
    assert error > 0.01, "a bf16 inv_freq misplaces late positions (radians)"


def test_deepspeed_export_takes_the_fp32_masters_under_every_tied_name():
    model = _tiny_bert()
    masters = {id(p): p.detach().clone().double().float() + 1e-4 for p in model.parameters()}
    model.to(torch.bfloat16)  # the engine's module copy
    weights = fp32_state_dict(model, lambda p: masters[id(p)])
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    emb = weights["bert.embeddings.word_embeddings.weight"]
    assert weights["cls.predictions.decoder.weight"] is emb, "tied decoder keeps the master"
    assert torch.equal(emb, masters[id(model.bert.embeddings.word_embeddings.weight)])
    assert set(weights) == set(model.state_dict())


def test_fsdp_bf16_policy_reduces_gradients_in_fp32():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16,
                                  output_dtype=torch.bfloat16)
    fixed = fp32_reduce_policy(policy)
    assert fixed.reduce_dtype == torch.float32
    assert fixed.param_dtype == torch.bfloat16 and fixed.output_dtype == torch.bfloat16
    assert fp32_reduce_policy(None) is None
