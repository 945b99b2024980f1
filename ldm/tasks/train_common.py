"""What pretrain and sft share: `run_training`, which reads checks -> setup -> train -> report.

The checks run before the model loads, the mlflow run starts or a folder is written; setup loads
the prepared data, then (in the launched processes) the devices, run folder and model; training
runs the loop under the run's tracker and exports; the report prints where the export is and
its held-out figures.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import yaml
from omegaconf import DictConfig, OmegaConf

from ldm.data.store import load_prepared
from ldm.errors import ConfigError, DataError, LdmError
from ldm.export import write_export
from ldm.files import atomic_write_text
from ldm.hub import is_local
from ldm.masking import TIME_SAMPLING, get_schedule
from ldm.model import (HALF_DTYPES, check_attn_implementation, load_model, resolve_attention,
                       resolve_dtype)
from ldm.tasks.checkpoints import with_init_from_model
from ldm.tasks.common import (check_run_name, check_tracking, lock_run_folder, mark_work_started,
                              open_tracker, run_dir)
from ldm.tasks.launch import (check_init_from, check_machines, dry_run, needs_launch, relaunch,
                              resolve_schedule, schedule_source)
from ldm.tasks.prepared import find_prepared, log_data_identity, prepare_command
from ldm.tokenizer import chat_encoding_note, load_tokenizer
from ldm.train import checkpoint as ckpt
from ldm.train.distributed import check_world_size, layers_to_wrap
from ldm.train.loop import make_accelerator, seed_everything, train, validate
from ldm.train.settings import LoopConfig

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


def accelerate_settings(cfg: DictConfig) -> dict:
    """Return the accelerate config file the hardware preset names (empty when none)."""
    name = cfg.hardware.accelerate_config
    if not name:
        return {}
    path = Path(name) if Path(name).is_absolute() else Path(cfg.paths.root) / name
    if not path.is_file():
        raise ConfigError(f"hardware.accelerate_config={name} is not a file ({path}); name one of "
                          "accelerate_configs/*.yaml or null")
    return yaml.safe_load(path.read_text()) or {}


def fsdp_layer_names(settings: dict) -> list:
    """Return the layer classes an FSDP accelerate config wraps (empty when it wraps none)."""
    fsdp = settings.get("fsdp_config") or {}
    if settings.get("distributed_type") != "FSDP" or \
            fsdp.get("fsdp_auto_wrap_policy") != "TRANSFORMER_BASED_WRAP":
        return []
    names = fsdp.get("fsdp_transformer_layer_cls_to_wrap") or ""
    return [n.strip() for n in str(names).split(",") if n.strip()]


def model_source(cfg: DictConfig) -> tuple[str, Optional[str]]:
    """Return (source, pretrained) for load_model: init_from wins over the model option."""
    if cfg.init_from:
        return ("export" if is_local(cfg.init_from) else "hub"), cfg.init_from
    return cfg.model.source, cfg.model.pretrained


def build_model(cfg: DictConfig, tokenizer, attn_implementation: Optional[str] = None):
    """Load or build the masked LM named by the config, sized to the tokenizer.

    `attn_implementation` replaces model.attn_implementation (the task resolves "auto" for the
    device and precision it trains on).
    """
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
        attn_implementation=attn_implementation or cfg.model.attn_implementation,
        dtype=cfg.model.dtype, gradient_checkpointing=cfg.model.gradient_checkpointing,
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


def check_same_vocabulary(model_tok, data_tok, model_dir, data_dir, command: str) -> None:
    """Raise DataError unless every token of the model's tokenizer has the same id in the data's."""
    data_vocab = data_tok.get_vocab()
    wrong = [t for t, i in model_tok.get_vocab().items() if data_vocab.get(t) != i]
    if wrong:
        raise DataError(f"the data at {data_dir} was tokenized with a different tokenizer than "
                        f"{model_dir} ({len(wrong)} tokens differ, e.g. {wrong[0]!r}); re-run "
                        f"`{command} task.force=true`")


def previous_mlflow_run(run_dir: Path) -> Optional[str]:
    """Return the mlflow run id a resumed run continues, if it has one."""
    path = run_dir / MLFLOW_RUN_FILE
    return path.read_text().strip() if path.is_file() else None


def remember_mlflow_run(run_dir: Path, run_id: Optional[str]) -> None:
    """Store the run's mlflow id next to its checkpoints (for resumption)."""
    if run_id:
        atomic_write_text(run_dir / MLFLOW_RUN_FILE, run_id)


