"""The one training loop (pretraining and SFT differ only in data and normaliser).

accelerate drives devices, mixed precision and gradient accumulation (no all-reduce on the
accumulation micro-steps); which rows a step reads and how they are masked are pure functions of
(seed, step, micro-batch, rank), so a resumed run continues exactly where it stopped.

Skipped steps (see ldm/train/update.py) still count towards max_steps but do not advance the
lr schedule.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.errors import ConfigError
from ldm.scoring import fixed_batches, heldout_nelbo
from ldm.faults import kill_point
from ldm.model import SparseMaskedLM, maybe_compile, unwrap
from ldm.train import checkpoint as ckpt
from ldm.train.data import BatchPlan, Collate, check_batch_layout, step_generator
from ldm.train.distributed import (check_deepspeed, export_main, fit_sharding, joined_line,
                                  keep_fp32_buffers)
from ldm.train.objective import check_normalizer, diffusion_step
from ldm.train.settings import LoopConfig
from ldm.train.update import apply_update

log = logging.getLogger(__name__)

LR_SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(kind: str, warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Return step -> lr multiplier: linear warmup, then cosine / linear decay or constant."""
    if kind not in LR_SCHEDULES:
        raise ConfigError(f"task.lr_schedule={kind!r}; accepted: {', '.join(LR_SCHEDULES)}")

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * shape

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay: Sequence[str]) -> List[dict]:
    """Return AdamW groups: no weight decay on parameters whose name contains a no_decay pattern."""
    decay, plain = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (plain if any(p.lower() in name.lower() for p in no_decay) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   no_decay: Sequence[str], betas: Sequence[float] = (0.9, 0.999),
                   eps: float = 1e-8) -> torch.optim.Optimizer:
    """Return AdamW over `model`, fused (one kernel for all parameters) where torch supports it."""
    groups = param_groups(model, weight_decay, no_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device) so model initialisation is reproducible."""
    from accelerate.utils import set_seed  # lazy: accelerate is slow to import (startup)

    set_seed(seed)


def make_accelerator(cfg: LoopConfig):
    """Return the Accelerator for this run (device, mixed precision, accumulation)."""
    from accelerate import Accelerator  # lazy: accelerate is slow to import (startup)

    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"hardware.mixed_precision={cfg.mixed_precision!r}; accepted: no, bf16, fp16")
    accelerator = Accelerator(gradient_accumulation_steps=cfg.accumulation, cpu=cfg.cpu,
                              mixed_precision=cfg.mixed_precision,
                              step_scheduler_with_optimizer=False)
    check_deepspeed(accelerator.distributed_type, cfg.skip_nonfinite)
    return accelerator


def validate(cfg: LoopConfig, processes: int) -> None:
    """Raise ConfigError for inconsistent settings before any weights are touched."""
    check_batch_layout(cfg.global_batch_size, cfg.micro_batch_size, cfg.accumulation, processes)
    check_normalizer(cfg.normalizer)
    lr_factor(cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    if cfg.max_steps < 1:
        raise ConfigError(f"task.max_steps={cfg.max_steps} must be >= 1")
    if cfg.lr <= 0:
        raise ConfigError(f"task.lr={cfg.lr} must be > 0")
    if cfg.max_minutes is not None and not cfg.max_minutes > 0:
        raise ConfigError(f"task.max_minutes={cfg.max_minutes} must be > 0 (or null for no cap)")


@dataclass
class Window:
    """The figures summed since the last logged step (steps whose update was applied)."""

    loss: float = 0.0
    masked: float = 0.0
    steps: int = 0
    tokens: int = 0
    answer: int = 0  # chat rows: answer tokens proper (no prompt, no EOS padding)
    began: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, masked: float, tokens: int, answer: int) -> None:
        """Count one applied step's figures."""
        self.loss += loss
        self.masked += masked
        self.steps += 1
        self.tokens += tokens
        self.answer += answer

    def metrics(self) -> Dict[str, float]:
        """Return the window's means and throughputs."""
        elapsed = time.perf_counter() - self.began
        out = {"loss": self.loss / max(self.steps, 1),
               "masked_fraction": self.masked / max(self.steps, 1),
               "tokens_per_second": self.tokens / max(elapsed, 1e-9)}
        if self.answer:  # chat rows: the useful tokens, without prompt and padding
            out["answer_tokens_per_second"] = self.answer / max(elapsed, 1e-9)
        return out


