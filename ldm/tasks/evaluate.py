"""task=evaluate: the held-out NELBO of an export and, on chat data, its answers scored.

    python run.py task=evaluate checkpoint=outputs/models/<run> [dataset=<name>] \
        [sampler=fast sampler.max_new_tokens=32 ...]

The export brings its model, context and masking, and the dataset it was trained on (unless
`dataset=` names another); the prepared data is found by name (dataset, the model's tokenizer,
context) as in training. On its
test split: the negative ELBO per maskable token and its perplexity bound, deterministic (rows
from the start of the split, `task.t_grid` fixed t values, `task.mc_samples` seeded masks each),
and the masked-token accuracy by t bucket. On chat data, the first `task.max_examples` held-out
prompts are answered with the configured sampler and scored: exact match with the synthetic
checker for dataset=synthetic_tasks (overall and per task type), SQuAD token F1 against the
reference answer otherwise (`task.answers_from_end=true`: the last ones). Per-example results go to <run dir>/eval/results.jsonl and mlflow.

The metric returned (tag `ldm.headline_metric`): exact_match (higher is better) on synthetic
tasks, f1 (higher is better) on other chat data, nelbo (lower is better) on text data and on
chat data evaluated without answers (task.max_examples=0).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Dict, List

from omegaconf import DictConfig

from ldm.errors import ConfigError, DataError
from ldm.files import atomic_write_text
from ldm.sampling.cache import check_cache_family
from ldm.sampling.settings import SamplerSettings
from ldm.tasks.checkpoints import resolve_checkpoint, with_export_groups

log = logging.getLogger("ldm")

RESULTS = Path("eval") / "results.jsonl"
METRICS = Path("eval") / "metrics.json"


def validate(cfg: DictConfig) -> SamplerSettings:
    """Check the task and sampler settings before anything is loaded; return the sampler's."""
    from ldm.tasks.common import check_device

    task = cfg.task
    for key in ("t_grid", "mc_samples", "batch_size"):
        if task[key] < 1:
            raise ConfigError(f"task.{key}={task[key]} must be >= 1")
    if task.max_examples < 0:
        raise ConfigError(f"task.max_examples={task.max_examples} must be >= 0 (0 = no answers)")
    if task.max_rows is not None and task.max_rows < 1:
        raise ConfigError(f"task.max_rows={task.max_rows} must be >= 1 or null (the whole split)")
    check_device(task.device)
    if cfg.dataset.kind not in ("text", "chat"):
        raise ConfigError(f"dataset.kind={cfg.dataset.kind!r}; accepted: text, chat")
    return SamplerSettings.from_config(cfg.sampler)


def plain_model_keys_ok(cfg: DictConfig, export) -> List[str]:
    """Return the key patterns that may be missing: model.missing_keys_ok for a plain model.

    A plain Hugging Face folder or hub model (not an ldm export), such as the packaged minilm
    before diffusion training, may lack the MLM head that the model option names as expected;
    it is initialised (seeded), so its NELBO is the starting point training improves on.
    """
    return [] if export.info or export.from_ldm else list(cfg.model.missing_keys_ok)


