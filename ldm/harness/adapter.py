"""`lm_eval --model ldm`: an lm-evaluation-harness model for ldm exports (masked diffusion LMs).

    lm_eval --model ldm --model_args pretrained=outputs/models/<run>,mc_num=64,sampler=fast \
        --tasks ldm_cloze --include_path <suite folder>

- loglikelihood: the Monte Carlo ELBO of the continuation (elbo.py); is_greedy by decoding the
  continuation's length with the sampler preset (greedy) and comparing tokens.
- loglikelihood_rolling: the ELBO summed over disjoint windows of the model's positions.
- generate_until: the sampler preset plus overrides, batched; the task's stop strings are cut
  after decoding. Model calls (NFE), tokens and seconds are counted in `stats`.

Model arguments: pretrained (an export folder or hub id), mc_num (128), batch_size (16 model
rows per forward pass), cfg_scale (0; classifier-free guidance of likelihoods and generation),
sampler (a conf/sampler preset, llada), any sampler field (steps, block_length, max_new_tokens,
threshold, temperature, remasking, ...), greedy (auto: decode is_greedy for single-continuation
requests but not for each option of a multiple-choice item; true: always; false: never), seed
(0), device (auto | cpu | cuda), dtype (float32), chat (false: contexts are raw text; true: each
context is a user turn in the export's chat template). A task can ask for chat prompts per
request with `ldm_chat: true` in its generation_kwargs. The weights load on the first request,
after every request of that call is checked.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional, Tuple

from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry, register_model

from ldm.errors import ConfigError
from ldm.harness.elbo import check_estimator_args, mc_elbo, model_logits_at
from ldm.harness.generation import (SAMPLER_FIELDS, cut_at_stops, generate_batch,
                                    sampler_settings)

log = logging.getLogger("ldm")

TRUE = ("1", "true", "yes", "on")


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in TRUE


def _int(name: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} must be an integer") from None


def _forget_older_entry() -> None:
    """Drop a lazy "ldm" entry naming another module than this one: the one a .pth written by an
    older ldm registers (ldm.benchmark.adapter), which would make registering LdmLM an error."""
    entries = getattr(model_registry, "_objs", None)
    current = entries.get("ldm") if isinstance(entries, dict) else None
    if isinstance(current, str) and current != f"{__name__}:LdmLM":
        del entries["ldm"]


_forget_older_entry()


@register_model("ldm")
class LdmLM(LM):
    """An ldm export as an lm-eval model: MC-ELBO likelihoods, generation through the sampler."""

    def __init__(self, pretrained: Optional[str] = None, mc_num: int = 128, batch_size: Any = 16,
                 cfg_scale: float = 0.0, sampler: str = "llada", greedy: Any = "auto",
                 seed: int = 0, device: Optional[str] = "auto", dtype: str = "float32",
                 chat: Any = False, max_batch_size: Any = None, **sampler_overrides):
        super().__init__()
        from ldm.export import read_export

        if pretrained is None:
            raise ConfigError("model_args needs pretrained=<export folder or hub id>")
        self.mc_num = _int("mc_num", mc_num)
        self.batch_size_per_call = _int("batch_size", 16 if str(batch_size).startswith("auto")
                                        else batch_size)
        self.cfg_scale = float(cfg_scale)
        check_estimator_args(self.mc_num, self.batch_size_per_call, self.cfg_scale)
        self.sampler_name = sampler
        # one guidance scale for likelihoods and generation, as in LLaDA's evaluation
        self.sampler_overrides = {k: v for k, v in sampler_overrides.items()
                                  if k in SAMPLER_FIELDS and k != "cfg_scale"}
        self.sampler_overrides["cfg_scale"] = self.cfg_scale
        extra = sorted(set(sampler_overrides) - set(SAMPLER_FIELDS))
        if extra:
            raise ConfigError(f"unknown model argument {extra[0]!r}; accepted: pretrained, "
                              f"mc_num, batch_size, cfg_scale, sampler, greedy, seed, device, "
                              f"dtype, chat and the sampler fields {', '.join(SAMPLER_FIELDS)}")
        self.checkpoint = read_export(str(pretrained), "pretrained")
        self.max_positions = self.checkpoint.max_positions
        self.default_settings = sampler_settings(sampler, self.sampler_overrides,
                                                 max_positions=self.max_positions)
        self.greedy = "auto" if str(greedy).lower() == "auto" else _flag(greedy)
        self.chat, self.seed = _flag(chat), _int("seed", seed)
        self.dtype = dtype
        self.device_name = device or "auto"
        self.tok = self.checkpoint.load_tokenizer()
        self.mask_id = (self.checkpoint.mask_id if self.checkpoint.mask_id is not None
                        else self.tok.mask_token_id)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self._model = None
        self.stats: Dict[str, float] = {"loglikelihood_requests": 0, "loglikelihood_seconds": 0.0,
                                        "model_rows": 0, "generate_requests": 0,
                                        "generate_seconds": 0.0, "generate_tokens": 0,
                                        "generate_nfe": 0}

    # --- model and tokens -----------------------------------------------------------------

    @property
    def torch_device(self):
        """Return the torch device (auto = cuda when available)."""
        import torch

        if self.device_name == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is available; use auto or cpu")
        use_cuda = self.device_name not in ("cpu",) and torch.cuda.is_available()
        return torch.device("cuda" if use_cuda else "cpu")

    @property
    def model(self):
        """Return the masked LM, loading it on first use."""
        if self._model is None:
            self._model = self.checkpoint.load_model(dtype=self.dtype, vocab_size=len(self.tok),
                                                     device=self.torch_device)
        return self._model

    def encode(self, text: str) -> List[int]:
        """Return the ids of `text` as plain text (no [CLS]/[SEP])."""
        from ldm.sampling.prompts import encode_text

        return encode_text(self.tok, text)

    def encode_prompt(self, text: str, chat: bool) -> List[int]:
        """Return the prompt ids the sampler continues: raw text, or a user turn in chat layout."""
        if not chat:
            return self.encode(text)
        from ldm.tokenizer import encode_chat

        return encode_chat(self.tok, [{"role": "user", "content": text}],
                           add_generation_prompt=True)[0]

    def check_length(self, total: int, what: str) -> None:
        """Raise ConfigError if `total` tokens exceed the model's positions."""
        if self.max_positions is not None and total > self.max_positions:
            raise ConfigError(f"{what} has {total} tokens, more than the {self.max_positions} "
                              f"positions of {self.checkpoint.where}; lower num_fewshot or the "
                              "generation length, or use a model with more positions")

    @property
    def tokenizer_name(self) -> str:
        """Return the tokenizer's name (for the harness's cache keys)."""
        return str(getattr(self.tok, "name_or_path", "ldm")).replace("/", "__")

    # --- the harness's three request types ------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        """Return (MC-ELBO of the continuation, whether greedy decoding produces it) per request.

        With greedy=auto, is_greedy is decoded only for requests that are alone for their
        document: the options of a multiple-choice item are ranked by likelihood (acc,
        acc_norm) and get False, which saves one decoding per option.
        """
        pairs = []
        for req in requests:
            context, continuation = req.args
            # chat=true: the context is a user turn and the continuation begins the answer
            ctx, cont = self.encode_prompt(context, self.chat), self.encode(continuation)
            if not cont:
                raise ConfigError(f"continuation {continuation!r} encodes to no tokens")
            self.check_length(len(ctx) + len(cont), "a context plus continuation")
            pairs.append((ctx, cont))
        decode = None
        if self.greedy == "auto":
            per_doc: Dict[Any, int] = {}
            keys = [(getattr(r, "task_name", None), getattr(r, "doc_id", None), id(r.doc))
                    for r in requests]
            for key in keys:
                per_doc[key] = per_doc.get(key, 0) + 1
            decode = [per_doc[key] == 1 for key in keys]
        return self.score_pairs(pairs, disable_tqdm, decode)

    def score_pairs(self, pairs: List[Tuple[List[int], List[int]]], disable_tqdm: bool = True,
                    decode: Optional[List[bool]] = None) -> List[Tuple[float, bool]]:
        """Return (MC-ELBO, is_greedy) for (context ids, continuation ids) pairs.

        `decode` says per pair whether to decode is_greedy (default: as the greedy setting).
        """
        from tqdm.auto import tqdm

        began = time.perf_counter()
        bar = tqdm(total=len(pairs) * self.mc_num, desc="MC-ELBO rows", unit="row",
                   disable=disable_tqdm)
        scores = mc_elbo(model_logits_at(self.model), pairs, mask_id=self.mask_id,
                         pad_id=self.pad_id, mc_num=self.mc_num,
                         batch_size=self.batch_size_per_call, seed=self.seed,
                         cfg_scale=self.cfg_scale, device=self.torch_device, progress=bar.update)
        bar.close()
        if decode is None:
            decode = [bool(self.greedy)] * len(pairs)
        greedy = [False] * len(pairs)
        chosen = [i for i, on in enumerate(decode) if on]
        if chosen:
            for i, hit in zip(chosen, self.greedy_matches([pairs[i] for i in chosen])):
                greedy[i] = hit
        self.stats["loglikelihood_requests"] += len(pairs)
        self.stats["model_rows"] += len(pairs) * self.mc_num * (2 if self.cfg_scale > 0 else 1)
        self.stats["loglikelihood_seconds"] += time.perf_counter() - began
        return list(zip(scores, greedy))

    def greedy_matches(self, pairs: List[Tuple[List[int], List[int]]]) -> List[bool]:
        """Return whether greedy decoding of each continuation's length reproduces it."""
        from ldm.sampling.sampler import sampler_model

        model_fn = sampler_model(self.model)
        out: List[Optional[bool]] = [None] * len(pairs)
        by_length: Dict[int, List[int]] = {}
        for i, (_, cont) in enumerate(pairs):
            by_length.setdefault(len(cont), []).append(i)
        for length, members in sorted(by_length.items()):
            settings = sampler_settings(self.sampler_name,
                                        {**self.sampler_overrides, "temperature": 0.0,
                                         "early_stop": False}, max_new_tokens=length,
                                        max_positions=self.max_positions)
            for start in range(0, len(members), self.batch_size_per_call):
                chunk = members[start:start + self.batch_size_per_call]
                results = generate_batch(model_fn, self.tok, [pairs[i][0] for i in chunk],
                                         settings, mask_id=self.mask_id, seed=self.seed,
                                         device=self.torch_device)
                for i, result in zip(chunk, results):
                    out[i] = result["tokens"] == list(pairs[i][1])
        return [bool(x) for x in out]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Return the ELBO of each whole text, summed over disjoint windows of the positions."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        width = (self.max_positions or 512) - 1
        owners, pairs = [], []
        for n, req in enumerate(requests):
            (text,) = req.args[:1]
            for window in get_rolling_token_windows(self.encode(text), self.tok.eos_token_id,
                                                    width, 1):
                ctx, cont = make_disjoint_window(window)
                owners.append(n)
                pairs.append((list(ctx), list(cont)))
        saved, self.greedy = self.greedy, False
        try:
            scores = self.score_pairs(pairs, disable_tqdm)
        finally:
            self.greedy = saved
        totals = [0.0] * len(requests)
        for n, (score, _) in zip(owners, scores):
            totals[n] += score
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Return the sampled continuation of each context, cut at the task's stop strings."""
        from ldm.sampling.sampler import sampler_model

        jobs = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            stops = kwargs.get("until") or []
            stops = [stops] if isinstance(stops, str) else list(stops)
            chat = _flag(kwargs.get("ldm_chat", self.chat))
            length = _int("max_gen_toks", kwargs.get("max_gen_toks",
                                                     self.default_settings.max_new_tokens))
            overrides = dict(self.sampler_overrides)
            if "temperature" in kwargs and _flag(kwargs.get("do_sample", False)):
                overrides["temperature"] = float(kwargs["temperature"])
            settings = sampler_settings(self.sampler_name, overrides, max_new_tokens=length,
                                        max_positions=self.max_positions)
            prompt = self.encode_prompt(context, chat)
            self.check_length(len(prompt) + length, "a prompt plus max_gen_toks")
            jobs.append((prompt, stops, settings))
        model_fn = sampler_model(self.model)
        out: List[Optional[str]] = [None] * len(jobs)
        groups: Dict[Any, List[int]] = {}
        for i, (_, _, settings) in enumerate(jobs):
            groups.setdefault(settings, []).append(i)
        for b, members in enumerate(groups.values()):
            for start in range(0, len(members), self.batch_size_per_call):
                chunk = members[start:start + self.batch_size_per_call]
                results = generate_batch(model_fn, self.tok, [jobs[i][0] for i in chunk],
                                         jobs[chunk[0]][2], mask_id=self.mask_id,
                                         seed=self.seed * 1_000_003 + start,
                                         device=self.torch_device)
                for i, result in zip(chunk, results):
                    out[i] = cut_at_stops(result["text"], jobs[i][1]).strip()
                    self.stats["generate_nfe"] += result["nfe"]
                    self.stats["generate_tokens"] += len(result["tokens"])
                    self.stats["generate_seconds"] += result["seconds"]
                    self.stats["generate_requests"] += 1
        return [str(x) for x in out]

    def summary(self) -> Dict[str, float]:
        """Return speed figures: seconds per item, mean NFE and tokens/s of generation."""
        s = self.stats
        out: Dict[str, float] = {}
        if s["loglikelihood_requests"]:
            out["loglikelihood_requests"] = float(s["loglikelihood_requests"])
            out["seconds_per_loglikelihood"] = (s["loglikelihood_seconds"]
                                                / s["loglikelihood_requests"])
            out["model_rows"] = float(s["model_rows"])
        if s["generate_requests"]:
            out["generate_requests"] = float(s["generate_requests"])
            out["mean_nfe"] = s["generate_nfe"] / s["generate_requests"]
            out["seconds_per_generation"] = s["generate_seconds"] / s["generate_requests"]
            out["tokens_per_second"] = (s["generate_tokens"] / s["generate_seconds"]
                                        if s["generate_seconds"] > 0 else 0.0)
        return out
