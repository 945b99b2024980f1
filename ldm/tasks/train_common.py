"""What pretrain and sft share: config checks, model loading, run resumption, export."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from ldm.errors import ConfigError, LdmError
from ldm.train.loop import LoopConfig

log = logging.getLogger("ldm")

MLFLOW_RUN_FILE = "mlflow_run_id"


def check_writable(folder: str | Path, what: str) -> None:
    """Raise LdmError unless `folder` can be created and written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise LdmError(f"{what} {folder} is not writable ({err.strerror}); "
                       "fix its permissions or set paths.outputs / LDM_OUTPUTS elsewhere") from err


def loop_config(cfg: DictConfig, mask_id: int, normalizer_default: str) -> LoopConfig:
    """Return the loop's plain settings from the task, hardware and masking groups."""
    task, hw, masking = cfg.task, cfg.hardware, cfg.masking
    return LoopConfig(
        max_steps=task.max_steps, global_batch_size=task.global_batch_size,
        micro_batch_size=hw.micro_batch_size, accumulation=hw.gradient_accumulation_steps,
        mask_id=mask_id, lr=task.lr, weight_decay=task.weight_decay,
        no_decay=list(task.no_decay), betas=list(task.betas), adam_eps=task.adam_eps,
        lr_schedule=task.lr_schedule, warmup_steps=task.warmup_steps,
        min_lr_ratio=task.min_lr_ratio, grad_clip=task.grad_clip, log_every=task.log_every,
        eval_every=task.eval_every, eval_batches=task.eval_batches,
        eval_t_grid=task.eval_t_grid, save_every=task.save_every, keep_last=task.keep_last,
        export_every=task.export_every, schedule=masking.schedule,
        time_sampling=masking.time_sampling, eps=masking.eps,
        normalizer=masking.normalizer or task.normalizer or normalizer_default, seed=cfg.seed,
        mixed_precision=hw.mixed_precision, cpu=hw.accelerator == "cpu",
        skip_nonfinite=task.skip_nonfinite, sparse_logits=task.sparse_logits,
        compile=cfg.model.compile,
    )


def model_source(cfg: DictConfig) -> tuple[str, Optional[str]]:
    """Return (source, pretrained) for load_model: init_from wins over the model option."""
    if cfg.init_from:
        return ("export" if Path(cfg.init_from).is_dir() else "hub"), cfg.init_from
    return cfg.model.source, cfg.model.pretrained


def build_model(cfg: DictConfig, tokenizer):
    """Load or build the masked LM named by the config, sized to the tokenizer."""
    from ldm.model import load_model

    source, pretrained = model_source(cfg)
    arch = OmegaConf.to_container(cfg.model.arch, resolve=True)
    if source == "config":
        # a model built from scratch takes its special ids from the tokenizer it is built for
        arch.update({"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "bos_token_id": tokenizer.cls_token_id, "cls_token_id": tokenizer.cls_token_id,
                     "sep_token_id": tokenizer.sep_token_id})
    model = load_model(
        source, pretrained, architecture=cfg.model.architecture,
        arch=arch, vocab_size=len(tokenizer),
        max_positions=cfg.model.max_positions if source == "config" else None,
        missing_keys_ok=list(cfg.model.missing_keys_ok) if source == cfg.model.source else [],
        attn_implementation=cfg.model.attn_implementation, dtype=cfg.model.dtype,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        trust_remote_code=cfg.model.trust_remote_code, dropout=cfg.model.dropout,
    )
    for name in ("pad_token_id", "eos_token_id", "mask_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None and name != "mask_token_id":
            setattr(model.config, name, value)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and cfg.context.length > positions:
        raise ConfigError(f"context.length={cfg.context.length} exceeds the {positions} positions of "
                          f"{pretrained or cfg.model.name}; use a shorter context")
    return model


def previous_mlflow_run(run_dir: Path) -> Optional[str]:
    """Return the mlflow run id a resumed run continues, if it has one."""
    path = run_dir / MLFLOW_RUN_FILE
    return path.read_text().strip() if path.is_file() else None


def remember_mlflow_run(run_dir: Path, run_id: Optional[str]) -> None:
    """Store the run's mlflow id next to its checkpoints (for resumption)."""
    if run_id:
        tmp = run_dir / f".{MLFLOW_RUN_FILE}.{os.getpid()}"
        tmp.write_text(run_id)
        tmp.replace(run_dir / MLFLOW_RUN_FILE)
