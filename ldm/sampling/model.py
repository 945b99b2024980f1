"""The model as the sampler sees it: logits of a whole canvas, or of one block of it.

`sampler_model(mlm)` wraps a transformers masked LM: positions count from each row's first real
token (so left padding shifts nothing), the vocabulary head runs on the still-masked positions of
the block being filled only, and with sampler.cache `ldm.sampling.cache` drives the layers of
`.model` itself. Any other `(input_ids, attention_mask) -> logits` function is an opaque model,
`SamplerModel(fn)`: called whole and its logits sliced; the sampler sees nothing inside it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional, Union

import torch
from torch import nn

from ldm.model import head_transform

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def true_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Return [B, L] position ids counted from each row's first real token (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass(frozen=True, eq=False)
class SamplerModel:
    """What the sampler calls: `logits` of whole canvases and, through `model`, the layers.

    `model` is the masked LM behind `logits` when the sampler may run its parts (the encoder,
    then the head on one block; the layers one by one for the cache); None for an opaque model.
    """

    logits: LogitsFn  # (input_ids [B, L], attention_mask [B, L]) -> logits [B, L, V]
    model: Optional[nn.Module] = None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.logits(input_ids, attention_mask)

    @classmethod
    def of(cls, model_fn: Union["SamplerModel", LogitsFn]) -> "SamplerModel":
        """Return `model_fn` as a SamplerModel (a bare logits function is an opaque one)."""
        return model_fn if isinstance(model_fn, SamplerModel) else cls(model_fn)

    @property
    def family(self) -> Optional[str]:
        """Return the model family (config.model_type), None for an opaque model."""
        return getattr(getattr(self.model, "config", None), "model_type", None)

    @cached_property
    def head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Return the vocabulary head, final hidden states [..., H] -> logits [..., V]."""
        transform, decoder = head_transform(self.model), self.model.get_output_embeddings()
        return lambda hidden: decoder(transform(hidden))

    def block_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lo: int,
                     hi: int, where: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Return [B, hi - lo, V] logits of positions [lo, hi) (the head run on them only).

        With `where` (bool [B, hi - lo]) the head runs on the positions it marks only, and the
        result is their [N, V] logits in row-major order (`logits[where]` of the full block).
        """
        if self.model is None:
            block = self.logits(input_ids, attention_mask)[:, lo:hi]
            return block if where is None else block[where]
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=true_positions(attention_mask))[0]
        hidden = hidden[:, lo:hi]
        return self.head(hidden if where is None else hidden[where])


def sampler_model(model: nn.Module) -> SamplerModel:
    """Return the SamplerModel of a transformers masked LM (opaque if it takes no position_ids)."""
    try:
        takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # some wrappers hide the signature; assume HF's usual one
        takes_positions = True

    def logits(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if takes_positions:
            # Count positions from each row's first real token: otherwise left padding would
            # shift every absolute position, and an answer would depend on its batch-mates.
            kwargs["position_ids"] = true_positions(attention_mask)
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits

    return SamplerModel(logits, model if takes_positions else None)
