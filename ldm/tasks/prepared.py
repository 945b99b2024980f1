"""Where prepared data lives and what it was made from: used by prepare and the stages reading it.

Data made from files the user names sits in a folder keyed by those files' paths
(`<dataset>-<key>`); a later stage compares the sources its config names with the manifest's.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

from omegaconf import DictConfig

from ldm.data import identity, store


def data_dir_for(cfg: DictConfig, named: dict) -> Path:
    """Return where data of this config made from the sources `named` lives.

    `outputs/data/<dataset>/<tokenizer>/<context>`; a data set made from files the user names
    gets the key of those files' paths: `<dataset>-<key>`, so other files never share its folder.
    """
    key = identity.source_key(named)
    name = f"{cfg.dataset.name}-{key}" if key else cfg.dataset.name
    return store.data_dir(cfg.paths.data, name, cfg.model.tokenizer_name, cfg.context.name)


def prepare_command(cfg: DictConfig) -> str:
    """Return the command line that prepares the data this config needs."""
    command = (f"python run.py task=prepare dataset={cfg.dataset.name} model={cfg.model.name} "
               f"context={cfg.context.name}")
    if cfg.dataset.get("paths"):
        command += f" 'dataset.paths=[{','.join(str(p) for p in cfg.dataset.paths)}]'"
    return command


def check_sources(folder: Path, manifest: dict, named: dict, command: str) -> None:
    """Raise DataError when the sources `named` differ from those `folder` was made from."""
    from ldm.errors import DataError

    prepared = manifest.get("source")
    problem = identity.differences(named, prepared) if prepared is not None else "none recorded"
    if problem:
        raise DataError(f"the prepared data at {folder} was made from "
                        f"{identity.summary(prepared)}, but this run names "
                        f"{identity.summary(named)} ({problem}); run `{command}` to prepare "
                        "these sources")


def missing_data_message(cfg: DictConfig, folder: Path, command: str, named: dict) -> str:
    """Return the error for absent prepared data, naming data of this set made from other sources."""
    root = Path(cfg.paths.data)
    others = []
    for candidate in sorted(root.glob(f"{glob.escape(cfg.dataset.name)}*")):
        where = candidate / cfg.model.tokenizer_name / cfg.context.name
        manifest = store.read_manifest(where)
        if where != folder and manifest is not None and manifest.get("dataset") == cfg.dataset.name:
            others.append(f"{where} from {identity.summary(manifest.get('source'))}")
    text = f"no prepared data at {folder}"
    if others:
        text += (f" for {identity.summary(named)}; prepared data of "
                 f"dataset={cfg.dataset.name} exists only for other sources: {'; '.join(others[:2])}")
    return text + f"; run `{command}` first"


def log_data_identity(tracker, folder: Path, manifest: dict, context: str) -> None:
    """Record which prepared data a run used: folder, fingerprint, sources, an mlflow dataset."""
    source = manifest.get("source")
    tracker.set_tags({"ldm.data_dir": str(folder), "ldm.fingerprint": manifest.get("fingerprint"),
                      "ldm.data_sources": identity.summary(source)[:5000]})
    tracker.log_text(json.dumps(source, indent=2, sort_keys=True, default=str) + "\n",
                     "data/sources.json")
    splits = manifest.get("splits", {})
    profile = {split: {k: v for k, v in st.items() if k in ("documents", "examples", "rows",
                                                              "kept", "tokens", "answer_tokens",
                                                              "unknown_tokens")}
               for split, st in splits.items()}
    tracker.log_dataset(name=f"{manifest.get('dataset', folder.name)}/{folder.parent.name}/"
                             f"{folder.name}", digest=str(manifest.get("fingerprint")),
                        source=str(folder), profile=profile, context=context)
