"""task=sample: generate from an export (or hub id) with the configured sampler.

Prompt sources, one at a time: `prompt=`, `prompts_file=`, `infill=` or `interactive=true` (a
chat REPL on stdin). `chat=false` continues raw text, or samples unconditional text when no
prompt is given. Every sample goes to <run dir>/samples.jsonl and to mlflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from ldm.errors import ConfigError
from ldm.sampling.cache import check_cache_family
from ldm.sampling.settings import SamplerSettings
from ldm.tasks.checkpoints import resolve_checkpoint, with_export_groups
from ldm.tasks.naming import name_sample_run

RENDERS = ("none", "live", "gif")
def sample_mode(cfg: DictConfig) -> str:
    """Return interactive | infill | prompts | unconditional after the config-only checks."""
    from ldm.tasks.common import check_device

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
    check_device(cfg.task.device)
    if cfg.task.batch_size < 1:
        raise ConfigError(f"task.batch_size={cfg.task.batch_size} must be >= 1")
    if cfg.interactive:
        if not cfg.chat:
            raise ConfigError("interactive=true is a chat REPL and needs chat=true")
        return "interactive"
    if cfg.infill is not None:
        if cfg.sampler.cfg_scale > 0:
            raise ConfigError(f"infill has no prompt to mask for guidance; use "
                              f"sampler.cfg_scale=0, not {cfg.sampler.cfg_scale}")
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


def check_chat(tok, checkpoint: str) -> None:
    """Raise ConfigError unless the tokenizer has the chat turn tokens."""
    from ldm.tokenizer import chat_token_ids

    try:
        chat_token_ids(tok)
    except ConfigError as err:
        raise ConfigError(f"checkpoint={checkpoint!r} has no chat template (no <|user|> / "
                          f"<|assistant|> tokens; a pretraining export?); use chat=false for raw "
                          f"text, or an SFT export") from err


def check_lengths(lengths: Sequence[int], settings: SamplerSettings, what: str = "prompt"
                  ) -> None:
    """Raise ConfigError if the longest of `lengths` leaves no room for the answer."""
    if not lengths:
        return
    longest = max(range(len(lengths)), key=lambda i: lengths[i])
    which = f"{what} {longest + 1} of {len(lengths)}" if len(lengths) > 1 else what
    settings.check_prompt(lengths[longest], which)


def run(cfg: DictConfig) -> float:
    """Sample from the checkpoint; return the mean tokens per second."""
    from ldm.sampling.prompts import (Prompt, encode_infill, encode_prompt, read_infill,
                                      read_prompts_file)
    from ldm.sampling import sampler_model
    from ldm.sampling.session import Session, repl
    from ldm.tasks.common import mark_work_started, open_tracker, pick_device, run_dir

    mode = sample_mode(cfg)
    infills = read_infill(cfg.infill) if mode == "infill" else []
    prompts = []
    if cfg.prompts_file is not None:
        prompts = read_prompts_file(cfg.prompts_file, allow_empty=not cfg.chat)
    elif cfg.prompt is not None:
        prompts = [Prompt(cfg.prompt)]
    elif mode == "unconditional":
        prompts = [Prompt("") for _ in range(cfg.task.batch_size)]
    export = resolve_checkpoint(cfg.checkpoint, "sample")
    cfg = with_export_groups(cfg, export, groups=("model", "context"))
    settings = SamplerSettings.from_config(cfg.sampler, export.max_positions)
    check_cache_family(settings.cache, export.config.get("model_type"))
    tok = export.load_tokenizer()
    mask_id = export.mask_id if export.mask_id is not None else tok.mask_token_id
    chat = cfg.chat and mode in ("prompts", "interactive")
    if chat:
        check_chat(tok, cfg.checkpoint)
    system = cfg.task.system
    jobs = [(encode_prompt(tok, p, chat, system), p) for p in prompts]
    canvases = [encode_infill(tok, t, mask_id) for t in infills]
    check_lengths([len(ids) for ids, _ in jobs], settings)
    if canvases and export.max_positions is not None:
        longest = max(len(ids) for ids, _ in canvases)
        if longest > export.max_positions:
            raise ConfigError(f"an infill text has {longest} tokens, more than the model's "
                              f"max_positions={export.max_positions}; shorten it")
    device = pick_device(cfg.task.device)
    name_sample_run(cfg)
    folder = run_dir(cfg)  # samples.jsonl is appended to: a rerun of a run_name keeps the earlier

    with open_tracker(cfg) as tracker:
        tracker.set_tags({"ldm.checkpoint": export.where, "ldm.sample_mode": mode,
                          "ldm.run_dir": str(folder)})
        model = export.load_model(dtype=cfg.model.dtype,
                                  attn_implementation=cfg.model.attn_implementation,
                                  trust_remote_code=cfg.model.trust_remote_code,
                                  vocab_size=len(tok), device=device)
        mark_work_started()
        extra = {"sampler": {"name": cfg.sampler.name, **settings.as_record()},
                 "checkpoint": export.where, "seed": cfg.seed}
        with Session(sampler_model(model), tok, mask_id=mask_id, sampler=settings,
                     path=folder / "samples.jsonl", batch_size=cfg.task.batch_size,
                     seed=cfg.seed, device=device, render=cfg.render, record_extra=extra,
                     vocab_size=model.get_input_embeddings().num_embeddings) as session:
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
        tracker.log_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in session.records),
                         "samples/samples.jsonl")
        if session.gif is not None:
            tracker.log_artifact(session.save_gif(cfg.out), "render")
            print(f"gif: {cfg.out} ({len(session.gif.frames)} frames)")
    print(f"{int(summary['samples'])} samples, mean nfe {summary['mean_nfe']:.1f}, "
          f"{summary['tokens_per_second']:.1f} tokens/s; wrote {session.path}")
    return float(summary["tokens_per_second"])
