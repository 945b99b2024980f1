"""Build or load the masked LM that becomes the diffusion model, and logits at masked positions.

Every model is a transformers `AutoModelForMaskedLM`: an encoder (`model.base_model`) followed
by an MLM head, a family-specific transform and a decoder (`model.get_output_embeddings()`) that
is usually tied to the input embeddings. The diffusion loss only needs logits where tokens are
masked, so `masked_logits` runs the head on those positions alone: the [B, L, V] logit tensor is
the largest activation of the whole model for a 50k vocabulary.
"""

from __future__ import annotations

import contextlib

import fnmatch
import importlib.util
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from ldm import hub
from ldm.errors import ConfigError, LdmError
from ldm.tokenizer import package_model_dir

log = logging.getLogger("ldm")

SOURCES = ("hub", "package", "export", "config")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
HALF_DTYPES = ("bfloat16", "float16")
# Grown embeddings get a row count that is a multiple of this: GPU matmuls over the vocabulary
# (the decoder, its gradient) run on aligned tiles. Rows past len(tokenizer) are no token: they
# are never targets and get a decoder bias that leaves them no probability (silence_padding_rows).
VOCAB_MULTIPLE = 64
PADDING_BIAS = -1e4  # decoder bias of padding rows: exp(-1e4) is 0 even in float64; fits fp16

# Heads that an MLM model has no place for, by construction: BertForMaskedLM is built without a
# pooler, and the NSP head of a BertForPreTraining checkpoint is a different task. Dropping them
# loses nothing the masked LM uses, so these unexpected keys are not errors.
DISCARDED_KEYS_OK = ("pooler.*", "*.pooler.*", "cls.seq_relationship.*")

OFFLINE_MODELS = "model=minilm or model=modernbert_tiny"

# ---------------------------------------------------------------------------------------------
# The MLM head, per family: the transform applied before the (tied) decoder.

def _roberta_transform(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    from transformers.activations import gelu

    return lambda h: m.lm_head.layer_norm(gelu(m.lm_head.dense(h)))


_HEAD_TRANSFORMS: Dict[str, Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]]] = {
    "bert": lambda m: m.cls.predictions.transform,
    "modernbert": lambda m: m.head,
    "roberta": _roberta_transform,
    "xlm-roberta": _roberta_transform,
    "distilbert": lambda m: lambda h: m.vocab_layer_norm(m.activation(m.vocab_transform(h))),
}


