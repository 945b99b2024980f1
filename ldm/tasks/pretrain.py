"""task=pretrain: diffusion pretraining on prepared text; every token is maskable."""

from __future__ import annotations

from omegaconf import DictConfig

from ldm.tasks.train_common import run_training
from ldm.train.data import packed_collate


def run(cfg: DictConfig) -> float:
    """Pretrain and export; return the final held-out negative ELBO per token."""
    return run_training(cfg, kind="text", collate_for=lambda tok, manifest, heldout: packed_collate)
