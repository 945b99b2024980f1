"""`lm_eval --model ldm` as a library: the adapter's three request types on a tiny random export.

Layer: unit, the adapter class in-process; one test runs Python to check the .pth registration
(its ELBO: test_benchmark_elbo.py; task=benchmark: test_benchmark_task.py).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from ldm.errors import ConfigError  # noqa: E402


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny random ModernBERT export with a chat template (no training: numbers, not quality)."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    from ldm.tokenizer import add_chat_template, train_bpe
    from ldm.export import write_export

    root = tmp_path_factory.mktemp("adapter")
    texts = ["the king spoke to the queen of the river and the stone in the night.",
             "a lord and a lady walked in the bright field; the user asked, it answered."] * 30
    tok = add_chat_template(train_bpe(texts, 320, root / "bpe"))
    torch.manual_seed(0)
    config = ModernBertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.cls_token_id,
        cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id)
    model = ModernBertForMaskedLM(config).eval()
    return write_export(model, tok, root / "chat", "model: tiny\n", {"run_name": "tiny"})


def make(export, **kw):
    from ldm.harness.adapter import LdmLM

    args = dict(pretrained=str(export), mc_num=4, batch_size=8, sampler="llada")
    args.update(kw)
    return LdmLM(**args)


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_is_greedy_is_true_exactly_for_what_greedy_decoding_produces(export):
    from ldm.harness.generation import generate_batch, sampler_settings
    from ldm.sampling.sampler import sampler_model

    lm = make(export)
    context = "the king spoke to the"
    ids = lm.encode(context)
    settings = sampler_settings("llada", {"temperature": 0.0, "early_stop": False},
                                max_new_tokens=3)
    (decoded,) = generate_batch(sampler_model(lm.model), lm.tok, [ids], settings,
                                mask_id=lm.mask_id, seed=0, device="cpu")
    other = [t for t in range(10, 300) if t not in decoded["tokens"]][:3]
    (_, hit), (_, miss) = lm.score_pairs([(ids, decoded["tokens"]), (ids, other)])
    assert hit is True and miss is False


def test_loglikelihood_of_text_requests_is_the_elbo_of_their_tokens(export):
    from ldm.harness.elbo import mc_elbo, model_logits_at

    lm = make(export, greedy=False)
    ((value, greedy),) = lm.loglikelihood([request("loglikelihood", "the king spoke", " to")])
    expected = mc_elbo(model_logits_at(lm.model), [(lm.encode("the king spoke"), lm.encode(" to"))],
                       mask_id=lm.mask_id, pad_id=lm.pad_id, mc_num=4, batch_size=8)[0]
    assert value == pytest.approx(expected) and value < 0 and greedy is False


def test_rolling_loglikelihood_sums_disjoint_windows_of_the_positions(export):
    lm = make(export, greedy=False, mc_num=2)
    text = " ".join(["the king spoke to the queen of the river"] * 12)  # > 63 tokens
    tokens = lm.encode(text)
    assert len(tokens) > 63
    (total,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    assert total < 0
    # windows of at most 63 predicted tokens (+ 1 of context = the 64 positions), disjoint
    assert lm.stats["loglikelihood_requests"] == -(-len(tokens) // 63)


def test_generate_until_cuts_stop_strings_and_counts_model_calls(export):
    lm = make(export, max_new_tokens=8, steps=8, block_length=8)
    free = lm.generate_until([request("generate_until", "the king", {"max_gen_toks": 8,
                                                                     "until": []})])[0]
    assert free, "a random model still fills the canvas with words"
    stop = free.split()[1] if len(free.split()) > 1 else free[-1]
    cut = lm.generate_until([request("generate_until", "the king", {"max_gen_toks": 8,
                                                                    "until": [stop]})])[0]
    assert cut == free[:free.find(stop)].strip()
    summary = lm.summary()
    assert summary["generate_requests"] == 2 and 1 <= summary["mean_nfe"] <= 8
    assert summary["tokens_per_second"] > 0


def test_requests_longer_than_the_positions_fail_before_the_weights_load(export):
    lm = make(export)
    long = " ".join(["the king spoke to the queen"] * 20)
    with pytest.raises(ConfigError, match="64 positions"):
        lm.loglikelihood([request("loglikelihood", long, " river")])
    assert lm._model is None


def test_bad_model_arguments_are_refused(export):
    with pytest.raises(ConfigError, match="mc_num=0"):
        make(export, mc_num=0)
    with pytest.raises(ConfigError, match="'stepz'"):
        make(export, stepz=3)
    with pytest.raises(ConfigError, match="sampler='quick'"):
        make(export, sampler="quick")


def _registered_target(site_dir, then: str = "") -> str:
    """Start a Python that processes only `site_dir`'s .pth files and runs `then`; return what
    lm-eval's registry then holds for "ldm" (start-up and the registry's import must not fail)."""
    import subprocess
    import sys
    from pathlib import Path

    import lm_eval

    packages = str(Path(lm_eval.__file__).resolve().parents[1])  # without running its .pth files
    code = ("import site, sys; sys.path.append(sys.argv[2]); site.addsitedir(sys.argv[1]); "
            f"from lm_eval.api import registry; {then or 'pass'}; "
            "print(registry.model_registry._objs.get('ldm'))")
    proc = subprocess.run([sys.executable, "-S", "-c", code, str(site_dir), packages],
                          capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])  # ldm importable without .pth
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_the_pth_registers_the_harness_adapter_and_an_older_one_breaks_nothing(tmp_path):
    from ldm.harness.plugin import PTH_NAME, TARGET, install, pth_line, registration_note

    assert TARGET == "ldm.harness.adapter:LdmLM"
    assert "not installed" in registration_note(tmp_path)
    # a .pth written before the adapter moved: start-up and lm-eval still load, and the task's
    # note says how to write it again
    (tmp_path / PTH_NAME).write_text(pth_line().replace(TARGET, "ldm.benchmark.adapter:LdmLM"))
    assert _registered_target(tmp_path) == "ldm.benchmark.adapter:LdmLM"
    # the adapter (task=benchmark imports it) replaces that entry instead of refusing to register
    assert _registered_target(tmp_path, "import ldm.harness.adapter") == \
        "<class 'ldm.harness.adapter.LdmLM'>"
    assert "older adapter" in registration_note(tmp_path)
    assert "python -m ldm.harness.plugin" in registration_note(tmp_path)
    install(tmp_path)
    assert registration_note(tmp_path) is None
    assert _registered_target(tmp_path) == TARGET


def test_every_sampler_preset_keeps_its_rule_cache_and_gamma_in_the_harness():
    """The harness builds its settings from the preset files: no field may be dropped on the way
    (a dropped `cache` silently ran fast_dual without its cache; a dropped `gamma` made
    entropy_bound unusable)."""
    from ldm.harness.generation import sampler_presets, sampler_settings
    from ldm.config import load_preset

    for name in sampler_presets():
        preset, settings = load_preset(name), sampler_settings(name)
        for field in ("rule", "cache", "gamma", "threshold", "remasking"):
            if field in preset:
                assert getattr(settings, field) == preset[field], (name, field)
