"""task=sft: chat finetuning; only answer tokens are maskable, loss per answer length."""

from __future__ import annotations

import json
import logging

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ldm.tasks.train_common import run_training

log = logging.getLogger("ldm")


def heldout_prompts(test_split, count: int) -> list:
    """Return (prompt ids, reference answer ids) of the first `count` held-out examples."""
    out = []
    view = test_split.with_format("numpy")
    for i in range(min(count, len(test_split))):
        row = view[i]
        ids, mask = np.asarray(row["input_ids"]), np.asarray(row["answer_mask"]).astype(bool)
        if not mask.any():
            continue
        first = int(mask.argmax())
        length = int(row["length"]) if "length" in row else len(ids)
        out.append((ids[:first].tolist(), ids[first:length].tolist()))
    return out


def sampler_family(cfg: DictConfig):
    """Return the model family (config model_type) SFT trains, when known before loading."""
    from pathlib import Path

    if cfg.init_from and (Path(cfg.init_from) / "config.json").is_file():
        return json.loads((Path(cfg.init_from) / "config.json").read_text()).get("model_type")
    return cfg.model.architecture if cfg.model.source == "config" else None


def sample_hook(cfg: DictConfig):
    """Return the on_eval factory that answers a few held-out prompts with the sampler."""
    from ldm.sampling.cache import check_cache_family
    from ldm.sampling.validation import validate_sampler_args

    # Checked now, before training starts, not at the first evaluation.
    checked = {k: v for k, v in OmegaConf.to_container(cfg.sampler, resolve=True).items()
               if k not in ("name", "early_stop")}
    validate_sampler_args(prompt_length=0, **checked)
    family = sampler_family(cfg)
    if family is not None:
        check_cache_family(cfg.sampler.cache, family)
    def factory(tokenizer, test_split, tracker):
        import torch

        from ldm.sampling.sampler import generate, hf_logits_fn

        prompts = heldout_prompts(test_split, cfg.task.eval_samples)
        settings = {k: v for k, v in OmegaConf.to_container(cfg.sampler, resolve=True).items()
                    if k != "name"}
        if not prompts:
            return None

        def on_eval(mlm, step: int) -> None:
            was_training = mlm.training
            mlm.eval()
            result = generate(hf_logits_fn(mlm), [p for p, _ in prompts],
                              mask_id=tokenizer.mask_token_id, eos_id=tokenizer.eos_token_id,
                              special_ids=tokenizer.all_special_ids, pad_id=tokenizer.pad_token_id,
                              generator=torch.Generator().manual_seed(cfg.seed),
                              max_positions=getattr(mlm.config, "max_position_embeddings", None),
                              device=next(mlm.parameters()).device, record_history=False,
                              **settings)
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
    """Finetune on chat data and export; return the final held-out answer NELBO per token."""
    from ldm.train.data import chat_collate

    return run_training(cfg, kind="chat", normalizer_default="sequence",
                        collate_for=lambda tok: chat_collate(tok.pad_token_id),
                        on_eval_for=sample_hook(cfg) if cfg.task.eval_samples > 0 else None)
