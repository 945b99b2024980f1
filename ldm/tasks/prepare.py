"""task=prepare: raw documents -> tokenized, packed, split rows at outputs/data/<ds>/<tok>/<ctx>."""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ldm.data import mixture, sources, store
from ldm.data.sft import PADDINGS, check_answer_positions
from ldm.data.pretrain import build_pretraining_data
from ldm.errors import ConfigError
from ldm.tasks.common import open_tracker
from ldm.tasks.prepared import (chat_components, is_mixture, log_data_identity, mixture_parts,
                                prepared_data_dir)
from ldm.tokenizer import TRAIN_BPE, load_tokenizer

log = logging.getLogger("ldm")

MIN_CONTEXT = 16
UNKNOWN_WARN_FRACTION = 0.001  # warn when more than 0.1% of the tokens are [UNK]


def validate(cfg: DictConfig) -> None:
    """Check every config value prepare depends on, before any heavy work."""
    ds, task = cfg.dataset, cfg.task
    length = cfg.context.length
    if length < MIN_CONTEXT:
        raise ConfigError(f"context.length={length} is below the minimum {MIN_CONTEXT}")
    if length > cfg.model.max_positions:
        raise ConfigError(
            f"context.length={length} exceeds model.max_positions={cfg.model.max_positions} of "
            f"model={cfg.model.name}; pick a context of at most {cfg.model.max_positions}"
        )
    if not 0.0 < ds.test_split_pct < 1.0:
        raise ConfigError(f"dataset.test_split_pct={ds.test_split_pct} must be in (0, 1), "
                          "e.g. 0.05 for 5% of documents held out")
    if task.last_row not in ("drop", "pad"):
        raise ConfigError(f"task.last_row={task.last_row!r}; accepted: drop, pad")
    if task.num_workers < 1 or task.batch_size < 1:
        raise ConfigError(f"task.num_workers={task.num_workers} and task.batch_size="
                          f"{task.batch_size} must both be >= 1")
    if ds.max_documents is not None and ds.max_documents < 2:
        raise ConfigError(f"dataset.max_documents={ds.max_documents} must be >= 2 (or null)")
    if ds.kind not in ("text", "chat"):
        raise ConfigError(f"dataset.kind={ds.kind!r}; accepted: text, chat")
    if is_mixture(ds):
        mixture.validate(mixture_parts(ds), ds.kind, ds.streaming)
    if ds.kind == "chat":
        validate_chat(cfg)
        return
    if cfg.model.tokenizer == TRAIN_BPE and not cfg.model.vocab_size:
        raise ConfigError(f"model={cfg.model.name} trains a BPE tokenizer but model.vocab_size is unset")
    if not is_mixture(ds):
        sources.validate_text_source(ds.source, OmegaConf.to_container(ds.hub, resolve=True),
                                     list(ds.paths), ds.streaming)


def validate_chat(cfg: DictConfig) -> None:
    """Check the options of a chat dataset before any heavy work."""
    ds = cfg.dataset
    for key, allowed in (("answer_turns", ("all", "last")), ("padding", PADDINGS),
                         ("overlong", ("drop", "truncate"))):
        if ds[key] not in allowed:
            raise ConfigError(f"dataset.{key}={ds[key]!r}; accepted: {', '.join(allowed)}")
    check_answer_positions(ds.padding, ds.get("answer_positions"), cfg.context.length)
    if not cfg.init_from and cfg.model.tokenizer == TRAIN_BPE and not cfg.model.vocab_size:
        raise ConfigError(f"model={cfg.model.name} trains a BPE tokenizer but model.vocab_size is unset")
    for part in ([] if is_mixture(ds) else chat_components(ds)):
        if part["source"] == "synthetic":
            from ldm.data import synthetic

            synthetic.validate_task_types(part["task_types"] or None)
            if part["max_documents"] is None:
                raise ConfigError("a synthetic chat source needs max_documents (the example count)")
            continue
        from ldm.data.chat_sources import validate_chat_source

        validate_chat_source(part["source"], part["hub"], part["paths"], ds.streaming)


