"""task=sft: chat finetuning; only answer tokens are maskable, loss per answer length."""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig

from ldm.evaluate import heldout_answers
from ldm.sampling.settings import SamplerSettings
from ldm.tasks.train_common import run_training

log = logging.getLogger("ldm")


def sampler_settings(cfg: DictConfig) -> SamplerSettings:
    """Return the sampler settings of the SFT-time samples, checked against the model's positions."""
    from ldm.export import read_export
    from ldm.hub import is_local
    from ldm.sampling.cache import check_cache_family
    from ldm.tasks import hint

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
    from ldm.data.sft import canvas_mismatch

    mismatch = canvas_mismatch(cfg.dataset.padding, cfg.dataset.get("answer_positions"),
                               settings.max_new_tokens)
    if mismatch and cfg.task.eval_samples:
        log.warning(mismatch)
    if family is not None:
        check_cache_family(settings.cache, family)
    return settings


def sample_hook(cfg: DictConfig, settings: SamplerSettings):
    """Return the on_eval factory that answers a few held-out prompts with the sampler."""
    def factory(tokenizer, test_split, tracker):
        import torch

        from ldm.sampling.decode import never_emitted_ids
        from ldm.sampling.sampler import generate, hf_logits_fn

        # the same prompts task=evaluate answers: everything before each row's last answer
        prompts = heldout_answers(test_split, cfg.task.eval_samples)
        if not prompts:
            return None
        longest = max(len(p) for p, _ in prompts)
        settings.check_prompt(longest, "the longest held-out prompt of task.eval_samples")

        def on_eval(mlm, step: int) -> None:
            was_training = mlm.training
            mlm.eval()
            result = generate(hf_logits_fn(mlm), [p for p, _ in prompts], settings,
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
            mlm.train(was_training)

        return on_eval
    return factory


def run(cfg: DictConfig) -> float:
    """Finetune on chat data and export; return the final held-out NELBO per maskable token."""
    from ldm.train.data import chat_collate

    # the settings of the samples taken at each evaluation, checked before anything trains
    settings = sampler_settings(cfg) if cfg.task.eval_samples > 0 else None
    return run_training(cfg, kind="chat",
                        collate_for=lambda tok: chat_collate(tok.pad_token_id),
                        on_eval_for=sample_hook(cfg, settings) if settings else None)
