"""Multi-process specifics of the loop: world size, FSDP layer wrapping, DeepSpeed settings,
and exporting from sharded weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Sequence

import torch

from ldm.errors import ConfigError
from ldm.model import unwrap

if TYPE_CHECKING:  # the loop imports this module; only the type is needed here
    from ldm.train.loop import LoopConfig


def check_world_size(configured: int, launched: int) -> None:
    """Raise ConfigError unless the launcher started hardware.num_processes processes.

    An error, not a warning: the global batch, the data each rank reads and the step count all
    assume the configured layout, and `accelerate launch --cpu --num_processes N` (no MPI)
    silently starts one process.
    """
    if configured != launched:
        raise ConfigError(
            f"hardware.num_processes={configured} but this run was launched as {launched} "
            f"process(es); start it with `accelerate launch --num_processes {configured} run.py ...` "
            f"(on CPU: `torchrun --nproc_per_node {configured} run.py ...`) or set "
            f"hardware.num_processes={launched}")


def layer_classes(model: torch.nn.Module) -> List[str]:
    """Return the class names of the repeated blocks (items of a ModuleList) of `model`."""
    return sorted({type(block).__name__ for blocks in model.modules()
                   if isinstance(blocks, torch.nn.ModuleList) for block in blocks})


def layers_to_wrap(model: torch.nn.Module, names: Sequence[str], source: str) -> List[str]:
    """Return the FSDP layer classes in `names` that `model` has; ConfigError when it has none.

    One FSDP config lists the layer classes of several families (BertLayer for BERT,
    ModernBertEncoderLayer for ModernBERT); the ones this model lacks are dropped.
    """
    present = {type(module).__name__ for module in model.modules()}
    found = [name for name in names if name in present]
    if not found:
        raise ConfigError(
            f"fsdp_transformer_layer_cls_to_wrap={','.join(names)} ({source}) names no module class "
            f"of {type(model).__name__}, so FSDP cannot wrap its layers; its layer classes: "
            f"{', '.join(layer_classes(model)) or 'none'}")
    return found


def fit_sharding(accelerator, model: torch.nn.Module, cfg: LoopConfig) -> None:
    """Point FSDP's layer wrapping and DeepSpeed's batch numbers at this model and config."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        names = plugin.transformer_cls_names_to_wrap or layer_classes(model)
        plugin.transformer_cls_names_to_wrap = layers_to_wrap(model, names, "the launched FSDP config")
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        # no dataloader is prepared, so DeepSpeed learns its micro-batch and clipping from us
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds.get("gradient_accumulation_steps", "auto") not in ("auto", cfg.accumulation):
            raise ConfigError(
                f"the DeepSpeed config accumulates {ds['gradient_accumulation_steps']} micro-batches "
                f"but hardware.gradient_accumulation_steps={cfg.accumulation}; remove "
                "gradient_accumulation_steps from the accelerate config or make them agree")
        for key, value in (("train_micro_batch_size_per_gpu", cfg.micro_batch_size),
                           ("gradient_clipping", cfg.grad_clip)):
            if ds.get(key, "auto") == "auto":
                ds[key] = value


def export_main(accelerator, wrapped, export: Callable[..., Path], step: int) -> None:
    """Export the masked LM from the main process; FSDP shards are gathered by every process."""
    from accelerate.utils import DistributedType

    weights = None
    if accelerator.distributed_type == DistributedType.FSDP:
        full = accelerator.get_state_dict(wrapped)
        weights = {k[len("mlm."):]: v for k, v in full.items() if k.startswith("mlm.")}
    if accelerator.is_main_process:
        mlm = unwrap(accelerator.unwrap_model(wrapped)).mlm
        if weights is None:
            export(mlm, step)
        else:
            export(mlm, step, state_dict=weights)