def chat_tokenizer(cfg: DictConfig, conversations):
    """Return the tokenizer chat data is encoded with: init_from's, else the model option's.

    A model whose tokenizer is trained (modernbert_tiny) and that starts from scratch gets a BPE
    trained on the message texts of the training split; starting from a pretraining export
    (init_from) keeps that export's tokenizer, so the token ids agree.
    """
    if cfg.init_from or cfg.model.tokenizer != TRAIN_BPE:
        return load_tokenizer(cfg.init_from or cfg.model.tokenizer)
    import tempfile

    from ldm.data.pretrain import split_of
    from ldm.tokenizer import train_bpe

    ds = cfg.dataset

    def texts():
        for index, messages in enumerate(conversations()):
            if split_of(index, ds.split_seed, ds.test_split_pct) == "train":
                yield "\n".join(m["content"] for m in messages)

    with tempfile.TemporaryDirectory() as tmp:
        return train_bpe(texts(), cfg.model.vocab_size, tmp)


def _open_part(part: dict, split_seed: int, streaming: bool):
    if part["source"] == "synthetic":
        from ldm.data import synthetic

        args = (part["max_documents"], split_seed, part["task_types"] or None, part["difficulty"])
        return (lambda: synthetic.conversations(*args)), synthetic.describe(*args)
    from ldm.data.chat_sources import open_chat_source

    return open_chat_source(part["source"], hub=part["hub"], paths=part["paths"],
                            streaming=streaming, skip_bad_records=part["skip_bad_records"])


def open_conversations(cfg: DictConfig):
    """Return (callable giving conversations, description for the fingerprint).

    A mix concatenates its components in order, so the first component's examples keep the
    indices (and so the train/test split) they have as a data set of their own.
    """
    ds = cfg.dataset
    if is_mixture(ds):
        return mixture.open_chat_mixture(mixture_parts(ds), ds.split_seed, ds.mixture_stop,
                                         ds.streaming)
    opened = [_open_part(p, ds.split_seed, ds.streaming) for p in chat_components(ds)]
    if len(opened) == 1:
        return opened[0]

    def mixed():
        for source, _ in opened:
            yield from source()

    return mixed, {"mix": [desc for _, desc in opened]}


