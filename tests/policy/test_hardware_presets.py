"""Hardware presets: each composes, names an accelerate config that `accelerate launch` accepts,
agrees with it, and reaches a sensible global batch; FSDP and DeepSpeed settings fit our models.

The accelerate configs are read the way `accelerate launch --config_file` reads them (its
argument parsing and environment preparation, then the plugin built from that environment), so
no GPU is needed. DeepSpeed itself is not installed here: its plugin and the numbers the loop
hands it are checked, not DeepSpeed's own config validation.

Layer: policy, every hardware preset against its accelerate config (in-process), with the
FSDP and DeepSpeed plugin checks those presets rely on.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import BertConfig, BertForMaskedLM, ModernBertConfig, ModernBertForMaskedLM

from conftest import CONF, REPO, compose_config
from ldm.errors import ConfigError
from ldm.train.data import check_batch_layout
from ldm.train.distributed import check_world_size, fit_sharding, layers_to_wrap
from ldm.train.settings import LoopConfig

PRESETS = sorted(p.stem for p in (CONF / "hardware").glob("*.yaml"))
RECIPE_GLOBAL_BATCH = 256  # the original recipe's sequences per optimizer step


def launched_settings(config_file: Path):
    """Return (launch args, environment) that `accelerate launch --config_file` derives."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "run.py"])
    args, defaults, _ = _validate_launch_command(args)
    env = {}
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        env = prepare_deepspeed_cmd_env(args)[1]
    elif args.use_fsdp or args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    return args, {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def plugin_from(config_file: Path, plugin_class):
    """Return the accelerate plugin a process launched with `config_file` builds."""
    from accelerate.utils import patch_environment

    _, env = launched_settings(config_file)
    with patch_environment(**env):
        return plugin_class()


def preset(name: str):
    return compose_config([f"hardware={name}"]).hardware


def tiny_bert():
    return BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=32))


def tiny_modernbert():
    return ModernBertForMaskedLM(ModernBertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                                  num_attention_heads=2, intermediate_size=32,
                                                  pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                  cls_token_id=1, sep_token_id=2))


def test_the_issue_presets_exist():
    assert {"cpu", "gpu1", "a100x4", "h100x8_ddp", "h100x8_fsdp", "deepspeed_zero2"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_and_names_its_own_accelerate_config(name):
    hw = preset(name)
    assert hw.name == name
    assert hw.accelerate_config == f"accelerate_configs/{name}.yaml"
    assert (REPO / hw.accelerate_config).is_file()
    text = (CONF / "hardware" / f"{name}.yaml").read_text()
    assert "defaults:\n  - schema\n  - _self_\n" in text


@pytest.mark.parametrize("name", PRESETS)
def test_accelerate_launch_reads_the_same_layout_as_the_preset(name):
    hw = preset(name)
    args, env = launched_settings(REPO / hw.accelerate_config)
    assert args.num_processes == hw.num_processes
    assert args.mixed_precision == hw.mixed_precision
    assert bool(args.use_cpu) == (hw.accelerator == "cpu")
    if hw.num_processes > 1:
        assert args.multi_gpu or args.use_fsdp or args.use_deepspeed, "launches several processes"


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_reaches_a_sensible_global_batch(name):
    hw = preset(name)
    global_batch = hw.num_processes * hw.micro_batch_size * hw.gradient_accumulation_steps
    if hw.accelerator == "cpu":
        assert global_batch == compose_config(["task=pretrain"]).task.global_batch_size
    else:
        # the recipe runs unchanged on every GPU layout
        assert global_batch == RECIPE_GLOBAL_BATCH
        recipe = compose_config(["experiment=seed_modernbert_large", f"hardware={name}"])
        check_batch_layout(recipe.task.global_batch_size, recipe.hardware.micro_batch_size,
                           recipe.hardware.gradient_accumulation_steps, recipe.hardware.num_processes)


def test_fsdp_preset_is_full_shard_bf16_wrapped_per_layer_with_sharded_state():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    args, env = launched_settings(REPO / preset("h100x8_fsdp").accelerate_config)
    assert args.use_fsdp and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    plugin = plugin_from(REPO / preset("h100x8_fsdp").accelerate_config, FullyShardedDataParallelPlugin)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # = FULL_SHARD
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap == ["BertLayer", "ModernBertEncoderLayer"]
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT


def test_fsdp_layer_classes_are_transformers_classes():
    from transformers.models.bert import modeling_bert
    from transformers.models.modernbert import modeling_modernbert

    assert isinstance(modeling_bert.BertLayer, type)
    assert isinstance(modeling_modernbert.ModernBertEncoderLayer, type)


@pytest.mark.parametrize("build, layer", [(tiny_bert, "BertLayer"),
                                          (tiny_modernbert, "ModernBertEncoderLayer")])
def test_one_fsdp_config_wraps_the_layers_of_bert_and_of_modernbert(build, layer):
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = plugin_from(REPO / preset("h100x8_fsdp").accelerate_config, FullyShardedDataParallelPlugin)
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP,
                                  state=SimpleNamespace(fsdp_plugin=plugin))
    fit_sharding(accelerator, build(), LoopConfig(max_steps=1, global_batch_size=8,
                                                  micro_batch_size=8, accumulation=1, mask_id=3))
    assert plugin.transformer_cls_names_to_wrap == [layer]