def head_transform(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return the MLM head's hidden -> hidden transform that precedes the decoder of `model`."""
    family = getattr(model.config, "model_type", None)
    if family not in _HEAD_TRANSFORMS:
        raise ConfigError(
            f"model family {family!r} has no known MLM head; supported: "
            f"{', '.join(sorted(_HEAD_TRANSFORMS))}"
        )
    return _HEAD_TRANSFORMS[family](model)


def masked_logits(model: nn.Module, input_ids: torch.Tensor,
                  attention_mask: Optional[torch.Tensor], positions_mask: torch.Tensor
                  ) -> torch.Tensor:
    """Return [N, V] logits at the N True positions of `positions_mask`, in row-major order."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]
    selected = hidden[positions_mask.bool()]
    return model.get_output_embeddings()(head_transform(model)(selected))


class SparseMaskedLM(nn.Module):
    """The masked LM behind a forward that returns logits at masked positions only.

    Wrap the model in this before `accelerator.prepare`: DDP and FSDP sync and unshard inside
    the wrapper's forward, which calling `masked_logits` on the inner model would bypass.
    Save or export `.mlm`, whose state-dict keys are the usual transformers ones.
    """

    def __init__(self, mlm: nn.Module):
        super().__init__()
        self.mlm = mlm

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                positions_mask: torch.Tensor) -> torch.Tensor:
        """Return [N, V] logits at the N True positions of `positions_mask`."""
        return masked_logits(self.mlm, input_ids, attention_mask, positions_mask)


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside any DDP/FSDP (`.module`) or torch.compile (`._orig_mod`) layers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def logits_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
              positions_mask: torch.Tensor, sparse: bool = True) -> torch.Tensor:
    """Return [N, V] logits at `positions_mask` from a masked LM or a (wrapped) SparseMaskedLM."""
    positions_mask = positions_mask.bool()
    inner = unwrap(model)
    if isinstance(inner, SparseMaskedLM):
        if sparse:
            return model(input_ids, attention_mask, positions_mask)
        dense = model(input_ids, attention_mask, torch.ones_like(positions_mask))
        return dense.view(*input_ids.shape, -1)[positions_mask]
    if not sparse:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[positions_mask]
    if inner is not model:
        raise ValueError(
            "sparse logits need the masked LM wrapped in SparseMaskedLM before DDP/FSDP/compile "
            "wrapping; calling its submodules directly would skip the wrapper's forward"
        )
    return masked_logits(model, input_ids, attention_mask, positions_mask)


# ---------------------------------------------------------------------------------------------
# Settings checked before any weights are read.

def resolve_dtype(dtype: str) -> torch.dtype:
    """Return the torch dtype named by `dtype` (float32 | bfloat16 | float16)."""
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is not known; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_attn_implementation(name: str) -> str:
    """Return `name` if this machine can run that attention implementation, else raise."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(
            f"model.attn_implementation={name!r} is not known; use one of "
            f"{', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "model.attn_implementation='flash_attention_2' needs the flash_attn package, which is "
            "not installed; use auto or sdpa, or install flash-attn"
        )
    return name


def resolve_attention(name: str, device: Optional[str] = None, half_precision: bool = False) -> str:
    """Return the attention implementation to build with: `name`, or for "auto" the fastest here.

    auto = flash_attention_2 when flash_attn is importable, the device is CUDA and the model runs
    in bf16/fp16 (weights or autocast; the kernel has no fp32 path), else sdpa. ModernBERT's
    sliding-window layers get a real windowed kernel (and unpadded batches) only from flash
    attention; under sdpa they multiply a dense [L, L] mask. Any other name is an override.
    """
    check_attn_implementation(name)
    if name != "auto":
        return name
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and half_precision and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def silence_padding_rows(model: nn.Module, vocab_size: int) -> None:
    """Give the decoder rows past `vocab_size` a bias of PADDING_BIAS: they get no probability.

    They are no token, so no target ever raises them; with this bias their softmax probability
    is 0 in float32 from the first step (their gradient too, so training leaves them there) and
    no sampler temperature brings them near a real token, whatever ids a caller bans. It also
    keeps them out of the loss's normaliser from the first step.
    """
    decoder = model.get_output_embeddings()
    bias = getattr(decoder, "bias", None)
    if bias is None or bias.shape[0] <= vocab_size:
        return
    with torch.no_grad():
        bias[vocab_size:] = PADDING_BIAS


def padded_vocab(vocab_size: int) -> int:
    """Return the embedding rows a model resized for `vocab_size` tokens gets (next multiple of 64)."""
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


# ---------------------------------------------------------------------------------------------
# Loading.

def check_loading_info(info: Mapping[str, Any], missing_keys_ok: Sequence[str], origin: str):
    """Return None if every missing/unexpected key is expected; else raise LdmError naming them."""

    def allowed(key: str, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(key, p) for p in patterns)

    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or ()))
    bad_missing = [k for k in missing if not allowed(k, missing_keys_ok)]
    bad_unexpected = [
        k for k in unexpected if not allowed(k, tuple(missing_keys_ok) + DISCARDED_KEYS_OK)
    ]
    problems = [f"{what} {keys}" for what, keys in (("missing keys", bad_missing),
                ("unexpected keys", bad_unexpected), ("keys with mismatched shapes", mismatched))
                if keys]
    if problems:
        raise LdmError(
            f"checkpoint {origin} does not match the model: {'; '.join(problems)}; "
            f"name expected key patterns in model.missing_keys_ok"
        )
    if missing:
        log.info("initialised %d new weights absent from %s: %s", len(missing), origin, missing)
    if unexpected:
        log.info("dropped %d checkpoint weights unused by the MLM: %s", len(unexpected), unexpected)