def check_masking(masking: DictConfig) -> None:
    """Raise ConfigError for a masking schedule the objective cannot use (before any weights)."""
    get_schedule(masking.schedule)
    if masking.time_sampling not in TIME_SAMPLING:
        raise ConfigError(f"masking.time_sampling={masking.time_sampling!r} is not known; use one "
                          f"of {', '.join(TIME_SAMPLING)}")
    if not 0.0 <= masking.eps < 1.0:
        raise ConfigError(f"masking.eps={masking.eps!r} is out of range; use a value in [0, 1), "
                          "e.g. 1e-3 (the smallest time t drawn)")


@dataclass
class CheckedTraining:
    """What the checks found: the config (an init_from export's model group in it), the prepared
    data's folder and manifest, and the command that prepares that data (for hints)."""

    cfg: DictConfig
    data_dir: Path
    manifest: Dict[str, Any]
    command: str


@dataclass
class TrainingData:
    """The prepared rows, their tokenizer and the loop's settings (max_steps fixed by now)."""

    splits: Dict[str, Any]
    manifest: Dict[str, Any]
    tokenizer: Any
    loop_cfg: LoopConfig


@dataclass
class TrainingRun:
    """Everything the training step needs, built by `setup_training`."""

    cfg: DictConfig
    checked: CheckedTraining
    data: TrainingData
    accelerator: Any
    attention: str  # the attention implementation resolved for this device and precision
    export_dir: Path
    folder: Path  # the run folder (checkpoints, mlflow run id)
    lock: Any  # the run folder's lock, held while this object lives (None off the main process)
    model: Any
    resuming: bool


def run_training(cfg: DictConfig, *, kind: str, collate_for, on_eval_for=None,
                 checks=None) -> float:
    """Train on the prepared data this config names, export, and return the final held-out NELBO.

    `kind` is the data kind the task needs (text or chat); `collate_for(tokenizer, manifest,
    heldout)` returns the batch collate (of the training rows, or with heldout=True the held-out
    rows'); `on_eval_for(tokenizer, test_split, tracker, data_dir, manifest, command)`
    returns an optional evaluation hook (returning a reason to stop early, or None);
    `checks(cfg)` runs the task's own checks with the common ones, before anything is written.
    """
    if cfg.launcher.dry_run:  # before the data checks: the plan needs no prepared data
        return dry_run(cfg)
    if checks is not None:
        checks(cfg)
    checked = check_training(cfg, kind)
    data = load_training_data(checked)
    if needs_launch(checked.cfg):
        return relaunch(checked.cfg)
    run = setup_training(checked, data)
    final = train_run(run, collate_for, on_eval_for)
    report_training(run, final)
    return float(final.get("eval_nelbo", float("nan")))


