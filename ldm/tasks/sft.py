"""task=sft: chat finetuning; only answer tokens are maskable, loss per answer length."""

from __future__ import annotations

import json
import logging
from typing import Optional

import torch
from omegaconf import DictConfig

from ldm.data.sft import canvas_mismatch
from ldm.errors import ConfigError
from ldm.export import read_export
from ldm.hub import is_local
from ldm.sampling.cache import check_cache_family
from ldm.sampling.decode import never_emitted_ids
from ldm.sampling.sampler import generate, sampler_model
from ldm.scoring import answer_all, answer_jobs, answer_metrics, heldout_answers
from ldm.sampling.settings import SamplerSettings
from ldm.tasks import hint
from ldm.tasks.train_common import run_training
from ldm.train.data import collate_for_rows

log = logging.getLogger("ldm")


def sampler_settings(cfg: DictConfig) -> SamplerSettings:
    """Return the sampler settings of the SFT-time samples, checked against the model's positions."""
    family = None  # a hub model: its limits are checked once it loads
    if cfg.init_from and is_local(cfg.init_from):
        with hint("pass an export folder from outputs/models/ or a hub id"):
            export = read_export(cfg.init_from, "init_from")
        positions, family = export.max_positions, export.config.get("model_type")
    elif cfg.init_from:
        positions = None
    else:
        positions = cfg.model.max_positions
        family = cfg.model.architecture if cfg.model.source == "config" else None
    settings = SamplerSettings.from_config(cfg.sampler, positions)
    mismatch = canvas_mismatch(cfg.dataset.padding, cfg.dataset.get("answer_positions"),
                               settings.max_new_tokens)
    if mismatch and (cfg.task.eval_samples or cfg.task.target_exact_match is not None):
        log.warning(mismatch)
    if family is not None:
        check_cache_family(settings.cache, family)
    return settings


def check_target(cfg: DictConfig) -> None:
    """Raise ConfigError for a held-out target this run cannot check (before anything loads)."""
    task = cfg.task
    if task.target_exact_match is None:
        return
    if not 0 < task.target_exact_match <= 1:
        raise ConfigError(f"task.target_exact_match={task.target_exact_match} must be in (0, 1] "
                          "(a share of held-out prompts answered right), or null")
    if cfg.dataset.source != "synthetic":
        raise ConfigError(f"task.target_exact_match needs answers that can be checked exactly: "
                          f"dataset.source=synthetic (dataset=synthetic_tasks), not "
                          f"dataset={cfg.dataset.name}")
    if task.target_examples < 1:
        raise ConfigError(f"task.target_examples={task.target_examples} must be >= 1")
    if task.eval_every < 1:
        raise ConfigError(f"task.target_exact_match is checked at each evaluation: set "
                          f"task.eval_every >= 1 (now {task.eval_every})")


def sample_hook(cfg: DictConfig, settings: SamplerSettings):
    """Return the on_eval factory: a few held-out answers logged, and the held-out target checked.

    With task.target_exact_match, each evaluation answers the last task.target_examples prompts
    of the test split (task=evaluate answers the first ones) with the run's sampler, scores them
    with task=evaluate's code, and stops training once every task type reaches the target.
    """
    def factory(tokenizer, test_split, tracker, data_dir, manifest, command):
        # the same prompts task=evaluate answers: everything before each row's last answer
        prompts = heldout_answers(test_split, cfg.task.eval_samples)
        target = cfg.task.target_exact_match
        jobs = []
        if target is not None:
            jobs = answer_jobs(tokenizer, test_split, cfg.task.target_examples,
                               synthetic_data=True, manifest=manifest, data_dir=data_dir,
                               command=command, from_end=True)
        lengths = [len(p) for p, _ in prompts] + [len(j["prompt_ids"]) for j in jobs]
        if not lengths:
            return None
        settings.check_prompt(max(lengths), "the longest held-out prompt the run answers")

        def samples(mlm, step: int) -> None:
            result = generate(sampler_model(mlm), [p for p, _ in prompts], settings,
                              mask_id=tokenizer.mask_token_id, eos_id=tokenizer.eos_token_id,
                              special_ids=never_emitted_ids(tokenizer, mlm.config.vocab_size),
                              pad_id=tokenizer.pad_token_id,
                              generator=torch.Generator().manual_seed(cfg.seed),
                              device=next(mlm.parameters()).device, record_history=False)
            lines = []
            for (prompt, reference), answer in zip(prompts, result.tokens):
                lines.append(json.dumps({
                    "step": step, "prompt": tokenizer.decode(prompt, skip_special_tokens=False),
                    "answer": tokenizer.decode(answer, skip_special_tokens=True),
                    "reference": tokenizer.decode(reference, skip_special_tokens=True)}))
            tracker.log_text("\n".join(lines) + "\n", f"samples/step-{step:07d}.jsonl")
            log.info("step %d sample answer: %s", step, json.loads(lines[0])["answer"][:200])

        def target_reached(mlm, step: int) -> Optional[str]:
            records = answer_all(mlm, tokenizer, jobs, settings, mask_id=tokenizer.mask_token_id,
                                 batch_size=64, seed=cfg.seed,
                                 device=next(mlm.parameters()).device, progress=False)
            metrics = answer_metrics(records)
            per_type = {k.split(".", 1)[1]: v for k, v in metrics.items()
                        if k.startswith("exact_match.")}
            tracker.log_metrics({f"heldout_{k}": v for k, v in metrics.items()
                                 if k.startswith("exact_match")}, step=step)
            shown = ", ".join(f"{k} {v:.0%}" for k, v in sorted(per_type.items()))
            log.info("step %d held-out exact match (%d prompts, target %.0f%% on every type): %s",
                     step, len(records), target * 100, shown)
            if per_type and min(per_type.values()) >= target:
                return (f"target reached: held-out exact match >= {target:.0%} on every type "
                        f"({shown}; {len(records)} prompts)")
            return None

        def on_eval(mlm, step: int) -> Optional[str]:
            was_training = mlm.training
            mlm.eval()
            try:
                if prompts:
                    samples(mlm, step)
                return target_reached(mlm, step) if jobs else None
            finally:
                mlm.train(was_training)

        return on_eval
    return factory


def run(cfg: DictConfig) -> float:
    """Finetune on chat data and export; return the final held-out NELBO per maskable token."""
    # the settings of the samples taken at each evaluation, checked before anything trains
    check_target(cfg)
    answers = cfg.task.eval_samples > 0 or cfg.task.target_exact_match is not None
    settings = sampler_settings(cfg) if answers else None
    return run_training(cfg, kind="chat",
                        collate_for=lambda tok, manifest, heldout: collate_for_rows(
                            manifest, tok.pad_token_id, tok.eos_token_id, cfg.dataset, heldout),
                        on_eval_for=sample_hook(cfg, settings) if settings else None)
