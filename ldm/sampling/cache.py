"""Block-wise approximate key/value caching for bidirectional encoders (BERT, ModernBERT).

A masked-diffusion step only commits tokens inside the current semi-autoregressive block, yet an
uncached step runs the whole encoder over prompt + answer. Following Fast-dLLM's approximate
cache for LLaDA (arXiv:2505.22618), at the start of each block one full forward keeps every
layer's keys and values; the block's later steps then recompute only

- `prefix`: the block and every position after it, attending to the kept keys/values of the
  positions before the block;
- `dual`: the block alone, attending to the kept keys/values before and after it.

The kept entries are stale by design (positions before the block attend to the block, which
changes), which is why a new block starts with a full forward. The layers are driven here with
their own modules (the projections, norms and MLPs of the loaded model), so fine-tuned weights
are used as they are; only attention itself is recomputed, with torch's SDPA.

ModernBERT: keys are kept after rotary embedding at their true positions (counted from each
row's first real token, as `sampler_model` does), sliding-window layers keep |i - j| <= window and
global layers attend everywhere, padded keys are masked. BERT: absolute position embeddings at
the true positions. Other families raise a ConfigError naming the ones that are supported.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import ConfigError
from ldm.sampling.model import SamplerModel, sampler_model, true_positions
from ldm.sampling.settings import CACHE_MODES

CACHE_FAMILIES = ("bert", "modernbert")


def check_cache_family(cache: str, family: Optional[str]) -> None:
    """Raise ConfigError unless `cache` is a known mode that models of `family` support."""
    if cache not in CACHE_MODES:
        raise ConfigError(f"sampler.cache={cache!r} is unknown; accepted: {', '.join(CACHE_MODES)}")
    if cache != "none" and family not in CACHE_FAMILIES:
        raise ConfigError(
            f"sampler.cache={cache!r} needs a model family with cache support "
            f"({', '.join(CACHE_FAMILIES)}); this model is {family!r}: use sampler.cache=none"
        )


class _Family:
    """How to run one family's embeddings and layers on a span of positions."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    def layers(self) -> List[nn.Module]:
        raise NotImplementedError

    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class _Bert(_Family):
    def layers(self):
        return list(self.model.base_model.encoder.layer)

    def embed(self, ids, pos):
        return self.model.base_model.embeddings(input_ids=ids, position_ids=pos)

    def qkv(self, layer, hidden, pos):
        att = layer.attention.self
        shape = (*hidden.shape[:2], -1, att.attention_head_size)
        q, k, v = (m(hidden).view(shape).transpose(1, 2) for m in (att.query, att.key, att.value))
        return q, k, v, hidden

    def window(self, layer) -> Optional[int]:
        return None

    def after_attention(self, layer, attended, saved):
        attention_output = layer.attention.output(attended, saved)
        return layer.feed_forward_chunk(attention_output)


class _ModernBert(_Family):
    def layers(self):
        return list(self.model.base_model.layers)

    def embed(self, ids, pos):
        return self.model.base_model.embeddings(input_ids=ids)

    def qkv(self, layer, hidden, pos):
        # lazy: transformers is slow to import (startup of everything that imports the sampler)
        from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb

        att = layer.attn
        normed = layer.attn_norm(hidden)
        qkv = att.Wqkv(normed).view(*hidden.shape[:2], 3, -1, att.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=-3))
        cos, sin = self.model.base_model.rotary_emb(normed, pos, layer.attention_type)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        return q, k, v, hidden

    def window(self, layer) -> Optional[int]:
        # The same inclusive half-window as transformers' bidirectional sliding mask.
        if layer.attention_type == "sliding_attention":
            return self.config.sliding_window
        return None

    def after_attention(self, layer, attended, saved):
        hidden = saved + layer.attn.out_drop(layer.attn.Wo(attended))
        return hidden + layer.mlp(layer.mlp_norm(hidden))

    def finish(self, hidden):
        return self.model.base_model.final_norm(hidden)


_FAMILIES = {"bert": _Bert, "modernbert": _ModernBert}


