"""task=serve: the web demo of an export (chat with a live canvas, side by side, infill).

    python run.py task=serve checkpoint=outputs/models/<run> [sampler=fast] [serve.port=7861]

Everything the command line can get wrong (checkpoint, chat template, port, host, sampler
settings, the gradio extra) is checked before the model loads; the page itself turns bad prompts
and settings into a message and keeps serving.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import DictConfig, OmegaConf

from ldm.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def is_loopback(host: str) -> bool:
    """Return True when `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """Raise ConfigError unless host:port can be listened on now."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"serve.port={port} must be between 1 and 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ConfigError(f"serve.host={host!r} is not an address of this machine ({err}); use "
                          f"127.0.0.1 (this machine only) or 0.0.0.0 (every network)") from err
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ConfigError(f"serve.port={port} on {host} is in use by another program; "
                                  f"stop it or pick a free port, e.g. serve.port={port + 1}"
                                  ) from err
            raise ConfigError(f"cannot listen on serve.host={host!r} serve.port={port}: "
                              f"{err.strerror}") from err


def check_serve(cfg: DictConfig) -> None:
    """Raise ConfigError for the first bad serve setting (before any file or model is read)."""
    serve = cfg.serve
    if not str(serve.host).strip():
        raise ConfigError("serve.host is empty; use 127.0.0.1 (this machine only) or 0.0.0.0")
    if serve.concurrency < 1:
        raise ConfigError(f"serve.concurrency={serve.concurrency} must be >= 1 (model runs at "
                          f"once)")
    if serve.max_queue < 1:
        raise ConfigError(f"serve.max_queue={serve.max_queue} must be >= 1")
    if cfg.task.device not in DEVICES:
        raise ConfigError(f"task.device={cfg.task.device!r}; accepted: {', '.join(DEVICES)}")
    from ldm.sampling.validation import validate_sampler_args
    from ldm.tasks.sample import sampler_args

    args = sampler_args(cfg)
    args.pop("early_stop")
    validate_sampler_args(prompt_length=0, **args)


def sampler_defaults(cfg: DictConfig, export: Optional[str]) -> Any:
    """Return the sampler node the page starts with: the command line's, else the export's."""
    chosen = cfg.sampler
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # composed without @hydra.main (tests): take the config as given
        return chosen
    if export is None or any(o.lstrip("+~").startswith("sampler") for o in overrides):
        return chosen
    saved = Path(export) / "ldm_config.yaml"
    try:
        node = OmegaConf.load(saved).get("sampler") if saved.is_file() else None
    except Exception:  # an export's saved config is informative only; never block serving
        node = None
    if not node or "name" not in node:
        return chosen
    try:
        return OmegaConf.merge(chosen, node)
    except Exception:  # the export was made with other sampler fields: start from the preset
        return chosen


def run(cfg: DictConfig) -> float:
    """Serve the page until interrupted; return 0."""
    check_serve(cfg)
    try:
        import gradio  # noqa: F401
    except ImportError as err:
        raise ConfigError("task=serve needs the serve extra (gradio): pip install -e '.[serve]'"
                          ) from err
    from ldm.tasks.checkpoints import resolve_checkpoint
    from ldm.tasks.sample import check_length, pick_device

    ckpt = resolve_checkpoint(cfg.checkpoint, "serve")
    from ldm.tokenizer import chat_token_ids, load_tokenizer

    tok = load_tokenizer(ckpt.where)
    try:
        chat_token_ids(tok)
    except ConfigError as err:
        raise ConfigError(f"checkpoint={cfg.checkpoint!r} has no chat template (no <|user|> / "
                          f"<|assistant|> tokens; a pretraining export?); task=serve chats: pass "
                          f"an SFT export") from err
    check_length([0], cfg.sampler.max_new_tokens, ckpt.max_positions)
    host, port = str(cfg.serve.host), int(cfg.serve.port)
    check_port(host, port)
    device = pick_device(cfg.task.device)
    from ldm.serve.settings import load_presets

    presets = load_presets(Path(cfg.paths.root) / "conf" / "sampler")
    start = sampler_defaults(cfg, None if ckpt.hub else ckpt.where)
    presets[start.name] = start  # the starting preset with its command-line overrides
    mask_id = ckpt.mask_id if ckpt.mask_id is not None else tok.mask_token_id

    from ldm.serve.app import build_app, launch
    from ldm.serve.engine import Engine
    from ldm.tasks.sample import load_logits_fn

    model_fn = load_logits_fn(cfg, ckpt, len(tok), device)
    engine = Engine(model_fn, tok, mask_id=mask_id, max_positions=ckpt.max_positions,
                    device=device, seed=cfg.seed, system=cfg.task.system)
    demo = build_app(engine, presets, start.name, title=Path(ckpt.where).name,
                     concurrency=cfg.serve.concurrency, max_queue=cfg.serve.max_queue)
    if not is_loopback(host):
        print(f"warning: serve.host={host} lets anyone who can reach this machine on port {port} "
              f"use the model (no login, no TLS); use 127.0.0.1 to keep it to this machine",
              flush=True)
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own startup probes
    launch(demo, host, port)
    print(f"serving {ckpt.where} on http://{host}:{port} (Ctrl+C stops)", flush=True)
    try:
        demo.block_thread()  # until Ctrl+C
    finally:
        demo.close()
    return 0.0