def check_training(cfg: DictConfig, kind: str) -> CheckedTraining:
    """Check every setting a training run uses; return what the checks found.

    Runs before the model loads, the mlflow run starts or a folder is written, so a bad value
    costs nothing: config values, the masking schedule, the batch layout, the model's dtype and
    attention, resume and init folders, and the prepared data (present, of this kind and
    context, made from exactly the sources this run names).
    """
    check_tracking(cfg)
    check_run_name(cfg.run_name)
    cfg = with_init_from_model(cfg)  # before anything reads cfg.model
    if cfg.dataset.kind != kind:
        raise ConfigError(f"task={cfg.task.name} trains on kind '{kind}' datasets; dataset="
                          f"{cfg.dataset.name} is kind '{cfg.dataset.kind}'")
    if not cfg.init_from and cfg.context.length > cfg.model.max_positions:
        raise ConfigError(f"context.length={cfg.context.length} exceeds model.max_positions="
                          f"{cfg.model.max_positions} of model={cfg.model.name}")
    for key in ("eval_t_grid", "eval_mc_samples"):
        if cfg.task[key] < 1:
            raise ConfigError(f"task.{key}={cfg.task[key]} must be >= 1")
    check_masking(cfg.masking)
    resolve_dtype(cfg.model.dtype)
    check_attn_implementation(cfg.model.attn_implementation)
    if cfg.hardware.mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"hardware.mixed_precision={cfg.hardware.mixed_precision!r}; accepted: "
                          "no, bf16, fp16")
    schedule_source(cfg)
    validate(LoopConfig.from_cfg(cfg, 0), cfg.hardware.num_processes)
    check_machines(cfg)
    launch = accelerate_settings(cfg)
    # on GPUs accelerate launch reads the file (on CPU torchrun takes the layout from ldm)
    if launch and cfg.hardware.accelerator != "cpu" and \
            launch.get("num_machines", 1) != cfg.hardware.num_machines:
        raise ConfigError(f"hardware.accelerate_config={cfg.hardware.accelerate_config} says "
                          f"num_machines: {launch.get('num_machines', 1)} but hardware.num_machines="
                          f"{cfg.hardware.num_machines}; make them agree")
    if cfg.task.resume_from:
        ckpt.read_state(cfg.task.resume_from)
    check_init_from(cfg)
    command = prepare_command(cfg) + (f" init_from={cfg.init_from}" if cfg.init_from else "")
    data_dir, manifest = find_prepared(cfg, kind, command)
    if kind == "chat" and manifest.get("padding", "eos") != cfg.dataset.padding:
        raise DataError(f"{data_dir} holds rows prepared with dataset.padding="
                        f"{manifest.get('padding', 'eos')} but this run names dataset.padding="
                        f"{cfg.dataset.padding}; re-run `{command} dataset.padding="
                        f"{cfg.dataset.padding} task.force=true`")
    if cfg.task.get("group_by_length") and kind != "chat":
        raise ConfigError("task.group_by_length=true groups chat rows by length; packed "
                          "pretraining rows are all one length (use null or false)")
    return CheckedTraining(cfg=cfg, data_dir=data_dir, manifest=manifest, command=command)


def load_training_data(checked: CheckedTraining) -> TrainingData:
    """Load the prepared rows and their tokenizer; fix the step count and the loop's settings."""
    cfg, data_dir, command = checked.cfg, checked.data_dir, checked.command
    splits, manifest = load_prepared(data_dir, command)
    tokenizer = load_tokenizer(str(data_dir / "tokenizer"))
    if cfg.init_from and is_local(cfg.init_from):
        check_same_vocabulary(load_tokenizer(cfg.init_from), tokenizer, cfg.init_from, data_dir, command)
    resolve_schedule(cfg, len(splits["train"]))
    loop_cfg = LoopConfig.from_cfg(cfg, tokenizer.mask_token_id, manifest.get("padding"))
    validate(loop_cfg, cfg.hardware.num_processes)
    return TrainingData(splits=splits, manifest=manifest, tokenizer=tokenizer, loop_cfg=loop_cfg)


