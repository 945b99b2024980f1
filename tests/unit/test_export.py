"""The export contract: what write_export writes, read_export gives back; the sampler settings a
task builds once, before any work.

Layer: unit, the export contract in-process; one test runs `run.py task=sft` as a process.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from ldm.errors import ConfigError
from ldm.export import read_export, write_export
from ldm.hub import is_local
from ldm.sampling import SamplerSettings
from ldm.tokenizer import train_bpe

TEXTS = ["the king spoke to the queen of the river and the stone in the night."] * 40
RUN_CONFIG = {"model": {"name": "tiny", "dtype": "float32", "attn_implementation": "eager",
                        "trust_remote_code": False, "tokenizer_name": "bpe300"},
              "context": {"name": "ctx64", "length": 64},
              "dataset": {"name": "local_text", "kind": "text"}}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny BERT export written through write_export."""
    from transformers import BertConfig, BertForMaskedLM

    root = tmp_path_factory.mktemp("export")
    tok = train_bpe(TEXTS, 300, root / "bpe")
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64,
                                       max_position_embeddings=96))
    info = {"run_name": "tiny", "step": 3, "data": "/data/local_text/bpe300/ctx64",
            "fingerprint": "abc123", "dataset": "local_text", "context": "ctx64"}
    return write_export(model, tok, root / "tiny", RUN_CONFIG, info), tok


def test_read_export_gives_back_what_write_export_wrote(export):
    folder, tok = export
    got = read_export(str(folder))
    assert not got.hub and got.from_ldm and got.where == str(folder.resolve())
    assert (got.mask_id, got.eos_id) == (tok.mask_token_id, tok.eos_token_id)
    assert got.max_positions == 96
    assert got.group("context") == {"name": "ctx64", "length": 64}
    assert got.load_settings == {"dtype": "float32", "attn_implementation": "eager",
                                 "trust_remote_code": False}
    assert got.data == {"data": "/data/local_text/bpe300/ctx64", "fingerprint": "abc123",
                        "dataset": "local_text", "context": "ctx64"}
    assert got.info["step"] == 3 and got.info["format"] == 1
    assert len(got.load_tokenizer()) == len(tok)
    model = got.load_model(vocab_size=len(tok))
    assert not model.training and model.config._attn_implementation == "eager"


def test_a_pytorch_bin_export_is_no_longer_accepted(export, tmp_path):
    folder, _ = export
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in folder.iterdir():
        if f.name != "model.safetensors":
            (legacy / f.name).write_bytes(f.read_bytes())
    (legacy / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match="no model weights \\(model.safetensors\\)"):
        read_export(str(legacy))


def test_one_rule_tells_an_export_from_a_hub_id(export, tmp_path):
    folder, _ = export
    assert is_local(str(folder)) and not is_local("org/model") and not is_local(str(tmp_path / "x"))


def test_a_damaged_ldm_config_is_one_error_naming_the_file(export, tmp_path):
    from ldm.errors import LdmError

    folder, _ = export
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folder.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "ldm_config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(LdmError, match="ldm_config.yaml is not valid YAML"):
        read_export(str(broken))
    json.loads((broken / "ldm_export.json").read_text())  # the rest is intact


def test_sampler_settings_are_frozen_and_validated_when_built():
    settings = SamplerSettings(max_new_tokens=32, steps=16, block_length=8, max_positions=40)
    assert (settings.num_blocks, settings.block_steps, settings.prompt_budget) == (4, 4, 8)
    with pytest.raises(Exception):
        settings.steps = 8  # frozen: one object, the same for every caller
    with pytest.raises(ConfigError, match="block_length=24 must be >= 1 and divide"):
        SamplerSettings(max_new_tokens=64, steps=64, block_length=24)
    with pytest.raises(ConfigError, match="prompt length 9 .* max_positions=40"):
        settings.check_prompt(9)
    with pytest.raises(ConfigError, match="sampler.bogus is not a sampler setting"):
        SamplerSettings.from_config({"name": "x", "bogus": 1})


def test_sft_refuses_bad_sampler_settings_before_training_starts(tmp_path):
    proc = run_cli(["task=sft", "dataset=synthetic_tasks", "sampler.max_new_tokens=64",
                    "sampler.block_length=24", "tracking=off"], tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "sampler.block_length=24" in lines[0]
    assert not list(tmp_path.glob("runs/sft/*/checkpoints")) and not (tmp_path / "models").exists()


def test_the_library_states_the_problem_and_the_task_adds_the_hint(tmp_path):
    from ldm.tasks.checkpoints import resolve_checkpoint

    with pytest.raises(ConfigError) as plain:
        read_export(str(tmp_path / "absent"))
    assert "does not exist" in str(plain.value) and "outputs/models" not in str(plain.value)
    with pytest.raises(ConfigError) as hinted:
        resolve_checkpoint(str(tmp_path / "absent"), "sample")
    assert str(hinted.value).endswith("; pass an export folder from outputs/models/ or a hub id")
    assert str(hinted.value).count("\n") == 0
