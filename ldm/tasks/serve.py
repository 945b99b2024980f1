"""task=serve: the web demo of an export (chat with a live canvas, side by side, infill) and the
OpenAI-compatible API beside it (/v1/chat/completions, /v1/models).

    python run.py task=serve checkpoint=outputs/models/<run> [sampler=fast] [serve.port=7861]
    python run.py task=serve checkpoint=outputs/models/<run> serve.page=false   # the API alone

Everything the command line can get wrong (checkpoint, chat template, port, host, sampler
settings, the gradio extra) is checked before the model loads; the page itself turns bad prompts
and settings into a message and keeps serving.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.errors import ConfigError, LdmError
from ldm.sampling.settings import SamplerSettings
from ldm.tokenizer import chat_token_ids


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
    if serve.batch_window_ms < 0:
        raise ConfigError(f"serve.batch_window_ms={serve.batch_window_ms} must be >= 0 (0: "
                          f"only requests already waiting are batched)")
    if serve.max_batch < 1:
        raise ConfigError(f"serve.max_batch={serve.max_batch} must be >= 1")
    if serve.api_key is not None and not str(serve.api_key).strip():
        raise ConfigError("serve.api_key is empty; give a key or null (no key)")
    from ldm.tasks.common import check_device

    check_device(cfg.task.device)
    SamplerSettings.from_config(cfg.sampler)


def sampler_start(cfg: DictConfig, export) -> Any:
    """Return the sampler node the page starts with: the command line's, else the export's."""
    from ldm.tasks.checkpoints import command_line_overrides

    chosen = cfg.sampler
    overrides = command_line_overrides()
    if not overrides or any(o.lstrip("+~").startswith("sampler") for o in overrides):
        return chosen  # chosen on the command line (or composed by a test: taken as given)
    saved = (export.run_config or {}).get("sampler")
    if not isinstance(saved, dict) or "name" not in saved:
        return chosen
    try:
        node = OmegaConf.merge(chosen, saved)
        SamplerSettings.from_config(node, export.max_positions)
        return node
    except LdmError:  # saved with settings this version does not take: start from the preset
        return chosen
    except Exception:  # noqa: BLE001 - omegaconf merge errors (other fields): same fallback
        return chosen


def run(cfg: DictConfig) -> float:
    """Serve the page until interrupted; return 0."""
    check_serve(cfg)
    try:
        import gradio  # noqa: F401
    except ImportError as err:
        raise ConfigError("task=serve needs the serve extra (gradio): pip install -e '.[serve]'"
                          ) from err
    from ldm.tasks.checkpoints import resolve_checkpoint, with_export_groups
    from ldm.tasks.common import pick_device

    export = resolve_checkpoint(cfg.checkpoint, "serve")
    cfg = with_export_groups(cfg, export, groups=("model", "context"))
    tok = export.load_tokenizer()
    try:
        chat_token_ids(tok)
    except ConfigError as err:
        raise ConfigError(f"checkpoint={cfg.checkpoint!r} has no chat template (no <|user|> / "
                          f"<|assistant|> tokens; a pretraining export?); task=serve chats: pass "
                          f"an SFT export") from err
    start = sampler_start(cfg, export)
    SamplerSettings.from_config(start, export.max_positions)  # fits this model's positions
    host, port = str(cfg.serve.host), int(cfg.serve.port)
    check_port(host, port)
    device = pick_device(cfg.task.device)
    from ldm.serve.settings import load_presets

    presets = load_presets(Path(cfg.paths.root) / "conf" / "sampler")
    presets[start.name] = start  # the starting preset with its command-line overrides
    mask_id = export.mask_id if export.mask_id is not None else tok.mask_token_id

    from ldm.sampling import sampler_model
    from ldm.sampling.decode import chat_banned_ids
    from ldm.serve.api import ChatApi, Running, build_api
    from ldm.serve.batcher import Batcher

    model = export.load_model(dtype=cfg.model.dtype,
                              attn_implementation=cfg.model.attn_implementation,
                              trust_remote_code=cfg.model.trust_remote_code,
                              vocab_size=len(tok), device=device)
    model_fn = sampler_model(model)
    title = Path(export.where).name
    api_key = cfg.serve.api_key or os.environ.get("LDM_API_KEY") or None
    app = build_api(ChatApi(
        Batcher(model_fn, tok, mask_id=mask_id,
                special_ids=chat_banned_ids(tok, model.config.vocab_size), device=device,
                window_s=cfg.serve.batch_window_ms / 1000, max_batch=cfg.serve.max_batch),
        tok, presets, start.name, model_id=title, max_positions=export.max_positions,
        model_fn=model_fn, system=cfg.task.system, seed=cfg.seed, api_key=api_key))
    if cfg.serve.page:
        from ldm.serve.app import build_app, mount
        from ldm.serve.engine import Engine

        engine = Engine(model_fn, tok, mask_id=mask_id, max_positions=export.max_positions,
                        device=device, seed=cfg.seed, system=cfg.task.system,
                        vocab_size=model.config.vocab_size)
        demo = build_app(engine, presets, start.name, title=title,
                         concurrency=cfg.serve.concurrency, max_queue=cfg.serve.max_queue,
                         multi_turn=export.multi_turn)
        app = mount(app, demo, host, port)
    if not is_loopback(host):
        print(f"warning: serve.host={host} lets anyone who can reach this machine on port {port} "
              f"use the model (no TLS{'' if api_key else ', no API key'}; the page has no "
              f"login); use 127.0.0.1 to keep it to this machine", flush=True)
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own startup probes
    server = Running(app, host, port)
    what = "the page and the API" if cfg.serve.page else "the API"
    print(f"serving {export.where} ({what}) on http://{host}:{port} ; OpenAI-compatible API at "
          f"http://{host}:{port}/v1 (model {title!r}) (Ctrl+C stops)", flush=True)
    try:
        server.wait()  # until Ctrl+C
    finally:
        server.close()
    return 0.0