def _allowed(keys_real: torch.Tensor, q_index: torch.Tensor, k_index: torch.Tensor,
             window: Optional[int]) -> Optional[torch.Tensor]:
    """Return the attention mask of queries `q_index` over keys `k_index` (None: all allowed).

    With padding: [B, 1, Q, K] bool, real keys within the window; a query row that would see no
    key sees all of them. Without padding: None, or the window alone as [1, 1, Q, K].
    """
    near = None
    if window is not None:
        near = (q_index[:, None] - k_index[None, :]).abs() <= window
    if keys_real is None:
        return None if near is None else near[None, None]
    allowed = keys_real[:, None, None, :].expand(-1, 1, q_index.numel(), -1)
    if near is not None:
        allowed = allowed & near[None, None]
    # A padded query far from every real key would attend to nothing and turn NaN; its output is
    # never used, but its key/value must stay finite (transformers unmasks such rows the same way).
    return allowed | ~allowed.any(-1, keepdim=True)


class BlockCache:
    """Per-layer keys/values of a batch of canvases, kept from the last full forward.

    `logits(ids, attn, rows, lo, hi, block)` returns [R, hi - lo, V] logits for `rows` of the
    batch. A row whose keys/values come from another block (or none yet), or `refresh_every_step`,
    gets a full forward that refills its entries; otherwise only the positions of the mode are
    computed. `retire(done)` drops the entries of rows that will not be asked for again
    (finished answers), so that the others are read and written in place instead of gathered at
    every step. `positions` counts the query positions the encoder computed, `head_positions`
    the positions the vocabulary head ran on, `flops` an estimate of both. `model` is the
    SamplerModel (or the transformers masked LM) whose layers and head it runs.
    """

    def __init__(self, model: Union[SamplerModel, nn.Module], mode: str, batch: int, *,
                 refresh_every_step: bool = False):
        sampled = model if isinstance(model, SamplerModel) else sampler_model(model)
        model, family = sampled.model, sampled.family
        check_cache_family(mode, family)
        if mode == "none":
            raise ConfigError("BlockCache needs sampler.cache=prefix or dual")
        if getattr(model.config, "is_decoder", False):
            raise ConfigError(f"sampler.cache={mode!r} needs a bidirectional encoder; this "
                              f"{family} is configured as a causal decoder (is_decoder=true)")
        self.model, self.mode, self.batch = model, mode, batch
        self.family = _FAMILIES[family](model)
        self.layer_list = self.family.layers()
        self.head = sampled.head
        self.refresh_every_step = refresh_every_step
        self.keys: List[torch.Tensor] = []
        self.values: List[torch.Tensor] = []
        self.block_of = torch.full((batch,), -1, dtype=torch.long)
        # batch row -> its index in the kept tensors (-1: retired); kept in row order
        self.slot = torch.arange(batch)
        self.positions = self.head_positions = self.full_forwards = 0
        self.flops = 0.0

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
               lo: int, hi: int, block: int, where: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        """Return [R, hi - lo, V] logits for the `rows` of the batch that `input_ids` holds.

        With `where` (bool [R, hi - lo]) only the positions it marks go through the head: their
        [N, V] logits, row-major, as `logits[where]` of the full block.
        """
        rows_cpu = rows.cpu()
        if self.keys and bool((self.slot[rows_cpu] < 0).any()):
            self._reset()  # a retired row asked for again: start over with the whole batch
        stale = self.refresh_every_step or not self.keys or bool(
            (self.block_of[rows_cpu] != block).any())
        if stale:
            hidden = self._forward(input_ids, attention_mask, rows_cpu, 0, input_ids.shape[1],
                                   store=True)
            self.block_of[rows_cpu] = block
            self.full_forwards += 1
            hidden = hidden[:, lo:hi]
        else:
            end = input_ids.shape[1] if self.mode == "prefix" else hi
            hidden = self._forward(input_ids, attention_mask, rows_cpu, lo, end, store=False)
            hidden = hidden[:, : hi - lo]
        if where is not None:
            hidden = hidden[where]
        positions = hidden.shape[:-1].numel()
        self.head_positions += positions
        self.flops += flops_estimate(self.model.config, 1, 0, 0, positions)
        return self.head(hidden)

    def _forward(self, ids: torch.Tensor, attn: torch.Tensor, rows: torch.Tensor, start: int,
                 end: int, store: bool) -> torch.Tensor:
        """Return the final hidden states of positions [start, end) of `rows` (batch rows, CPU)."""
        width = ids.shape[1]
        pos = true_positions(attn)
        real = None if bool(attn.bool().all()) else attn.bool()  # None: no padding to mask
        # Every kept row in order: the kept tensors are used (and written) in place, no gather.
        # Writing a step's keys/values of [start, end) into the cache is safe: later steps of
        # the block recompute those positions, and the next block refreshes them all.
        held = self.keys[0].shape[0] if self.keys else self.batch
        slots = self.slot[rows]
        whole = slots.numel() == held and bool((slots == torch.arange(held)).all())
        slots = slots.to(ids.device)
        hidden = self.family.embed(ids[:, start:end], pos[:, start:end])
        q_index = torch.arange(start, end, device=ids.device)
        k_index = torch.arange(width, device=ids.device)
        masks: Dict[Optional[int], Optional[torch.Tensor]] = {}  # window -> mask, per call
        for i, layer in enumerate(self.layer_list):
            q, k, v, saved = self.family.qkv(layer, hidden, pos[:, start:end])
            if store and not self.keys:  # in the keys' own dtype (bf16 under autocast)
                self._allocate(len(self.layer_list), k, width)
            if whole:
                self.keys[i][:, :, start:end] = k
                self.values[i][:, :, start:end] = v
                k, v = self.keys[i], self.values[i]
            elif store:
                self.keys[i][slots] = k
                self.values[i][slots] = v
            else:
                # Kept entries outside [start, end), fresh ones inside it (indexing copies).
                keys, values = self.keys[i][slots], self.values[i][slots]
                keys[:, :, start:end] = k
                values[:, :, start:end] = v
                k, v = keys, values
            window = self.family.window(layer)
            if window not in masks:
                masks[window] = _allowed(real, q_index, k_index, window)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[window])
            attended = attended.transpose(1, 2).reshape(*hidden.shape[:2], -1)
            hidden = self.family.after_attention(layer, attended, saved)
        self.positions += hidden.shape[0] * hidden.shape[1]
        self.flops += flops_estimate(self.model.config, hidden.shape[0], hidden.shape[1], width, 0)
        return self.family.finish(hidden)

    def retire(self, done: torch.Tensor) -> None:
        """Drop the kept entries of the rows where `done` ([batch] bool) is True: they will not
        be asked for again. One copy now instead of a gather at every later step."""
        if not self.keys:
            return
        kept = self.slot >= 0
        keep = kept & ~done.cpu()
        if bool((keep == kept).all()):
            return
        index = self.slot[keep].to(self.keys[0].device)
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.slot = torch.full_like(self.slot, -1)
        self.slot[keep] = torch.arange(int(keep.sum()))
        self.block_of[~keep] = -1

    def _reset(self) -> None:
        self.keys, self.values = [], []
        self.slot = torch.arange(self.batch)
        self.block_of.fill_(-1)

    def _allocate(self, layers: int, like: torch.Tensor, width: int) -> None:
        """Allocate every layer's kept keys/values: [batch, heads, width, head_dim] as `like`."""
        shape = (self.batch, like.shape[1], width, like.shape[-1])
        self.keys = [like.new_zeros(shape) for _ in range(layers)]
        self.values = [like.new_zeros(shape) for _ in range(layers)]


