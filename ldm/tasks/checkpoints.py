"""The task side of the export contract: the export a task runs, and the config groups it brings.

`task=sample checkpoint=<export>` and `task=evaluate checkpoint=<export>` need no `model=` or
`context=`: `with_export_groups` puts the export's own groups into the task's config. The user's
explicit command-line choices still apply where they can: a load setting (`model.dtype=...`), or
another dataset or masking to evaluate on. An explicit `model=`/`context=` (or a `model.*`,
`context.*` value) that differs from what the export was trained with is an error naming both.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from ldm.config import GROUP_SCHEMAS
from ldm.errors import ConfigError, LdmError
from ldm.export import LOAD_SETTINGS, Export, read_export
from ldm.hub import is_local

FIXED_GROUPS = ("model", "context")  # what the weights were trained as: never contradicted
FREE_GROUPS = ("dataset", "masking")  # defaults from the export; an explicit choice wins


def resolve_checkpoint(checkpoint: Optional[str], task: str) -> Export:
    """Return the export (or hub model) `checkpoint=` names; raise ConfigError when unset."""
    if not checkpoint:
        raise ConfigError(f"task={task} needs checkpoint=<export dir or hub id>; task=pretrain "
                          "and task=sft write exports to outputs/models/<run_name>")
    return read_export(checkpoint, "checkpoint")


def command_line_overrides() -> List[str]:
    """Return this job's command-line overrides (empty outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _explicit(overrides: Sequence[str], group: str) -> Tuple[Optional[str], List[str]]:
    """Return (the option chosen as `group=...` or None, the keys set as `group.<key>=...`)."""
    choice, keys = None, []
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if key == group:
            choice = value
        elif key.startswith(group + "."):
            keys.append(key[len(group) + 1:])
    return choice, keys


def with_export_groups(cfg: DictConfig, export: Export, setting: str = "checkpoint",
                       groups: Sequence[str] = FIXED_GROUPS + FREE_GROUPS,
                       overrides: Optional[Sequence[str]] = None) -> DictConfig:
    """Return a copy of `cfg` whose `groups` come from the export's own config.

    `overrides` are the explicit command-line overrides (default: this Hydra job's). Outside a
    Hydra app (a composed config handed to a task's `run`) nothing tells a default from a choice,
    so every group of `cfg` counts as chosen: model and context must then equal the export's, and
    dataset and masking are kept. For a hub model or a folder without ldm_config.yaml the config
    is returned unchanged.
    """
    if not export.from_ldm:
        return cfg
    from hydra.core.hydra_config import HydraConfig

    if overrides is None and not HydraConfig.initialized():
        overrides = [f"{g}={cfg[g].name}" for g in groups] + [
            f"{g}.{key}" for g in FIXED_GROUPS if g in groups for key in _leaves(cfg[g])]
    overrides = command_line_overrides() if overrides is None else list(overrides)
    out = copy.deepcopy(cfg)
    for group in groups:
        stored = export.group(group)
        if stored is None:
            continue
        choice, keys = _explicit(overrides, group)
        if group in FIXED_GROUPS:
            _check_agrees(cfg, stored, group, choice, keys, setting, export.where)
        elif choice is not None:
            continue  # another dataset or masking, chosen on purpose
        node = OmegaConf.create(stored)
        for key in keys:  # load settings and free groups' values keep the user's explicit value
            OmegaConf.update(node, key, OmegaConf.select(cfg[group], key), merge=False)
        try:
            typed = OmegaConf.merge(OmegaConf.structured(GROUP_SCHEMAS[group]), node)
        except Exception as err:  # an export of an older schema: name it, do not guess
            raise LdmError(f"{setting}={export.where}: its ldm_config.yaml {group} group does not "
                           f"fit this ldm's schema ({str(err).splitlines()[0]}); export it "
                           "again") from err
        with open_dict(out):
            out[group] = typed
    return out


def _leaves(node: DictConfig, prefix: str = "") -> List[str]:
    """Return the dotted keys of every leaf value of `node`."""
    keys = []
    for key, value in node.items():
        if isinstance(value, DictConfig) and len(value):
            keys.extend(_leaves(value, f"{prefix}{key}."))
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _check_agrees(cfg: DictConfig, stored: Dict, group: str, choice: Optional[str],
                  keys: Sequence[str], setting: str, where: str) -> None:
    """Raise ConfigError when an explicit choice of `group` contradicts the export's."""
    if choice is not None and choice != stored.get("name"):
        raise ConfigError(f"{group}={choice} contradicts {setting}={where}, which was trained "
                          f"with {group}={stored.get('name')}; drop {group}= (the export's is "
                          "used)")
    for key in keys:
        if group == "model" and key.split(".")[0] in LOAD_SETTINGS:
            continue
        theirs = OmegaConf.select(OmegaConf.create(stored), key, default=None)
        ours = OmegaConf.select(cfg[group], key, default=None)
        theirs, ours = (OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig,
                        ListConfig)) else v for v in (theirs, ours))
        if theirs != ours and key != "name":
            raise ConfigError(f"{group}.{key}={ours} contradicts {setting}={where}, which was "
                              f"trained with {group}.{key}={theirs}; drop {group}.{key}= (the "
                              "export's is used)")


def with_init_from_model(cfg: DictConfig) -> DictConfig:
    """Return `cfg` with the model group of the init_from export (unchanged without one).

    A run that starts from an export trains that model: its `model=` group comes from the
    export, and an explicit `model=` that contradicts it is an error naming both.
    """
    if not cfg.init_from or not is_local(cfg.init_from):
        return cfg
    export = read_export(cfg.init_from, "init_from")
    return with_export_groups(cfg, export, "init_from", groups=("model",))