def test_fsdp_layer_class_the_model_lacks_is_refused_naming_the_ones_it_has():
    with pytest.raises(ConfigError) as err:
        layers_to_wrap(tiny_modernbert(), ["BertLayer"], "accelerate_configs/x.yaml")
    message = str(err.value)
    assert "fsdp_transformer_layer_cls_to_wrap=BertLayer" in message
    assert "accelerate_configs/x.yaml" in message and "ModernBertEncoderLayer" in message


def test_deepspeed_preset_is_zero2_and_gets_the_micro_batch_and_clipping_from_the_preset():
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    hw = preset("deepspeed_zero2")
    args, env = launched_settings(REPO / hw.accelerate_config)
    assert args.use_deepspeed and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    plugin = plugin_from(REPO / hw.accelerate_config, DeepSpeedPlugin)
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == 2
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                                  state=SimpleNamespace(deepspeed_plugin=plugin))
    cfg = LoopConfig(max_steps=1, global_batch_size=256, micro_batch_size=hw.micro_batch_size,
                     accumulation=hw.gradient_accumulation_steps, mask_id=3, grad_clip=1.0)
    fit_sharding(accelerator, tiny_bert(), cfg)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == hw.micro_batch_size
    assert plugin.deepspeed_config["gradient_clipping"] == 1.0


def test_deepspeed_accumulation_that_disagrees_with_the_preset_is_refused():
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    plugin = DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=4)
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                                  state=SimpleNamespace(deepspeed_plugin=plugin))
    cfg = LoopConfig(max_steps=1, global_batch_size=256, micro_batch_size=32, accumulation=1,
                     mask_id=3)
    with pytest.raises(ConfigError, match="hardware.gradient_accumulation_steps=1"):
        fit_sharding(accelerator, tiny_bert(), cfg)


def test_launched_process_count_must_match_hardware_num_processes():
    check_world_size(8, 8)
    with pytest.raises(ConfigError) as err:
        check_world_size(8, 1)
    assert "hardware.num_processes=8" in str(err.value) and "1 process(es)" in str(err.value)


def test_fsdp_preset_reduces_gradients_in_fp32_like_the_ddp_presets():
    import torch
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = plugin_from(REPO / preset("h100x8_fsdp").accelerate_config, FullyShardedDataParallelPlugin)
    plugin.set_mixed_precision("bf16")  # what AcceleratorState does for mixed_precision: bf16
    assert plugin.mixed_precision_policy.reduce_dtype == torch.bfloat16, "accelerate's default"
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP,
                                  state=SimpleNamespace(fsdp_plugin=plugin))
    fit_sharding(accelerator, tiny_modernbert(), LoopConfig(max_steps=1, global_batch_size=8,
                                                            micro_batch_size=1, accumulation=1,
                                                            mask_id=3))
    policy = plugin.mixed_precision_policy
    assert policy.reduce_dtype == torch.float32
    assert policy.param_dtype == torch.bfloat16, "compute stays bf16"


@pytest.mark.parametrize("name", PRESETS)
def test_no_preset_sets_an_option_nothing_reads(name):
    assert "dataloader_workers" not in (CONF / "hardware" / f"{name}.yaml").read_text()


def test_hardware_threads_sets_torchs_cpu_threads_and_refuses_a_count_below_one():
    import torch

    from ldm.errors import LdmError
    from ldm.tasks import set_threads

    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads(None)  # null keeps what torch has
        assert torch.get_num_threads() == 1
        with pytest.raises(LdmError, match=r"hardware.threads=0 must be an integer >= 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)