def train(model, tokenizer, train_data, eval_data, collate: Collate, cfg: LoopConfig, *,
          accelerator, run_dir: Path, tracker, export: Callable[[torch.nn.Module, int], Path],
          resume: bool = True, resume_from: Optional[str] = None,
          on_eval: Optional[Callable[[torch.nn.Module, int], Optional[str]]] = None,
          eval_collate: Optional[Collate] = None) -> Dict[str, object]:
    """Train `model` to cfg.max_steps, checkpointing and exporting; return the final metrics.

    `on_eval(masked_lm, step)` runs on the main process after each evaluation (e.g. to sample
    answers for a few held-out prompts); when it returns a reason (e.g. "target reached"), or
    cfg.max_minutes of training have passed, training stops at that step as if it were the last:
    checkpoint, evaluation, export. The checkpoint records the reason (`stopped`), so a rerun of
    the same run finds it finished. final["stopped"] holds the reason ("" = reached max_steps).
    `eval_collate` batches the held-out rows (default: `collate`).
    """
    validate(cfg, accelerator.num_processes)
    plan = BatchPlan(len(train_data), cfg.seed, cfg.global_batch_size, cfg.micro_batch_size,
                     cfg.accumulation, accelerator.num_processes,
                     lengths=row_lengths(train_data) if cfg.group_by_length else None)
    eval_collate = eval_collate or collate
    device = accelerator.device
    wrapped, optimizer, scheduler = prepare_model(model, cfg, accelerator)
    sharded = accelerator.distributed_type == "FSDP"
    if sharded and on_eval is not None:
        log.warning("FSDP: the evaluation hook (e.g. sampled answers) is skipped while training; "
                    "run it on the export")

    state = ckpt.TrainState(extra=dict(cfg.extra_state))
    source = ckpt.resume_source(run_dir, resume, resume_from)
    start = ckpt.resume(accelerator, source, state, scheduler) if source is not None else 0
    if start < cfg.max_steps and not state.stopped:
        log.info(joined_line(accelerator, plan, start))  # every rank: all joined, each its rows
    view = train_data.with_format("numpy")
    # all of them (frozen ones have no gradient): FSDP clips only when handed exactly these
    params = list(wrapped.parameters())
    window = Window()
    final: Dict[str, float] = {}
    bar = tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step",
               disable=not (cfg.progress and accelerator.is_main_process))
    if start >= cfg.max_steps or state.stopped:
        # Training had finished (or stopped early); the export after the last checkpoint may not
        # have (a run killed while exporting), so evaluate and export the checkpoint's weights again.
        final.update(evaluate(wrapped, eval_data, eval_collate, cfg, device))
        if accelerator.is_main_process:
            tracker.log_metrics(final, step=start)
        export_main(accelerator, wrapped, exporter(export, state.stopped), start)
    # the time cap counts this process's training (wall time stays out of the checkpoint, so a
    # resumed run's checkpoints are byte-identical to an uninterrupted run's)
    began, elapsed = time.perf_counter(), 0.0
    try:
        for step in range(start if not state.stopped else cfg.max_steps, cfg.max_steps):
            step_loss, step_masked, tokens, answer_tokens = accumulate(
                wrapped, collate, view, plan, cfg, accelerator, step)
            grad_norm = accelerator.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            # one all-reduce per optimizer step for the figures: means of loss and masked
            # fraction, and the tokens of every process (SFT rows differ in length)
            figures = torch.stack([step_loss.double(), step_masked.double(),
                                   torch.tensor(float(tokens), dtype=torch.float64, device=device),
                                   torch.tensor(float(answer_tokens), dtype=torch.float64,
                                                device=device)])
            figures = accelerator.reduce(figures, "sum")
            step_loss, step_masked = (figures[:2] / accelerator.num_processes).unbind()
            tokens, answer_tokens = int(figures[2]), int(figures[3])
            # DeepSpeed clips inside its engine and may report no norm
            norm = float("nan") if grad_norm is None else float(grad_norm)
            done = step + 1
            applied = apply_update(accelerator, optimizer, scheduler, state, loss=float(step_loss),
                                   grad_norm=grad_norm, step=done, skip_nonfinite=cfg.skip_nonfinite,
                                   run_dir=run_dir, tracker=tracker)
            if applied:
                state.tokens_seen += tokens
                window.add(float(step_loss), float(step_masked), tokens, answer_tokens)
            bar.update(1)
            if window.steps and (done % max(cfg.log_every, 1) == 0 or done == cfg.max_steps):
                metrics = window.metrics()
                metrics.update({"lr": scheduler.get_last_lr()[0], "grad_norm": norm,
                                "tokens_seen": state.tokens_seen, "epoch": plan.epoch_of(done)})
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
                if accelerator.is_main_process:
                    tracker.log_metrics(metrics, step=done)
                final.update(metrics)
                window = Window()
            elapsed = time.perf_counter() - began
            last = done == cfg.max_steps
            if not last and cfg.max_minutes is not None and \
                    agreed(accelerator, elapsed >= cfg.max_minutes * 60):
                state.stopped = f"time cap: task.max_minutes={cfg.max_minutes:g} passed"
                last = True
            if last:  # checkpoint first: a failing final evaluation or export
                ckpt.save_checkpoint(accelerator, run_dir, done, state.record(), cfg.keep_last)
            if (cfg.eval_every and done % cfg.eval_every == 0) or last:
                evals = evaluate(wrapped, eval_data, eval_collate, cfg, device)
                reason = None
                if accelerator.is_main_process:
                    tracker.log_metrics(evals, step=done)
                    # sharded weights can only run a forward on every process together
                    if on_eval is not None and not sharded:
                        with torch.no_grad():
                            reason = on_eval(unwrap(accelerator.unwrap_model(wrapped)).mlm, done)
                final.update(evals)
                wrapped.train()
                if not last and agreed(accelerator, bool(reason)):
                    state.stopped = reason or "stopped by another process's evaluation"
                    last = True
                    ckpt.save_checkpoint(accelerator, run_dir, done, state.record(), cfg.keep_last)
            if cfg.save_every and done % cfg.save_every == 0 and not last:
                ckpt.save_checkpoint(accelerator, run_dir, done, state.record(), cfg.keep_last)
            if (cfg.export_every and done % cfg.export_every == 0) or last:
                export_main(accelerator, wrapped, exporter(export, state.stopped), done)
            kill_point(f"step:{done}")
            accelerator.wait_for_everyone()
            if last:
                if state.stopped:
                    log.info("training stopped at step %d of %d: %s", done, cfg.max_steps,
                             state.stopped)
                break
    finally:
        bar.close()
    final.update({name: getattr(state, name) for name in ckpt.TrainState.COUNTERS})
    final["train_seconds"] = elapsed
    final["stopped"] = state.stopped  # a str among the figures: why training ended early
    return final


