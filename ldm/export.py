"""The export contract: what training writes at outputs/models/<run_name> and every later stage
reads back, through `write_export` and `read_export` alone.

An export is a Hugging Face folder (config.json, model.safetensors, tokenizer files with the chat
template) plus two files of ours:

- `ldm_export.json`: the export format, library versions, the mask and EOS ids, and the identity
  of what it was trained on (run name, step, task, prepared-data folder and fingerprint, dataset
  and context names);
- `ldm_config.yaml`: the resolved config of the run that wrote it, whose `model`, `context`,
  `dataset` and `masking` groups a later stage uses instead of asking for them again.

`read_export` also accepts a hub id or a plain Hugging Face folder (no ldm files): then only the
weights, tokenizer and config.json are known. One rule tells the two apart: `ldm.hub.is_local`.
Resumable training checkpoints are something else and live in `ldm/train/checkpoint.py`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from ldm.errors import ConfigError, LdmError
from ldm.hub import is_local

INFO_FILE = "ldm_export.json"
CONFIG_FILE = "ldm_config.yaml"
EXPORT_FORMAT = 1  # bump when an export's layout changes in a way older ldm cannot read
COMPAT_LIBRARIES = ("transformers", "torch")  # an export needs the same major version of these
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")  # safetensors only
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")  # what a fast tokenizer is built from
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Model settings that only say how to load the weights: a later stage may change them freely.
LOAD_SETTINGS = ("dtype", "attn_implementation", "trust_remote_code", "compile",
                 "gradient_checkpointing", "dropout")


EXPORT_LIBRARIES = ("ldm", "torch", "transformers", "tokenizers", "safetensors", "accelerate")


def library_versions(names: Sequence[str] = EXPORT_LIBRARIES) -> Dict[str, str]:
    """Return the installed versions of `names` (default: the libraries that shape an export)."""
    import importlib.metadata as md

    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def write_export(model, tokenizer, out_dir: str | Path, run_config: str | Mapping[str, Any],
                 info: Mapping[str, Any], state_dict: Optional[Dict[str, Any]] = None) -> Path:
    """Write an export (safetensors + tokenizer + ldm files) atomically; return its folder.

    `run_config` is the resolved config of the run (YAML text or a mapping); `info` the identity
    of what was trained (run_name, step, task, data, fingerprint, ...). `state_dict` replaces the
    model's own weights (FSDP: the gathered full weights). Nothing is replaced on failure.
    """
    import yaml
    from safetensors import SafetensorError

    from ldm.data.store import atomic_folder
    from ldm.faults import kill_point

    out_dir = Path(out_dir)
    config_text = run_config if isinstance(run_config, str) else \
        yaml.safe_dump(dict(run_config), sort_keys=False)
    ids = {"mask_id": tokenizer.mask_token_id, "eos_id": tokenizer.eos_token_id}
    if info.get("data") and "conversations" not in info:
        turns = conversation_turns(info["data"])
        if turns is not None:  # chat data: whether a model may be asked follow-ups
            info = {**info, "conversations": turns}
    try:
        with atomic_folder(out_dir) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
            kill_point("export")
            tokenizer.save_pretrained(str(tmp))
            (tmp / CONFIG_FILE).write_text(config_text)
            (tmp / INFO_FILE).write_text(json.dumps(
                {**ids, **info, "format": EXPORT_FORMAT, "versions": library_versions()},
                indent=2, default=str))
    except (OSError, RuntimeError, SafetensorError) as err:
        raise LdmError(f"could not write the export {out_dir}: {err}; nothing there was replaced. "
                       "Free space and re-run the same command: it resumes from the last "
                       "checkpoint and exports again") from err
    return out_dir


def conversation_turns(data_dir: str | Path) -> Optional[Dict[str, Any]]:
    """Return {most_user_turns, multi_turn} of prepared chat data's rows, else None.

    None when `data_dir` holds no prepared chat data (text data, a moved folder). A row with
    more than one user turn makes the data multi-turn: a model trained on none has never seen a
    follow-up question, so the page sends each message alone to it.
    """
    import numpy as np

    folder = Path(data_dir)
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    user_id = (manifest.get("chat_tokens") or {}).get("<|user|>") \
        if isinstance(manifest, dict) and manifest.get("kind") == "chat" else None
    shards = sorted(folder.glob("*/shard-*.arrow"))  # both splits: all the data it was made of
    if user_id is None or not shards:
        return None
    import pyarrow as pa

    most = 0
    for shard in shards:
        with pa.memory_map(str(shard)) as source:
            table = pa.ipc.open_stream(source).read_all()
        for chunk in table.column("input_ids").chunks:
            rows = len(chunk)
            if not rows:
                continue
            width = chunk.type.list_size if pa.types.is_fixed_size_list(chunk.type) else None
            flat = chunk.flatten().to_numpy(zero_copy_only=False) == user_id
            if width is not None:
                counts = flat.reshape(rows, width).sum(1)
            else:
                offsets = chunk.offsets.to_numpy()[: rows + 1] - chunk.offsets[0].as_py()
                counts = np.add.reduceat(np.append(flat, False).astype(np.int64),
                                         offsets[:-1]) * (np.diff(offsets) > 0)
            most = max(most, int(counts.max()))
    return {"most_user_turns": most, "multi_turn": most > 1}


def _major(version: str) -> Optional[int]:
    match = re.match(r"\d+", str(version))
    return int(match.group()) if match else None


def check_export_compatible(folder: str | Path) -> Dict[str, Any]:
    """Return an export's ldm_export.json ({} for a plain Hugging Face folder), or raise LdmError.

    Refuses an export of a newer export format than this ldm reads, or one made with another
    major version of a library in COMPAT_LIBRARIES than the one installed.
    """
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise LdmError(f"{path} is not valid JSON ({err}); the export is damaged, export it "
                       "again") from err
    if not isinstance(info, dict):
        raise LdmError(f"{path} holds {type(info).__name__}, not an object; export it again")
    made = info.get("versions") if isinstance(info.get("versions"), dict) else {}
    fmt = info.get("format", 1)
    if not isinstance(fmt, int) or fmt > EXPORT_FORMAT:
        raise LdmError(f"export {folder} has export format {fmt!r} (made by ldm "
                       f"{made.get('ldm', '?')}); this ldm reads formats up to {EXPORT_FORMAT}: "
                       "upgrade ldm")
    installed = library_versions()
    for name in COMPAT_LIBRARIES:
        if made.get(name) and installed.get(name) and \
                _major(made[name]) != _major(installed[name]):
            raise LdmError(f"export {folder} was made with {name} {made[name]} but {name} "
                           f"{installed[name]} is installed; another major version may not load "
                           f"it the same way: install {name}=={_major(made[name])}.* or export "
                           "it again with this installation")
    return info


@dataclass
class Export:
    """An export (or hub model) read back: where it is, what it is, what it was trained on."""

    where: str  # absolute folder, or the hub id
    hub: bool
    config: Dict[str, Any]  # config.json
    info: Dict[str, Any] = field(default_factory=dict)  # ldm_export.json ({} if none)
    run_config: Optional[Dict[str, Any]] = None  # ldm_config.yaml (None if none)

    @property
    def from_ldm(self) -> bool:
        """Return True when the export carries the config of the run that made it."""
        return self.run_config is not None

    @property
    def max_positions(self) -> Optional[int]:
        """Return the model's position limit from config.json (None if it has none)."""
        return self.config.get("max_position_embeddings")

    @property
    def mask_id(self) -> Optional[int]:
        """Return the mask id the model was trained with (None: ask the tokenizer)."""
        return self.info.get("mask_id")

    @property
    def eos_id(self) -> Optional[int]:
        """Return the EOS id the model was trained with (None: ask the tokenizer)."""
        return self.info.get("eos_id")

    def group(self, name: str) -> Optional[Dict[str, Any]]:
        """Return the run's `name` config group (model, context, dataset, masking) or None."""
        node = (self.run_config or {}).get(name)
        return dict(node) if isinstance(node, dict) else None

    @property
    def load_settings(self) -> Dict[str, Any]:
        """Return how the weights were loaded in training (dtype, attention, remote code)."""
        model = self.group("model") or {}
        return {k: model[k] for k in ("dtype", "attn_implementation", "trust_remote_code")
                if k in model}

    @property
    def data(self) -> Dict[str, Any]:
        """Return the identity of the prepared data it was trained on (folder, fingerprint)."""
        return {k: self.info[k] for k in ("data", "fingerprint", "dataset", "context")
                if k in self.info}

    @property
    def multi_turn(self) -> Optional[bool]:
        """Return whether its SFT data had multi-turn conversations (None when unknown).

        Read from ldm_export.json, or, for an export written before it was recorded there, from
        the prepared data it names when that folder is still on this machine.
        """
        turns = self.info.get("conversations")
        if not isinstance(turns, dict) and self.info.get("data"):
            turns = conversation_turns(self.info["data"])
        return bool(turns["multi_turn"]) if isinstance(turns, dict) else None

    def load_tokenizer(self):
        """Return the export's tokenizer (mask and EOS tokens set)."""
        from ldm.tokenizer import load_tokenizer

        return load_tokenizer(self.where)

    def load_model(self, *, dtype: Optional[str] = None, attn_implementation: Optional[str] = None,
                   trust_remote_code: Optional[bool] = None, vocab_size: Optional[int] = None,
                   device=None, missing_keys_ok: Sequence[str] = ()):
        """Return the masked LM in eval mode on `device`; None settings take the export's own.

        `vocab_size` (the tokenizer's length) is checked: a model with fewer embeddings than its
        tokenizer has tokens is an inconsistent export.
        """
        from ldm.model import load_model

        given = {"dtype": dtype, "attn_implementation": attn_implementation,
                 "trust_remote_code": trust_remote_code}
        settings = {**{"dtype": "float32", "attn_implementation": "sdpa",
                       "trust_remote_code": False}, **self.load_settings,
                    **{k: v for k, v in given.items() if v is not None}}
        model = load_model("hub" if self.hub else "export", self.where,
                           missing_keys_ok=missing_keys_ok, **settings)
        rows = model.get_input_embeddings().num_embeddings
        if vocab_size is not None and rows < vocab_size:
            raise LdmError(f"checkpoint={self.where!r}: the model has {rows} embeddings but its "
                           f"tokenizer {vocab_size} tokens; the export is inconsistent")
        return (model.to(device) if device is not None else model).eval()