def set_dropout(config, p: Optional[float]) -> None:
    """Set every dropout probability of a transformers config to `p` (None leaves them)."""
    if p is None:
        return
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"model.dropout={p} must be in [0, 1) or null (keep the checkpoint's)")
    for key, value in config.to_dict().items():
        if "dropout" in key and key != "classifier_dropout" and isinstance(value, (int, float)):
            setattr(config, key, float(p))


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report and tied-weights warning while loading: ldm checks the
    missing and unexpected keys itself (check_loading_info) and names what it accepts."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _from_pretrained(where: str, kwargs: Dict[str, Any], missing_keys_ok, origin: str):
    from transformers import AutoConfig, AutoModelForMaskedLM

    kwargs = dict(kwargs)
    dropout = kwargs.pop("dropout", None)
    if dropout is not None:
        config = AutoConfig.from_pretrained(
            where, local_files_only=kwargs.get("local_files_only", False),
            trust_remote_code=kwargs.get("trust_remote_code", False))
        set_dropout(config, dropout)
        kwargs["config"] = config
    from safetensors import SafetensorError

    try:
        with quiet_transformers():
            model, info = AutoModelForMaskedLM.from_pretrained(where, output_loading_info=True,
                                                               **kwargs)
    except SafetensorError as err:
        raise LdmError(f"{origin}: model.safetensors cannot be read ({err}); the file is damaged "
                       "or incomplete: export or download it again") from err
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        raise LdmError(f"{origin} is not a masked LM ({str(err).splitlines()[0][:200]}); ldm "
                       f"needs an encoder with an MLM head: {', '.join(sorted(_HEAD_TRANSFORMS))}"
                       ) from err
    check_loading_info(info, missing_keys_ok, origin)
    return model


def _load_from_hub(hub_id: str, kwargs: Dict[str, Any], missing_keys_ok) -> nn.Module:
    origin = f"hub:{hub_id}"
    try:
        cached_only = {**kwargs, "local_files_only": True}
        return _from_pretrained(hub_id, cached_only, missing_keys_ok, origin)
    except OSError:
        pass  # not in the local cache; only now is the network worth trying
    hub.require_hub(f"model {hub_id!r} (not in the local cache)", OFFLINE_MODELS)
    try:
        return _from_pretrained(hub_id, kwargs, missing_keys_ok, origin)
    except OSError as err:
        raise LdmError(f"model {hub_id!r} could not be loaded from the hub: {err}") from err


def _build_from_config(
    architecture: Optional[str], arch: Mapping[str, Any], vocab_size: Optional[int],
    max_positions: Optional[int], kwargs: Dict[str, Any],
) -> nn.Module:
    from transformers import AutoConfig, AutoModelForMaskedLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not architecture or architecture not in CONFIG_MAPPING:
        raise ConfigError(
            f"model.architecture={architecture!r} is not a transformers model type "
            f"(e.g. modernbert, bert)"
        )
    fields = dict(arch)
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    if max_positions is not None:
        fields["max_position_embeddings"] = max_positions
    config = AutoConfig.for_model(architecture, **fields)
    set_dropout(config, kwargs.get("dropout"))
    # The family's default special ids (e.g. ModernBERT's pad 50283) refer to its own tokenizer;
    # left in place they would point past a small vocabulary and break the padding embedding.
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id"):
        value = getattr(config, name, None)
        if name not in fields and isinstance(value, int) and value >= config.vocab_size:
            setattr(config, name, None)
    return AutoModelForMaskedLM.from_config(
        config, dtype=kwargs["dtype"], attn_implementation=kwargs["attn_implementation"],
        trust_remote_code=kwargs.get("trust_remote_code", False),
    )