def prepare_model(model: torch.nn.Module, cfg: LoopConfig, accelerator):
    """Return (wrapped model, optimizer, lr scheduler), prepared by accelerate for this run."""
    model.train()
    wrapped = SparseMaskedLM(maybe_compile(model, cfg.compile))
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.no_decay, cfg.betas, cfg.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
    fit_sharding(accelerator, model, cfg)
    with keep_fp32_buffers(model):  # DeepSpeed bf16 casts buffers too
        wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    # The scheduler is not handed to accelerate's checkpointing, which unpickles custom objects
    # with weights_only=False; its whole state is the number of optimizer steps taken, saved in
    # trainer_state.json (the optimizer's own state restores the current lr).
    return wrapped, optimizer, scheduler


def accumulate(wrapped, collate: Collate, view, plan: BatchPlan, cfg: LoopConfig, accelerator,
               step: int) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
    """Run the forward and backward passes of optimizer step `step` (0-based) on this process;
    return (mean loss, mean masked fraction, tokens, answer tokens) of its micro-batches."""
    device, rank = accelerator.device, accelerator.process_index
    step_loss = torch.zeros((), device=device)
    step_masked = torch.zeros((), device=device)
    tokens = answer_tokens = 0
    for micro in range(cfg.accumulation):
        batch = collate(view[plan.indices(step, micro, rank)], device)
        # masks are keyed by the micro-batch's slot in the global batch, as its rows are,
        # so P processes x A accumulation steps train exactly like 1 process x P*A
        gen = step_generator(cfg.seed, step, micro * plan.processes + rank, 0, device)
        with accelerator.accumulate(wrapped):
            loss, stats = diffusion_step(
                wrapped, batch["input_ids"], batch["maskable"], batch["attention_mask"],
                cfg.schedule, cfg.time_sampling, cfg.eps, cfg.mask_id, cfg.normalizer,
                generator=gen, sparse=cfg.sparse_logits)
            kill_point(f"forward:{step + 1}")
            accelerator.backward(loss)
        step_loss += loss.detach() / cfg.accumulation
        step_masked += stats["masked_fraction"] / cfg.accumulation
        mask = batch["attention_mask"]
        tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        # chat rows: the answer tokens proper (no EOS padding), counted by the collate
        answer_tokens += batch.get("answer_tokens", 0)
    return step_loss, step_masked, tokens, answer_tokens


def row_lengths(data) -> np.ndarray:
    """Return the `length` column of prepared chat rows (what length grouping sorts by)."""
    if "length" not in data.column_names:
        raise ConfigError("task.group_by_length needs rows with a length column (prepared chat "
                          "data); packed pretraining rows are all one length")
    return np.asarray(data.with_format("numpy")["length"], dtype=np.int64)


def exporter(export: Callable[..., Path], stopped: str) -> Callable[..., Path]:
    """Return `export`, with an early stop's reason passed along (export(..., stopped=reason))."""
    return functools.partial(export, stopped=stopped) if stopped else export


def agreed(accelerator, flag: bool) -> bool:
    """Return True on every process when `flag` is True on any (one collective, all call it)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(value, "sum") > 0)


def evaluate(wrapped, eval_data, collate: Collate, cfg: LoopConfig, device) -> Dict[str, float]:
    """Return held-out metrics (prefixed eval_) on a fixed subset with a fixed t grid."""
    if eval_data is None or len(eval_data) == 0:
        return {}
    wrapped.eval()
    batches = fixed_batches(eval_data, cfg.eval_batches, cfg.micro_batch_size, collate, device)
    result = heldout_nelbo(wrapped, batches, schedule=cfg.schedule, eps=cfg.eps,
                           grid_points=cfg.eval_t_grid, mask_id=cfg.mask_id, seed=cfg.seed,
                           samples=cfg.eval_mc_samples)
    return {f"eval_{k}": v for k, v in result.items()}
