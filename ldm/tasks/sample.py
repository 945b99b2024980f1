"""task=sample: generate from an export (or hub id) with the configured sampler.

Prompt sources, one at a time: `prompt=`, `prompts_file=`, `infill=` or `interactive=true` (a
chat REPL on stdin). `chat=false` continues raw text, or samples unconditional text when no
prompt is given. Every sample goes to <run dir>/samples.jsonl and to mlflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from ldm.errors import ConfigError, LdmError
from ldm.tasks.checkpoints import Checkpoint, resolve_checkpoint

RENDERS = ("none", "live", "gif")
DEVICES = ("auto", "cpu", "cuda")
SAMPLER_FIELDS = ("max_new_tokens", "steps", "block_length", "remasking", "temperature", "top_k",
                  "top_p", "cfg_scale", "threshold", "early_stop", "rule", "cache", "gamma")


def sampler_args(cfg: DictConfig) -> Dict[str, Any]:
    """Return the sampler group as keyword arguments of `generate`."""
    return {k: cfg.sampler[k] for k in SAMPLER_FIELDS}


def sample_mode(cfg: DictConfig) -> str:
    """Return interactive | infill | prompts | unconditional after the config-only checks."""
    given = [name for name, on in (("prompt", cfg.prompt is not None),
                                   ("prompts_file", cfg.prompts_file is not None),
                                   ("infill", cfg.infill is not None),
                                   ("interactive", cfg.interactive)) if on]
    if len(given) > 1:
        raise ConfigError(f"give one prompt source, not {' and '.join(given)}: prompt=, "
                          f"prompts_file=, infill= or interactive=true")
    if cfg.render not in RENDERS:
        raise ConfigError(f"render={cfg.render!r} is unknown; accepted: {', '.join(RENDERS)}")
    if cfg.render == "gif" and not cfg.out:
        raise ConfigError("render=gif needs out=<path.gif> for the animation")
    if cfg.render == "gif" and Path(cfg.out).suffix.lower() != ".gif":
        raise ConfigError(f"out={cfg.out!r} must end in .gif for render=gif")
    if cfg.task.device not in DEVICES:
        raise ConfigError(f"task.device={cfg.task.device!r}; accepted: {', '.join(DEVICES)}")
    if cfg.task.batch_size < 1:
        raise ConfigError(f"task.batch_size={cfg.task.batch_size} must be >= 1")
    from ldm.sampling.validation import validate_sampler_args

    args = sampler_args(cfg)
    args.pop("early_stop")
    validate_sampler_args(prompt_length=0, **args)
    if cfg.interactive:
        if not cfg.chat:
            raise ConfigError("interactive=true is a chat REPL and needs chat=true")
        return "interactive"
    if cfg.infill is not None:
        if cfg.sampler.rule != "commit" or cfg.sampler.cfg_scale > 0:
            raise ConfigError(f"infill fills masks with sampler.rule='commit' and no guidance; got "
                              f"rule={cfg.sampler.rule!r}, cfg_scale={cfg.sampler.cfg_scale}")
        return "infill"
    if cfg.prompt is not None:
        from ldm.sampling.prompts import check_prompt_text

        check_prompt_text(cfg.prompt)
    if cfg.prompt is not None and cfg.chat and not cfg.prompt.strip():
        raise ConfigError("prompt is empty; write a question, or use chat=false for "
                          "unconditional text")
    if cfg.prompt is None and cfg.prompts_file is None:
        if cfg.chat:
            raise ConfigError("no prompt given: pass prompt=\"...\", prompts_file=<.txt|.jsonl>, "
                              "infill=\"... [MASK:N] ...\", interactive=true, or chat=false for "
                              "unconditional text")
        return "unconditional"
    return "prompts"


def pick_device(name: str):
    """Return the torch device for task.device (auto = cuda when available)."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("task.device=cuda but no CUDA device is available; use auto or cpu")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def check_chat(tok, checkpoint: str) -> None:
    """Raise ConfigError unless the tokenizer has the chat turn tokens."""
    from ldm.tokenizer import chat_token_ids

    try:
        chat_token_ids(tok)
    except ConfigError as err:
        raise ConfigError(f"checkpoint={checkpoint!r} has no chat template (no <|user|> / "
                          f"<|assistant|> tokens; a pretraining export?); use chat=false for raw "
                          f"text, or an SFT export") from err