def flops_estimate(config, rows: int, queries: int, keys: int, head_positions: int) -> float:
    """Return the forward FLOPs of `queries` encoder positions attending to `keys` keys, per row,
    plus the vocabulary head on `head_positions` positions (multiply-adds counted as 2)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    inner = config.intermediate_size
    # ModernBERT's GLU projects to 2 x intermediate; BERT's MLP to 1 x.
    mlp = 3 * h * inner if getattr(config, "model_type", "") == "modernbert" else 2 * h * inner
    per_position = 4 * h * h + mlp  # q, k, v, o projections + MLP
    encoder = layers * (queries * per_position + 2 * queries * keys * h)
    head = head_positions * (h * h + h * config.vocab_size)
    return 2.0 * rows * (encoder + head)


def uncached_flops(config, rows: int, width: int, head_positions: int) -> float:
    """Return the FLOPs of one full forward of `rows` canvases of `width` positions."""
    return flops_estimate(config, rows, width, width, head_positions)


def cache_stats(caches: Dict[str, Optional[BlockCache]]) -> Tuple[int, int, float]:
    """Return (encoder positions, head positions, FLOPs) summed over the given caches."""
    live = [c for c in caches.values() if c is not None]
    return (sum(c.positions for c in live), sum(c.head_positions for c in live),
            sum(c.flops for c in live))