def print_summary(metrics: Dict[str, float], headline: str, lower_better: bool) -> None:
    """Print the metrics as a table and the headline with its direction."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="evaluation")
    table.add_column("metric")
    table.add_column("value", justify="right")
    counts = ("rows", "examples", "answer_tokens", "maskable_tokens")
    for key, value in metrics.items():
        table.add_row(key, f"{int(value):,}" if key in counts else f"{value:,.4f}")
    Console().print(table)
    print(f"headline {headline} = {metrics.get(headline, float('nan')):.4f} "
          f"({'lower' if lower_better else 'higher'} is better)")


def run(cfg: DictConfig) -> float:
    """Evaluate the checkpoint on the prepared test split; return the headline metric."""
    from tqdm.auto import tqdm

    from ldm.data.store import load_prepared
    from ldm.scoring import answer_all, answer_jobs, answer_metrics, fixed_batches, heldout_nelbo
    from ldm.tasks.common import open_tracker, pick_device, run_dir
    from ldm.tasks.prepared import (check_data_vocabulary, find_prepared, log_data_identity,
                                    prepare_command)
    from ldm.tokenizer import load_tokenizer
    from ldm.train.data import collate_for_rows, packed_collate

    settings = validate(cfg)
    export = resolve_checkpoint(cfg.checkpoint, "evaluate")
    cfg = with_export_groups(cfg, export)
    settings = settings.with_max_positions(export.max_positions)
    check_cache_family(settings.cache, export.config.get("model_type"))
    kind = cfg.dataset.kind
    command = prepare_command(cfg) + (f" init_from={cfg.checkpoint}" if kind == "chat" else "")
    data_dir, _ = find_prepared(cfg, kind, command)
    splits, manifest = load_prepared(data_dir, command)
    if kind == "chat" and cfg.task.max_examples > 0:
        from ldm.data.sft import canvas_mismatch

        mismatch = canvas_mismatch(manifest.get("padding"), manifest.get("answer_positions"),
                                   settings.max_new_tokens)
        if mismatch:
            log.warning(mismatch)
    if export.max_positions is not None and cfg.context.length > export.max_positions:
        raise ConfigError(f"context.length={cfg.context.length} exceeds the "
                          f"{export.max_positions} positions of checkpoint={cfg.checkpoint}")
    test = splits["test"]
    if len(test) == 0:
        raise DataError(f"the test split of {data_dir} is empty; prepare it with a larger "
                        "dataset.test_split_pct")
    tok = export.load_tokenizer()
    check_data_vocabulary(tok, load_tokenizer(str(data_dir / "tokenizer")), cfg.checkpoint,
                          data_dir, command)
    mask_id = export.mask_id if export.mask_id is not None else tok.mask_token_id

    jobs: List[dict] = []
    synthetic_data = kind == "chat" and cfg.dataset.source == "synthetic"
    if kind == "chat" and cfg.task.max_examples > 0:
        jobs = answer_jobs(tok, test, cfg.task.max_examples, synthetic_data=synthetic_data,
                           manifest=manifest, data_dir=data_dir, command=command,
                           from_end=cfg.task.answers_from_end)
        longest = max((len(j["prompt_ids"]) for j in jobs), default=0)
        settings.check_prompt(longest, "the longest held-out prompt")
    if kind == "text":
        headline, lower_better = "nelbo", True
    else:
        headline, lower_better = ("exact_match" if synthetic_data else "f1"), False
    if not jobs and headline != "nelbo":
        headline, lower_better = "nelbo", True

    device = pick_device(cfg.task.device)
    folder = run_dir(cfg)
    rows = len(test) if cfg.task.max_rows is None else min(cfg.task.max_rows, len(test))
    # chat rows as the training run's held-out batches: padding=batch rows EOS-padded each to its
    # own width, so the figures match the training evaluation's whatever the batch size
    collate = (collate_for_rows(manifest, tok.pad_token_id, manifest.get("eos_id", tok.eos_token_id),
                                cfg.dataset, heldout=True) if kind == "chat" else packed_collate)
    (folder / RESULTS).unlink(missing_ok=True)  # a rerun of this run_name starts afresh
    with open_tracker(cfg) as tracker:
        tracker.set_tags({"ldm.checkpoint": export.where, "ldm.data_dir": str(data_dir),
                          "ldm.fingerprint": manifest.get("fingerprint", ""),
                          "ldm.run_dir": str(folder), "ldm.headline_metric": headline,
                          "ldm.headline_direction": "lower" if lower_better else "higher"})
        log_data_identity(tracker, data_dir, manifest, "evaluation")
        log.info("evaluating %s on the test split of %s", export.where, data_dir)
        import torch

        torch.manual_seed(cfg.seed)  # a head a plain model lacks is initialised the same way
        model = export.load_model(dtype=cfg.model.dtype,
                                  attn_implementation=cfg.model.attn_implementation,
                                  trust_remote_code=cfg.model.trust_remote_code,
                                  vocab_size=len(tok), device=device,
                                  missing_keys_ok=plain_model_keys_ok(cfg, export))
        num_batches = math.ceil(rows / cfg.task.batch_size)
        batches = fixed_batches(test, num_batches, cfg.task.batch_size, collate, device, rows)
        metrics = heldout_nelbo(
            model, tqdm(batches, total=num_batches, desc="held-out NELBO", unit="batch"),
            schedule=cfg.masking.schedule, eps=cfg.masking.eps, grid_points=cfg.task.t_grid,
            mask_id=mask_id, seed=cfg.seed, samples=cfg.task.mc_samples)
        metrics["rows"] = float(rows)
        if jobs:
            records = answer_all(model, tok, jobs, settings, mask_id=mask_id,
                                 batch_size=cfg.task.batch_size, seed=cfg.seed, device=device)
            metrics.update(answer_metrics(records))
            path = atomic_write_text(folder / RESULTS,
                                     "".join(json.dumps(r) + "\n" for r in records))
            tracker.log_artifact(path, "eval")
        metrics_path = atomic_write_text(folder / METRICS, json.dumps(metrics, indent=2) + "\n")
        tracker.log_metrics(metrics, step=0)
        tracker.log_artifact(metrics_path, "eval")
    print(f"checkpoint {export.where}, held-out data {data_dir}")
    print_summary(metrics, headline, lower_better)
    if jobs:
        print(f"results: {folder / RESULTS}")
    return float(metrics[headline])
