"""One optimizer step's outcome: applied, skipped as non-finite, or skipped by the fp16 scaler.

The rule for skipped steps: a step whose update is not applied (a non-finite loss or gradient
norm skipped under task.skip_nonfinite=true, or an fp16 loss-scale overflow that the GradScaler
or DeepSpeed's loss scaler skips) still counts towards max_steps (its checkpoint and export
happen) but does not advance the lr schedule, which therefore follows the updates actually made:
after k skipped steps a run ends k steps short of the schedule's end. Both kinds are counted in
mlflow (skipped_steps, scaler_skipped_steps with the loss_scale).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

from ldm.errors import LdmError
from ldm.train import checkpoint as ckpt

log = logging.getLogger(__name__)


def apply_update(accelerator, optimizer, scheduler, state: ckpt.TrainState, *, loss: float,
                 grad_norm, step: int, skip_nonfinite: bool, run_dir: Path, tracker) -> bool:
    """Step the optimizer (and the lr schedule) unless this step is skipped; return True if applied.

    Raises LdmError for a non-finite loss or gradient norm unless `skip_nonfinite`. Counts skips
    in `state` (skipped_steps, scaler_skipped_steps, scheduler_steps) and logs them to `tracker`.
    """
    # fp16 (not under DeepSpeed, whose engine scales the loss itself): every update goes through
    # torch's GradScaler, inside optimizer.step()
    scaler = getattr(accelerator, "scaler", None)
    # DeepSpeed clips inside its engine and may report no norm
    norm = float("nan") if grad_norm is None else float(grad_norm)
    # under fp16 an infinite gradient norm is an ordinary loss-scale overflow: the scaler skips
    # that update and lowers the scale, so it is not a failure of the run (DeepSpeed's engine has
    # already stepped, or skipped an overflow, inside backward)
    overflow = scaler is not None or (accelerator.distributed_type == "DEEPSPEED" and
                                      bool(getattr(optimizer, "step_was_skipped", False)))
    if not (math.isfinite(loss) and (grad_norm is None or math.isfinite(norm) or overflow)):
        if not skip_nonfinite:
            last = ckpt.latest_checkpoint(run_dir)
            raise LdmError(
                f"non-finite loss ({loss}) or gradient norm at step {step}; stopped. Resume point: "
                f"{last or 'none (no checkpoint yet)'}. Lower task.lr or check the data, or set "
                "task.skip_nonfinite=true to skip such steps")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            # the gradients were unscaled for clipping; the scaler must close this step (as after
            # an overflow, with a lower scale) or the next unscale_ fails
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        state.skipped_steps += 1
        log.warning("non-finite loss or gradient norm at step %d: step skipped, weights unchanged, "
                    "lr schedule not advanced (%d skipped so far)", step, state.skipped_steps)
        if accelerator.is_main_process:
            tracker.log_metrics({"skipped_steps": state.skipped_steps}, step=step)
        return False
    scale = scaler.get_scale() if scaler is not None else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if update_skipped(optimizer, scaler, scale):
        state.scaler_skipped_steps += 1
        log.info("fp16 loss-scale overflow at step %d: update skipped, loss scale lowered "
                 "(%d so far)", step, state.scaler_skipped_steps)
        if accelerator.is_main_process:
            tracker.log_metrics({"scaler_skipped_steps": state.scaler_skipped_steps,
                                 "loss_scale": loss_scale(scaler)}, step=step)
        return False
    scheduler.step()
    state.scheduler_steps += 1
    return True


def update_skipped(optimizer, scaler, scale_before: Optional[float]) -> bool:
    """Return True when the fp16 loss scaler skipped the update optimizer.step() just asked for.

    torch's GradScaler lowers its scale exactly when it finds inf/nan gradients. accelerate's
    `step_was_skipped` cannot tell for a fused AdamW, which the scaler always calls (the kernel
    itself skips the update), so the scale is compared instead; DeepSpeed reports its overflow.
    """
    if scaler is not None:
        return scaler.get_scale() < scale_before
    return bool(getattr(optimizer, "step_was_skipped", False))


def loss_scale(scaler) -> float:
    """Return the current fp16 loss scale (nan when the scaler is DeepSpeed's, inside its engine)."""
    return float(scaler.get_scale()) if scaler is not None else float("nan")
