"""task=pretrain: diffusion pretraining on prepared text; every token is maskable."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ldm.data.store import load_prepared
from ldm.errors import ConfigError, DataError
from ldm.tasks.common import open_tracker, run_dir
from ldm.tasks.prepare import prepare_command, prepared_data_dir
from ldm.tasks.train_common import (build_model, check_writable, loop_config, previous_mlflow_run,
                                    remember_mlflow_run)
from ldm.tokenizer import load_tokenizer

log = logging.getLogger("ldm")


def run(cfg: DictConfig) -> float:
    """Pretrain and export; return the final held-out negative ELBO per token."""
    from ldm.train import checkpoint as ckpt
    from ldm.train.data import packed_collate
    from ldm.train.loop import make_accelerator, train, validate

    if cfg.context.length > cfg.model.max_positions and not cfg.init_from:
        raise ConfigError(f"context.length={cfg.context.length} exceeds model.max_positions="
                          f"{cfg.model.max_positions} of model={cfg.model.name}")
    data_dir = prepared_data_dir(cfg)
    splits, manifest = load_prepared(data_dir, prepare_command(cfg))
    if manifest.get("context_length") != cfg.context.length or "answer_mask" in splits["train"].column_names:
        raise DataError(f"{data_dir} does not hold pretraining rows of {cfg.context.length} tokens; "
                        f"re-run `{prepare_command(cfg)} task.force=true`")
    tokenizer = load_tokenizer(str(data_dir / "tokenizer"))
    loop_cfg = loop_config(cfg, tokenizer.mask_token_id, "token")
    accelerator = make_accelerator(loop_cfg)
    validate(loop_cfg, accelerator.num_processes)
    export_dir = Path(cfg.paths.models) / cfg.run_name
    check_writable(export_dir.parent, "the export folder")
    folder = run_dir(cfg)

    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    model = build_model(cfg, tokenizer)
    resuming = cfg.task.resume and (cfg.task.resume_from or ckpt.latest_checkpoint(folder))
    resolved = OmegaConf.to_yaml(cfg, resolve=True)

    def export(mlm, step: int) -> Path:
        out = ckpt.export_model(mlm, tokenizer, export_dir, resolved,
                                {"run_name": cfg.run_name, "step": step, "task": cfg.task.name,
                                 "data": str(data_dir), "mask_id": tokenizer.mask_token_id})
        tracker.set_tags({"ldm.export": str(out)})
        log.info("exported step %d to %s", step, out)
        return out

    with open_tracker(cfg, resume_run_id=previous_mlflow_run(folder) if resuming else None) as tracker:
        if accelerator.is_main_process:
            remember_mlflow_run(folder, tracker.run_id)
            tracker.set_tags({"ldm.data_dir": str(data_dir), "ldm.run_dir": str(folder)})
        final = train(model, tokenizer, splits["train"], splits["test"], packed_collate, loop_cfg,
                      accelerator=accelerator, run_dir=folder, tracker=tracker, export=export,
                      resume=bool(cfg.task.resume), resume_from=cfg.task.resume_from)
    if accelerator.is_main_process:
        print(f"export: {export_dir}")
        print(f"held-out NELBO/token {final.get('eval_nelbo', float('nan')):.4f}, "
              f"perplexity bound {final.get('eval_ppl_bound', float('nan')):.2f}")
    return float(final.get("eval_nelbo", float("nan")))
