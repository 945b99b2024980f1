"""experiment=quickstart_smoke runs the whole chain; each stage's output feeds the next."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from ldm.tracking import find_runs, local_store_uri


@pytest.mark.slow
def test_quickstart_chain_runs_every_stage_and_each_consumes_the_previous_output(tmp_path):
    outputs = tmp_path / "outputs"
    proc = run_cli(["experiment=quickstart_smoke"], outputs, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = outputs / "data"
    assert (data / "shakespeare" / "minilm-wordpiece" / "ctx64" / "manifest.json").is_file()
    assert (data / "faq_and_tasks" / "minilm-wordpiece" / "ctx64" / "manifest.json").is_file()
    assert (data / "synthetic_tasks" / "minilm-wordpiece" / "ctx64" / "manifest.json").is_file()
    pretrain, sft = outputs / "models" / "quickstart-pretrain", outputs / "models" / "quickstart-sft"
    assert (pretrain / "model.safetensors").is_file() and (sft / "model.safetensors").is_file()
    # the SFT run started from the pretraining export, found by name
    sft_config = (sft / "ldm_config.yaml").read_text()
    assert f"init_from: {pretrain}" in sft_config
    results = outputs / "runs" / "evaluate" / "quickstart-eval" / "eval" / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(rows) == 8 and all("correct" in r and r["nfe"] >= 1 for r in rows)
    samples = outputs / "runs" / "sample" / "quickstart-sample" / "samples.jsonl"
    assert len(samples.read_text().splitlines()) == 3
    # the summary names the exports and the mlflow command
    assert "export:" in proc.stdout and "mlflow ui --backend-store-uri" in proc.stdout
    runs = find_runs(local_store_uri(outputs), "evaluate")
    assert runs and runs[0].data.params["checkpoint"] == str(sft)
