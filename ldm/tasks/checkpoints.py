"""Finding the model that sample and evaluate run: an export folder, or a hub id."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from ldm.errors import ConfigError, LdmError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")  # what a fast tokenizer is built from


@dataclass
class Checkpoint:
    """Where the model is (export folder or hub id), its config.json, and its mask id."""

    where: str
    hub: bool
    config: Dict[str, Any]
    mask_id: Optional[int] = None

    @property
    def max_positions(self) -> Optional[int]:
        """Return the model's position limit from config.json (None if it has none)."""
        return self.config.get("max_position_embeddings")


def resolve_checkpoint(checkpoint: Optional[str], task: str) -> Checkpoint:
    """Return the checkpoint: a complete, compatible export folder, else a reachable hub id."""
    from ldm.train.checkpoint import check_export_compatible

    if not checkpoint:
        raise ConfigError(f"task={task} needs checkpoint=<export dir or hub id>; task=pretrain "
                          "and task=sft write exports to outputs/models/<run_name>")
    folder = Path(checkpoint).expanduser()
    if folder.is_dir():
        lacking = [what for what, names in (("config.json", ("config.json",)),
                                            ("model weights (model.safetensors)", WEIGHT_FILES),
                                            ("tokenizer (tokenizer.json)", TOKENIZER_FILES))
                   if not any((folder / n).is_file() for n in names)]
        if lacking:
            raise ConfigError(f"checkpoint={checkpoint!r} is not an export: it has no "
                              f"{', no '.join(lacking)}; pass a folder from outputs/models/ or a "
                              "hub id")
        try:
            config = json.loads((folder / "config.json").read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise ConfigError(f"checkpoint={checkpoint!r} has a damaged config.json ({err}); "
                              "export it again") from err
        info = check_export_compatible(folder)
        return Checkpoint(str(folder.resolve()), False, config, info.get("mask_id"))
    if folder.exists() or not HUB_ID.match(checkpoint):
        raise ConfigError(f"checkpoint={checkpoint!r} does not exist: it is neither an export "
                          "folder nor a hub id; pass a folder from outputs/models/ or a hub id")
    from transformers import AutoConfig

    from ldm.hub import require_hub

    try:
        config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    except (OSError, ValueError):
        require_hub(f"checkpoint={checkpoint!r} (not a local folder, so a hub id)",
                    "an export folder from outputs/models/")
        try:
            config = AutoConfig.from_pretrained(checkpoint)
        except (OSError, ValueError) as err:
            raise LdmError(f"checkpoint={checkpoint!r} is neither a local folder nor a model on "
                           f"the hub: {str(err).splitlines()[0]}") from err
    return Checkpoint(checkpoint, True, config.to_dict())