def setup_training(checked: CheckedTraining, data: TrainingData) -> TrainingRun:
    """Return the run in this (launched) process: its accelerator, locked run folder and model."""
    cfg = checked.cfg
    launch = accelerate_settings(cfg)
    accelerator = make_accelerator(data.loop_cfg)
    check_world_size(cfg.hardware.num_processes, accelerator.num_processes)
    if launch.get("distributed_type") in ("FSDP", "DEEPSPEED") and \
            accelerator.distributed_type != launch["distributed_type"]:
        log.warning("hardware.accelerate_config=%s is %s but this run was launched as %s; launch "
                    "with `accelerate launch --config_file %s run.py ...`",
                    cfg.hardware.accelerate_config, launch["distributed_type"],
                    accelerator.distributed_type, cfg.hardware.accelerate_config)
    attention = resolve_attention(
        cfg.model.attn_implementation, accelerator.device.type,
        half_precision=data.loop_cfg.mixed_precision in ("bf16", "fp16") or
        cfg.model.dtype in HALF_DTYPES)
    export_dir = Path(cfg.paths.models) / check_run_name(cfg.run_name)
    check_writable(export_dir.parent, "the export folder")
    folder = run_dir(cfg)
    lock = lock_run_folder(folder) if accelerator.is_main_process else None

    seed_everything(cfg.seed)
    model = build_model(cfg, data.tokenizer, attn_implementation=attention)
    log.info("attention: %s (model.attn_implementation=%s, device %s)", attention,
             cfg.model.attn_implementation, accelerator.device.type)
    wrap = fsdp_layer_names(launch)
    if wrap:  # the launched plugin is checked again in train(); this names the preset's file
        layers_to_wrap(model, wrap, f"hardware.accelerate_config={cfg.hardware.accelerate_config}")
    resuming = cfg.task.resume and (cfg.task.resume_from or ckpt.latest_checkpoint(folder))
    return TrainingRun(cfg=cfg, checked=checked, data=data, accelerator=accelerator,
                       attention=attention, export_dir=export_dir, folder=folder, lock=lock,
                       model=model, resuming=bool(resuming))


def train_run(run: TrainingRun, collate_for, on_eval_for=None) -> Dict[str, object]:
    """Train and export under the run's mlflow run (resumed with it); return the final figures."""
    cfg, data, accelerator, folder = run.cfg, run.data, run.accelerator, run.folder
    data_dir, manifest, tokenizer = run.checked.data_dir, data.manifest, data.tokenizer
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    chat_note = chat_encoding_note(tokenizer)

    def export(mlm, step: int, state_dict=None, stopped: str = "") -> Path:
        run_info = {"run_name": cfg.run_name, "step": step, "task": cfg.task.name,
                    "data": str(data_dir), "fingerprint": manifest.get("fingerprint"),
                    "dataset": cfg.dataset.name, "context": cfg.context.name,
                    "chat_encoding": chat_note, "max_steps": cfg.task.max_steps}
        if stopped:  # stopped before max_steps: why (a reached target, a time cap)
            run_info["stopped"] = stopped
        out = write_export(mlm, tokenizer, run.export_dir, resolved, run_info,
                           state_dict=state_dict)
        tracker.set_tags({"ldm.export": str(out)})
        log.info("exported step %d to %s", step, out)
        return out

    resume_run_id = previous_mlflow_run(folder) if run.resuming else None
    with open_tracker(cfg, resume_run_id=resume_run_id) as tracker:
        if accelerator.is_main_process:
            remember_mlflow_run(folder, tracker.run_id)
            tracker.set_tags({"ldm.run_dir": str(folder), "ldm.attention": run.attention})
            if not run.resuming:  # an mlflow param cannot change; a resumed run may run elsewhere
                log_data_identity(tracker, data_dir, manifest, "training")
                tracker.log_params({"attention": run.attention})
        on_eval = on_eval_for(tokenizer, data.splits["test"], tracker, data_dir, manifest,
                              run.checked.command) if on_eval_for else None
        mark_work_started()
        return train(run.model, tokenizer, data.splits["train"], data.splits["test"],
                     collate_for(tokenizer, manifest, False),
                     data.loop_cfg, accelerator=accelerator, run_dir=folder, tracker=tracker,
                     export=export, resume=bool(cfg.task.resume),
                     resume_from=cfg.task.resume_from, on_eval=on_eval,
                     eval_collate=collate_for(tokenizer, manifest, True))


def report_training(run: TrainingRun, final: Dict[str, object]) -> None:
    """Print (main process) where the export is and its held-out figures."""
    if not run.accelerator.is_main_process:
        return
    print(f"export: {run.export_dir}")
    print(f"held-out NELBO/token {final.get('eval_nelbo', float('nan')):.4f}, "
          f"perplexity bound {final.get('eval_ppl_bound', float('nan')):.2f}")
    if "eval_answer_nelbo" in final:  # chat rows: the same without the EOS padding
        print(f"answer tokens only (EOS padding excluded): NELBO/token "
              f"{final['eval_answer_nelbo']:.4f}, perplexity bound "
              f"{final['eval_answer_ppl_bound']:.2f}")
