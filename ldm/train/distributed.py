"""Multi-process specifics of the loop: world size, FSDP layer wrapping and gradient precision,
DeepSpeed settings, and exporting fp32 weights from sharded or mixed-precision engines."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Sequence

import torch

from ldm.errors import ConfigError
from ldm.model import unwrap
from ldm.ranks import node_rank
from ldm.train.settings import LoopConfig


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


def joined_line(accelerator, plan, step: int) -> str:
    """Return the line every process logs as it starts training: where it runs (global rank,
    machine, local rank, host) and the rows it reads of optimizer step `step` (0-based)."""
    rank = accelerator.process_index
    rows = sorted(int(i) for micro in range(plan.accumulation) for i in plan.indices(step, micro, rank))
    return (f"rank {rank} of {accelerator.num_processes} joined (machine {node_rank()}, local rank "
            f"{accelerator.local_process_index}, host {socket.gethostname()}); step {step + 1} "
            f"reads rows {rows}")


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


def check_deepspeed(distributed_type, skip_nonfinite: bool) -> None:
    """Raise ConfigError for task.skip_nonfinite=true under DeepSpeed, which cannot skip a step.

    accelerate's DeepSpeed wrapper steps the engine inside `backward`, so the update of a
    non-finite step is applied before the loop can look at the loss or the gradient norm.
    """
    if skip_nonfinite and distributed_type == "DEEPSPEED":  # DistributedType is a str enum
        raise ConfigError(
            "task.skip_nonfinite=true cannot be honoured under DeepSpeed (its engine applies the "
            "update inside backward, before the loop sees the loss); set task.skip_nonfinite=false "
            "or use a DDP/FSDP hardware preset")


def fp32_reduce_policy(policy):
    """Return the FSDP mixed-precision `policy` with gradients reduced in fp32 (None stays None).

    accelerate's bf16 policy reduces gradients in bf16; the DDP presets all-reduce fp32
    gradients, and the presets must train the same model.
    """
    if policy is None or getattr(policy, "reduce_dtype", None) in (None, torch.float32):
        return policy
    return dataclasses.replace(policy, reduce_dtype=torch.float32)


@contextlib.contextmanager
def keep_fp32_buffers(model: torch.nn.Module, pattern: str = "inv_freq") -> Iterator[None]:
    """Restore `model`'s fp32 buffers named *pattern* after the block (which may cast the model).

    DeepSpeed's bf16 mode casts the whole module, buffers too; ModernBERT's rotary inv_freq in
    bf16 is off by up to ~1 rad at position 1023. The rotary embedding computes its angles in
    fp32 from these buffers, so restoring them restores exact positions.
    """
    saved = {(module, name): buf.detach().clone()
             for module in model.modules() for name, buf in module.named_buffers(recurse=False)
             if pattern in name and buf is not None and buf.dtype == torch.float32}
    yield
    for (module, name), value in saved.items():
        current = module._buffers.get(name)
        if current is not None and current.dtype != torch.float32:
            module._buffers[name] = value.to(current.device)


def fit_sharding(accelerator, model: torch.nn.Module, cfg: LoopConfig) -> None:
    """Point FSDP's layer wrapping, gradient precision and DeepSpeed's batch numbers at this run."""
    from accelerate.utils import DistributedType  # lazy: accelerate is slow to import (startup)

    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        names = plugin.transformer_cls_names_to_wrap or layer_classes(model)
        plugin.transformer_cls_names_to_wrap = layers_to_wrap(model, names, "the launched FSDP config")
        # before prepare: fully_shard takes the policy when it wraps the layers
        plugin.mixed_precision_policy = fp32_reduce_policy(plugin.mixed_precision_policy)
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


def fp32_state_dict(mlm: torch.nn.Module, full_fp32: Callable[[torch.nn.Parameter], object]
                    ) -> Dict[str, torch.Tensor]:
    """Return `mlm`'s state dict with every parameter replaced by `full_fp32(param)` (fp32, CPU).

    Tied parameters (decoder = embeddings) map to one tensor under each of their names; floating
    buffers are cast to fp32. `full_fp32` returns None for a parameter it holds no master of.
    """
    masters: Dict[int, torch.Tensor] = {}
    by_name: Dict[str, torch.Tensor] = {}
    for name, param in mlm.named_parameters(remove_duplicate=False):
        if id(param) not in masters:
            full = full_fp32(param)
            masters[id(param)] = (param.detach() if full is None else full).float().cpu()
        by_name[name] = masters[id(param)]
    out = {}
    for key, value in mlm.state_dict().items():
        out[key] = by_name.get(key, value.float().cpu() if value.is_floating_point() else value.cpu())
    return out


def export_main(accelerator, wrapped, export: Callable[..., Path], step: int) -> None:
    """Export the masked LM from the main process in fp32.

    FSDP shards are gathered by every process; under DeepSpeed every process joins in assembling
    the fp32 master weights from the optimizer's partitions (the module holds bf16 copies).
    """
    from accelerate.utils import DistributedType  # lazy: accelerate is slow to import (startup)

    weights = None
    if accelerator.distributed_type == DistributedType.FSDP:
        full = accelerator.get_state_dict(wrapped)
        weights = {k[len("mlm."):]: v for k, v in full.items() if k.startswith("mlm.")}
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        from deepspeed.utils import safe_get_full_fp32_param  # lazy: deepspeed is an optional extra

        weights = fp32_state_dict(unwrap(accelerator.unwrap_model(wrapped)).mlm,
                                  safe_get_full_fp32_param)
    if accelerator.is_main_process:
        mlm = unwrap(accelerator.unwrap_model(wrapped)).mlm
        if weights is None:
            export(mlm, step)
        else:
            export(mlm, step, state_dict=weights)