def check_length(lengths: Sequence[int], new_tokens: int, max_positions: Optional[int]) -> None:
    """Raise ConfigError if the longest prompt + new tokens exceeds the model's positions."""
    if max_positions is None or not lengths:
        return
    longest = max(range(len(lengths)), key=lambda i: lengths[i])
    if lengths[longest] + new_tokens > max_positions:
        which = f"prompt {longest + 1} of {len(lengths)} has" if len(lengths) > 1 else "prompt has"
        raise ConfigError(f"{which} {lengths[longest]} tokens; + {new_tokens} new tokens = "
                          f"{lengths[longest] + new_tokens} exceeds the model's "
                          f"max_position_embeddings={max_positions}; shorten the prompt or lower "
                          f"sampler.max_new_tokens")


def load_logits_fn(cfg: DictConfig, ckpt: Checkpoint, vocab: int, device):
    """Return the sampler's logits function of the checkpoint's model, on `device`."""
    from ldm.model import load_model
    from ldm.sampling import hf_logits_fn

    model = load_model("hub" if ckpt.hub else "export", ckpt.where, dtype=cfg.model.dtype,
                       attn_implementation=cfg.model.attn_implementation,
                       trust_remote_code=cfg.model.trust_remote_code)
    if model.get_input_embeddings().num_embeddings < vocab:
        raise LdmError(f"checkpoint={ckpt.where!r}: the model has "
                       f"{model.get_input_embeddings().num_embeddings} embeddings but its "
                       f"tokenizer {vocab} tokens; the export is inconsistent")
    return hf_logits_fn(model.to(device).eval())


def run(cfg: DictConfig) -> float:
    """Sample from the checkpoint; return the mean tokens per second."""
    from ldm.sampling.prompts import (Prompt, encode_infill, encode_prompt, read_infill,
                                      read_prompts_file)
    from ldm.sampling.cache import check_cache_family
    from ldm.sampling.session import Session, repl
    from ldm.tasks.common import open_tracker, run_dir
    from ldm.tokenizer import load_tokenizer

    mode = sample_mode(cfg)
    args = sampler_args(cfg)
    infills = read_infill(cfg.infill) if mode == "infill" else []
    prompts = []
    if cfg.prompts_file is not None:
        prompts = read_prompts_file(cfg.prompts_file, allow_empty=not cfg.chat)
    elif cfg.prompt is not None:
        prompts = [Prompt(cfg.prompt)]
    elif mode == "unconditional":
        prompts = [Prompt("") for _ in range(cfg.task.batch_size)]
    ckpt = resolve_checkpoint(cfg.checkpoint, "sample")
    check_cache_family(cfg.sampler.cache, ckpt.config.get("model_type"))
    tok = load_tokenizer(ckpt.where)
    mask_id = ckpt.mask_id if ckpt.mask_id is not None else tok.mask_token_id
    chat = cfg.chat and mode in ("prompts", "interactive")
    if chat:
        check_chat(tok, cfg.checkpoint)
    system = cfg.task.system
    jobs = [(encode_prompt(tok, p, chat, system), p) for p in prompts]
    canvases = [encode_infill(tok, t, mask_id) for t in infills]
    check_length([len(ids) for ids, _ in jobs], args["max_new_tokens"], ckpt.max_positions)
    check_length([len(ids) for ids, _ in canvases], 0, ckpt.max_positions)
    device = pick_device(cfg.task.device)
    folder = run_dir(cfg)
    (folder / "samples.jsonl").unlink(missing_ok=True)  # a rerun of this run_name starts afresh
    settings = OmegaConf.to_container(cfg.sampler, resolve=True)

    with open_tracker(cfg) as tracker:
        tracker.set_tags({"ldm.checkpoint": ckpt.where, "ldm.sample_mode": mode,
                          "ldm.run_dir": str(folder)})
        model_fn = load_logits_fn(cfg, ckpt, len(tok), device)
        extra = {"sampler": settings, "checkpoint": ckpt.where, "seed": cfg.seed}
        with Session(model_fn, tok, mask_id=mask_id, sampler=args, path=folder / "samples.jsonl",
                     batch_size=cfg.task.batch_size, seed=cfg.seed, device=device,
                     render=cfg.render, max_positions=ckpt.max_positions,
                     record_extra=extra) as session:
            if mode == "interactive":
                repl(session, system)
            elif mode == "infill":
                session.infill(canvases, infills)
            else:
                session.prompts(jobs, chat, system)
        if not session.records:
            print("no samples taken")
            return 0.0
        summary = session.summary()
        tracker.log_metrics(summary, step=0)
        tracker.log_artifact(session.path, "samples")
        if session.gif is not None:
            tracker.log_artifact(session.save_gif(cfg.out), "render")
            print(f"gif: {cfg.out} ({len(session.gif.frames)} frames)")
    print(f"{int(summary['samples'])} samples, mean nfe {summary['mean_nfe']:.1f}, "
          f"{summary['tokens_per_second']:.1f} tokens/s; wrote {session.path}")
    return float(summary["tokens_per_second"])