def load_model(
    source: str,
    pretrained: Optional[str],
    architecture: Optional[str] = None,
    arch: Optional[Mapping[str, Any]] = None,
    vocab_size: Optional[int] = None,
    max_positions: Optional[int] = None,
    missing_keys_ok: Sequence[str] = (),
    attn_implementation: str = "auto",
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    dropout: Optional[float] = None,
) -> nn.Module:
    """Return an AutoModelForMaskedLM from hub | package | export | config, sized to vocab_size.

    A model with exactly vocab_size rows is kept as it is; otherwise its embeddings (and tied
    decoder) are resized to padded_vocab(vocab_size) rows, which an export then keeps.
    """
    if source not in SOURCES:
        raise ConfigError(f"model.source={source!r} is not known; use one of {', '.join(SOURCES)}")
    if source != "config" and not pretrained:
        raise ConfigError(f"model.source={source!r} needs model.pretrained (an id, package or dir)")
    kwargs: Dict[str, Any] = {
        "dtype": resolve_dtype(dtype),
        "attn_implementation": resolve_attention(attn_implementation,
                                                 half_precision=dtype in HALF_DTYPES),
        "trust_remote_code": trust_remote_code,
        "dropout": dropout,
    }
    missing_keys_ok = tuple(missing_keys_ok or ())

    if source == "config":
        model = _build_from_config(architecture, arch or {}, vocab_size, max_positions, kwargs)
    elif source == "package":
        folder = package_model_dir(pretrained)
        model = _from_pretrained(str(folder), kwargs, missing_keys_ok, f"package:{pretrained}")
    elif source == "export" or hub.is_local(pretrained):
        # A hub source given a local folder is an export too (init_from takes either).
        folder = Path(pretrained)
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"model.pretrained={pretrained!r} is not an export dir (no config.json there)"
            )
        model = _from_pretrained(str(folder), kwargs, missing_keys_ok, f"export:{folder}")
    else:
        model = _load_from_hub(pretrained, kwargs, missing_keys_ok)

    limit = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and limit is not None and max_positions > limit:
        raise ConfigError(
            f"model.max_positions={max_positions} exceeds the {limit} positions this model was "
            f"built with; use at most {limit}"
        )
    rows = model.get_input_embeddings().num_embeddings
    if vocab_size is not None and rows not in (vocab_size, padded_vocab(vocab_size)):
        # resize_token_embeddings re-ties a tied decoder (weight and bias) to the new matrix.
        with quiet_transformers():  # its note on how new rows are initialised is not news
            model.resize_token_embeddings(vocab_size, pad_to_multiple_of=VOCAB_MULTIPLE)
        silence_padding_rows(model, vocab_size)
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs and with torch.compile.
        # transformers 5.x renamed gradient_* to activation_checkpointing_* (old names warn).
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    # from_pretrained returns eval mode, from_config train mode; every source agrees on eval.
    return model.eval()


def compiled_blocks(model: nn.Module) -> list:
    """Return the repeated encoder blocks (items of the encoder's ModuleLists) of `model`."""
    return [block for blocks in model.base_model.modules() if isinstance(blocks, nn.ModuleList)
            for block in blocks]


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """Return `model` with each encoder block compiled in place when `enabled` (else untouched).

    Per block, not the whole encoder: DDP overlaps a block's gradient all-reduce with the
    backward of the blocks before it only when the graph breaks at block boundaries, FSDP2
    gathers and frees weights per block, and every block of one shape reuses one compiled graph.
    In place (nn.Module.compile), so state_dict keys stay the transformers ones. The head sees a
    different number of masked rows every step; compiling it buys little.
    """
    if enabled:
        blocks = compiled_blocks(model)
        for block in blocks or [model.base_model]:
            block.compile(dynamic=None)
        log.info("compiled %d encoder blocks", len(blocks) or 1)
    return model
