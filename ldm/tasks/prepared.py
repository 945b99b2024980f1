"""Where prepared data lives and what it was made from: used by prepare and the stages reading it.

Data made from files the user names sits in a folder keyed by those files' paths
(`<dataset>-<key>`); a later stage compares the sources its config names with the manifest's.
`find_prepared` is the one way a stage finds the prepared data it needs and checks it.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Tuple

from omegaconf import DictConfig, OmegaConf

from ldm.data import identity, mixture, sources, store
from ldm.errors import ConfigError, DataError

CHAT_PART_KEYS = ("source", "paths", "hub", "max_documents", "task_types", "difficulty",
                  "skip_bad_records")


def is_mixture(ds: DictConfig) -> bool:
    """True when the data set is a weighted mixture (`dataset.mixture` set or source: mixture)."""
    return bool(ds.mixture) or ds.source == "mixture"


def mixture_parts(ds: DictConfig) -> list:
    """Return the components of `dataset.mixture` as complete, checked dicts."""
    return mixture.components(OmegaConf.to_container(ds.mixture, resolve=True), ds.kind,
                              ds.mixture_stop, ds.skip_bad_records)


def chat_components(ds: DictConfig) -> list:
    """Return the chat sources of a dataset as plain dicts: itself, or its `mix` components."""
    base = OmegaConf.to_container(ds, resolve=True)
    if ds.source != "mix":
        return [{k: base[k] for k in CHAT_PART_KEYS}]
    if not base["mix"]:
        raise ConfigError(f"dataset={ds.name} has source 'mix' but an empty dataset.mix list")
    parts = []
    for i, part in enumerate(base["mix"]):
        unknown = set(part) - set(CHAT_PART_KEYS)
        if unknown or "source" not in part:
            raise ConfigError(f"dataset.mix[{i}]={part} needs 'source' and accepts only "
                              f"{', '.join(CHAT_PART_KEYS)}")
        defaults = {"paths": [], "hub": [], "max_documents": None, "task_types": [],
                    "difficulty": 1, "skip_bad_records": base["skip_bad_records"]}
        parts.append({**defaults, **part})
    return parts


def source_description(cfg: DictConfig) -> dict:
    """Return what this config's data set names (files with size and mtime, packages, settings).

    Cheap: no document is read and nothing is downloaded. The prepared manifest records the
    full description; `ldm.data.identity.differences` compares the two.
    """
    ds = cfg.dataset
    if is_mixture(ds):
        return mixture.describe_named(mixture_parts(ds), ds.kind, ds.split_seed, ds.mixture_stop)
    if ds.kind != "chat":
        return sources.describe_text_source(
            ds.source, hub=OmegaConf.to_container(ds.hub, resolve=True), paths=list(ds.paths),
            text_field=ds.text_field, txt_unit=ds.txt_unit)
    from ldm.data.chat_sources import describe_chat_source

    parts = []
    for part in chat_components(ds):
        if part["source"] == "synthetic":
            from ldm.data import synthetic

            parts.append(synthetic.describe(part["max_documents"], ds.split_seed,
                                            part["task_types"] or None, part["difficulty"]))
        else:
            parts.append(describe_chat_source(part["source"], hub=part["hub"], paths=part["paths"]))
    return parts[0] if len(parts) == 1 else {"mix": parts}


def prepared_data_dir(cfg: DictConfig) -> Path:
    """Return where this config's prepared data lives (prepare writes it, later stages read it).

    `outputs/data/<dataset>/<tokenizer>/<context>`; a data set made from files the user names
    gets the key of those files' paths: `<dataset>-<key>`, so other files never share its folder.
    """
    key = identity.source_key(source_description(cfg))
    name = f"{cfg.dataset.name}-{key}" if key else cfg.dataset.name
    return store.data_dir(cfg.paths.data, name, cfg.model.tokenizer_name, cfg.context.name)


def prepare_command(cfg: DictConfig) -> str:
    """Return the command line that prepares the data this config needs."""
    command = (f"python run.py task=prepare dataset={cfg.dataset.name} model={cfg.model.name} "
               f"context={cfg.context.name}")
    if cfg.dataset.get("paths"):
        command += f" 'dataset.paths=[{','.join(str(p) for p in cfg.dataset.paths)}]'"
    return command


def check_prepared_sources(cfg: DictConfig, folder: Path, manifest: dict, command: str) -> None:
    """Raise DataError when the sources this config names differ from those `folder` was made from."""
    named = source_description(cfg)
    prepared = manifest.get("source")
    problem = identity.differences(named, prepared) if prepared is not None else "none recorded"
    if problem:
        raise DataError(f"the prepared data at {folder} was made from "
                        f"{identity.summary(prepared)}, but this run names "
                        f"{identity.summary(named)} ({problem}); run `{command}` to prepare "
                        "these sources")


def missing_data_message(cfg: DictConfig, folder: Path, command: str) -> str:
    """Return the error for absent prepared data, naming data of this set made from other sources."""
    named = source_description(cfg)
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


def find_prepared(cfg: DictConfig, kind: str, command: str) -> Tuple[Path, dict]:
    """Return (folder, manifest) of the prepared data this config needs, checked.

    Raises DataError, naming `command` (what prepares it), when the data is absent, is not
    `kind` rows of the config's context length, or was made from other sources.
    """
    folder = prepared_data_dir(cfg)
    manifest = store.read_manifest(folder)
    if manifest is None:
        raise DataError(missing_data_message(cfg, folder, command))
    if manifest.get("context_length") != cfg.context.length or manifest.get("kind", "text") != kind:
        raise DataError(f"{folder} does not hold {kind} rows of {cfg.context.length} tokens; "
                        f"re-run `{command} task.force=true`")
    check_prepared_sources(cfg, folder, manifest, command)
    return folder, manifest


def check_data_vocabulary(ckpt_tok, data_tok, checkpoint: str, data_dir: Path,
                          command: str) -> None:
    """Raise DataError unless every token of the data's tokenizer has the same id in the model's.

    This direction, because the checkpoint may know more tokens than the data uses (an SFT export
    has the chat tokens; text data prepared before them has not), never fewer: a data id the
    model reads as another token, or not at all, makes every number meaningless.
    """
    from ldm.tokenizer import CHAT_TOKENS

    model_vocab = ckpt_tok.get_vocab()
    wrong = [t for t, i in data_tok.get_vocab().items() if model_vocab.get(t) != i]
    if not wrong:
        return
    absent = [t for t in CHAT_TOKENS if t in data_tok.get_vocab() and t not in model_vocab]
    if absent:
        raise DataError(f"checkpoint={checkpoint} has no chat tokens ({', '.join(absent)}) but "
                        f"the chat data at {data_dir} uses them: a pretraining export? evaluate an "
                        "SFT export on chat data, or this one on a text dataset")
    raise DataError(f"the data at {data_dir} was tokenized with a tokenizer that checkpoint="
                    f"{checkpoint} does not share: {len(wrong)} of its tokens have another id or "
                    f"none in the checkpoint's tokenizer, e.g. {wrong[0]!r}; prepare the data "
                    f"with the checkpoint's tokenizer: `{command} task.force=true`")


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