def _read_run_config(folder: Path) -> Optional[Dict[str, Any]]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise LdmError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); the export is "
                       "damaged, export it again") from err
    if not isinstance(data, dict):
        raise LdmError(f"{path} holds {type(data).__name__}, not a mapping; export it again")
    return data


def read_export(where: Optional[str], what: str = "checkpoint") -> Export:
    """Return the export at `where` (a complete, compatible folder) or the hub model it names.

    `what` names the setting in error messages (checkpoint, init_from). Raises ConfigError for a
    missing or incomplete folder or a name that is neither, LdmError for a damaged or
    incompatible export, HubUnavailableError for a hub id while the hub cannot be reached.
    """
    if not where:
        raise ConfigError(f"{what} is not set; pass an export dir or a hub id")
    folder = Path(str(where)).expanduser()
    if is_local(str(where)):
        lacking = [name for name, files in (("config.json", ("config.json",)),
                                            ("model weights (model.safetensors)", WEIGHT_FILES),
                                            ("tokenizer (tokenizer.json)", TOKENIZER_FILES))
                   if not any((folder / f).is_file() for f in files)]
        if lacking:
            raise ConfigError(f"{what}={where!r} is not an export: it has no "
                              f"{', no '.join(lacking)}")
        try:
            config = json.loads((folder / "config.json").read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise ConfigError(f"{what}={where!r} has a damaged config.json ({err}); "
                              "export it again") from err
        info = check_export_compatible(folder)
        return Export(str(folder.resolve()), False, config, info, _read_run_config(folder))
    if folder.exists() or not HUB_ID.match(str(where)):
        raise ConfigError(f"{what}={where!r} does not exist: it is neither an export "
                          "folder nor a hub id")
    from transformers import AutoConfig

    from ldm.hub import require_hub

    try:
        config = AutoConfig.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError):
        require_hub(f"{what}={where!r} (not a local folder, so a hub id)",
                    "an export folder from outputs/models/")
        try:
            config = AutoConfig.from_pretrained(where)
        except (OSError, ValueError) as err:
            raise LdmError(f"{what}={where!r} is neither a local folder nor a model on "
                           f"the hub: {str(err).splitlines()[0]}") from err
    return Export(str(where), True, config.to_dict())