def tokenizer_identity(tok) -> str:
    """Return a hash of the tokenizer's vocabulary, rules and special tokens."""
    blob = tok.backend_tokenizer.to_str() + repr(sorted(tok.special_tokens_map.items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run(cfg: DictConfig) -> float:
    """Prepare pretraining or chat data; return the number of training tokens.

    The mlflow run starts once the data is there, so a prepare that fails leaves none behind.
    """
    from ldm.tasks.checkpoints import with_init_from_model

    cfg = with_init_from_model(cfg)  # an init_from export brings its model group
    validate(cfg)
    if cfg.dataset.kind == "chat":
        return run_chat(cfg)
    ds = cfg.dataset
    final = prepared_data_dir(cfg)
    tokenizer = TRAIN_BPE
    tok_id = {"train_bpe": cfg.model.vocab_size}
    if cfg.model.tokenizer != TRAIN_BPE:
        tokenizer = load_tokenizer(cfg.model.tokenizer)
        tok_id = {"tokenizer": cfg.model.tokenizer, "hash": tokenizer_identity(tokenizer)}
    if is_mixture(ds):
        texts, description = mixture.open_text_mixture(
            mixture_parts(ds), ds.split_seed, ds.mixture_stop, ds.streaming, cfg.paths.cache)
    else:
        documents, description = sources.open_text_source(
            ds.source, hub=OmegaConf.to_container(ds.hub, resolve=True), paths=list(ds.paths),
            text_field=ds.text_field, txt_unit=ds.txt_unit, streaming=ds.streaming,
            cache_dir=cfg.paths.cache,
        )

        def texts():
            return (row["text"] for row in documents)
    spec = {"source": description, "tokenizer": tok_id, "context": cfg.context.length,
            "split_seed": ds.split_seed, "test_split_pct": ds.test_split_pct,
            "pack": cfg.task.pack, "last_row": cfg.task.last_row, "max_documents": ds.max_documents,
            # data prepared before text spelling a special token was kept as text is not reused
            "special_token_text": "split"}
    fp = store.fingerprint(spec)
    if not cfg.task.force and store.is_reusable(final, fp):
        manifest = store.read_manifest(final)
        log.info("reusing prepared data at %s (fingerprint %s matches)", final, fp)
        print(f"reusing prepared data at {final} (fingerprint {fp} matches)")
    else:
        manifest = build_pretraining_data(
            texts, final, tokenizer=tokenizer,
            context_length=cfg.context.length, test_split_pct=ds.test_split_pct,
            split_seed=ds.split_seed, pack=cfg.task.pack, last_row=cfg.task.last_row,
            num_workers=cfg.task.num_workers, batch_size=cfg.task.batch_size,
            max_documents=ds.max_documents, bpe_vocab_size=cfg.model.vocab_size,
            manifest_extra={"fingerprint": fp, "dataset": ds.name, "source": description,
                            "tokenizer": {"name": cfg.model.tokenizer_name, **tok_id},
                            "context": cfg.context.name},
            manifest_late=mixture.manifest_record(texts),
        )
    print_summary(final, manifest)
    warn_unknown(manifest)
    metrics = {}
    for split, st in manifest["splits"].items():
        for key in ("documents", "tokens", "rows", "padding_fraction", "bytes_per_token",
                    "unknown_tokens"):
            if key in st:
                metrics[f"{split}.{key}"] = st[key]
    metrics["tokens_per_second"] = manifest.get("tokens_per_second", 0.0)
    metrics.update(mixture.mixture_metrics(manifest))
    track_prepared(cfg, final, manifest, metrics)
    return float(manifest["splits"]["train"]["tokens"])


def track_prepared(cfg: DictConfig, final: Path, manifest: dict, metrics: dict) -> None:
    """Log a finished prepare to mlflow: figures, fingerprint, sources, manifest, dataset input."""
    with open_tracker(cfg) as tracker:
        log_data_identity(tracker, final, manifest, "prepare")
        tracker.log_metrics(metrics, step=0)
        tracker.log_artifact(final / store.MANIFEST, "data")


def warn_unknown(manifest: dict) -> None:
    """Print a warning when more than UNKNOWN_WARN_FRACTION of the tokens are the unknown token."""
    count, total = manifest.get("unknown_tokens"), manifest.get("unknown_of_tokens")
    if not count or not total or count / total <= UNKNOWN_WARN_FRACTION:
        return
    message = (f"warning: {count:,} of {total:,} tokens ({count / total:.2%}) are the unknown "
               f"token {manifest.get('unk_token')!r}: characters the tokenizer's vocabulary lacks "
               "(e.g. CJK or emoji for an English WordPiece) were lost; use a tokenizer that "
               "covers them (model=modernbert_tiny trains one on the data)")
    print(message, file=sys.stderr, flush=True)


def run_chat(cfg: DictConfig) -> float:
    """Prepare chat data (token ids + answer masks); return the number of training tokens."""
    from ldm.data.sft import build_sft_data

    ds = cfg.dataset
    final = prepared_data_dir(cfg)
    conversations, description = open_conversations(cfg)
    if cfg.init_from or cfg.model.tokenizer != TRAIN_BPE:
        tokenizer = chat_tokenizer(cfg, conversations)
        tok_id = tokenizer_identity(tokenizer)
    else:
        tokenizer, tok_id = None, {"train_bpe": cfg.model.vocab_size}
    spec = {"source": description, "tokenizer": tok_id,
            "context": cfg.context.length, "split_seed": ds.split_seed,
            "test_split_pct": ds.test_split_pct, "answer_turns": ds.answer_turns,
            "padding": ds.padding, "overlong": ds.overlong, "max_documents": ds.max_documents}
    if ds.padding == "answer":  # a new field only where it matters: other data keeps its fingerprint
        spec["answer_positions"] = ds.answer_positions
    fp = store.fingerprint(spec)
    if not cfg.task.force and store.is_reusable(final, fp):
        manifest = store.read_manifest(final)
        print(f"reusing prepared data at {final} (fingerprint {fp} matches)")
    else:
        tokenizer = tokenizer or chat_tokenizer(cfg, conversations)
        manifest = build_sft_data(
            conversations, final, tokenizer=tokenizer, context_length=cfg.context.length,
            test_split_pct=ds.test_split_pct, split_seed=ds.split_seed,
            answer_turns=ds.answer_turns, padding=ds.padding, overlong=ds.overlong,
            answer_positions=ds.get("answer_positions"), num_workers=cfg.task.num_workers, batch_size=cfg.task.batch_size,
            max_examples=None if ds.source == "synthetic" else ds.max_documents,
            manifest_extra={"fingerprint": fp, "dataset": ds.name, "source": description,
                            "tokenizer": {"name": cfg.model.tokenizer_name,
                                          "from": cfg.init_from or cfg.model.tokenizer},
                            "context": cfg.context.name},
            manifest_late=mixture.manifest_record(conversations),
        )
    print_chat_summary(final, manifest)
    warn_unknown(manifest)
    metrics = {f"{split}.{key}": value for split, st in manifest["splits"].items()
               for key, value in st.items() if isinstance(value, (int, float))}
    metrics.update(mixture.mixture_metrics(manifest))
    track_prepared(cfg, final, manifest, metrics)
    return float(manifest["splits"]["train"].get("answer_tokens", 0))


def print_chat_summary(final: Path, manifest: dict) -> None:
    """Print the counts of prepared chat data as a table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prepared chat data: {final}")
    for col in ("split", "examples", "kept", "truncated", "dropped", "bad", "answer tok",
                "prompt tok", "padding", "unknown tok"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, st in manifest["splits"].items():
        dropped = st.get("dropped_overlong", 0) + st.get("dropped_no_answer", 0)
        table.add_row(split, f"{st.get('examples', 0):,}", f"{st.get('kept', 0):,}",
                      f"{st.get('truncated', 0):,}", f"{dropped:,}", f"{st.get('skipped_bad', 0):,}",
                      f"{st.get('answer_tokens', 0):,}", f"{st.get('prompt_tokens', 0):,}",
                      f"{st.get('padding_fraction', 0.0):.1%}", f"{st.get('unknown_tokens', 0):,}")
    Console().print(table)
    print(f"padding {manifest.get('padding')}, answer turns {manifest.get('answer_turns')}, "
          f"context {manifest.get('context_length', '')}, fingerprint {manifest['fingerprint']}")
    mixture.print_realised(manifest)


def print_summary(final: Path, manifest: dict) -> None:
    """Print the counts of a prepared dataset as a table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prepared data: {final}")
    table.add_column("split")
    for col in ("documents", "tokens", "rows", "padding", "dropped", "bytes/token", "unknown"):
        table.add_column(col, justify="right")
    for split, st in manifest["splits"].items():
        table.add_row(split, f"{st['documents']:,}", f"{st['tokens']:,}", f"{st['rows']:,}",
                      f"{st['padding_fraction']:.2%}", f"{st['dropped_tokens']:,}",
                      f"{st['bytes_per_token']:.3f}", f"{st.get('unknown_tokens', 0):,}")
    Console(stderr=False).print(table)
    print(f"dtype {manifest['dtype']}, context {manifest['context_length']}, "
          f"fingerprint {manifest['fingerprint']}")
    mixture.print_realised(manifest)
