"""The training loop's settings as plain values, built once from the config by the task.

`LoopConfig.from_cfg(cfg, mask_id, padding)` fills every field from the setting of the same name
in the task, masking and hardware groups, and derives the few that have no such setting (the
accumulation steps, the normaliser, the device). Tests and benchmarks build it directly; a field
left out means the same as the setting left out of the config.
"""

from __future__ import annotations

import collections.abc
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Sequence

from ldm.masking import normalizer_for
from ldm.train.data import resolve_accumulation


# The defaults are the schema's, written out: importing the schema module here would register
# Hydra's schemas as a side effect. tests/unit/test_masking.py checks that they agree.
@dataclass
class LoopConfig:
    """Everything the loop needs, as plain values (the task fills it from the Hydra config)."""

    max_steps: int
    global_batch_size: int
    micro_batch_size: int
    accumulation: int
    mask_id: int
    lr: float = 5e-5
    weight_decay: float = 0.01
    no_decay: Sequence[str] = ("bias", "norm", "embeddings")
    betas: Sequence[float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    eval_t_grid: int = 8
    eval_mc_samples: int = 2
    save_every: int = 500
    keep_last: int = 2
    export_every: int = 0
    schedule: str = "linear"
    time_sampling: str = "uniform"
    eps: float = 1e-3
    normalizer: str = normalizer_for(None, "text")
    seed: int = 0
    mixed_precision: str = "no"
    cpu: bool = True
    skip_nonfinite: bool = False
    sparse_logits: bool = True
    compile: bool = False
    max_minutes: Optional[float] = None  # time cap on training; stops like a reached target
    group_by_length: bool = False  # length-grouped batches (rows need a `length` column)
    progress: bool = True
    extra_state: Dict[str, object] = field(default_factory=dict)

    @classmethod
    def from_cfg(cls, cfg: Any, mask_id: int, padding: Optional[str] = None) -> "LoopConfig":
        """Return the loop's settings from cfg's task, masking and hardware groups.

        A field takes the setting of its own name; the ones below are derived. `padding` is the
        prepared rows' layout (task.group_by_length=null follows it: on for batch); before the
        epochs fix task.max_steps (null), it stands at 1 for the checks.
        """
        task, masking, hw = cfg.task, cfg.masking, cfg.hardware
        group = task.get("group_by_length")
        derived = dict(
            max_steps=task.max_steps if task.max_steps is not None else 1,
            accumulation=resolve_accumulation(hw.gradient_accumulation_steps,
                                              task.global_batch_size, hw.micro_batch_size,
                                              hw.num_processes),
            mask_id=mask_id, seed=cfg.seed, cpu=hw.accelerator == "cpu",
            normalizer=normalizer_for(masking.normalizer, cfg.dataset.kind),
            group_by_length=(padding == "batch") if group is None else bool(group),
        )
        named = {f.name for f in fields(cls)} - set(derived)
        same = {key: _plain(node[key]) for node in (task, masking, hw) for key in node
                if key in named}
        return cls(**same, **derived)


def _plain(value: Any) -> Any:
    """Return `value` with a config list (ListConfig) as a plain list."""
    if isinstance(value, collections.abc.Sequence) and not isinstance(value, str):
        return list(value)
    return value
