"""Sampler presets for the page (every conf/sampler/*.yaml) and checks on the settings it sends."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from ldm.errors import ConfigError
from ldm.sampling.settings import SamplerSettings

# The settings the page shows; everything else a preset holds (rule, top_k, early_stop, and what
# later sampler options add) is taken from the chosen preset as it is.
PAGE_FIELDS = ("max_new_tokens", "steps", "block_length", "threshold", "temperature", "top_p",
               "cfg_scale", "remasking")
# What an API request may set on top of its preset (the page's settings and the block cache).
API_FIELDS = (*PAGE_FIELDS, "cache")


def load_presets(folder: str | Path) -> Dict[str, Any]:
    """Return {preset name: its config node} for every sampler preset file in `folder`.

    The nodes stay unresolved, so a preset whose steps follow max_new_tokens still does when the
    page changes max_new_tokens (see `preset_values`).
    """
    from ldm.config import load_preset, preset_names

    presets: Dict[str, Any] = {name: load_preset(name, folder) for name in preset_names(folder)}
    if not presets:
        raise ConfigError(f"no sampler presets (*.yaml) in {folder}")
    return presets


def preset_values(presets: Dict[str, Any], name: str,
                  max_new_tokens: Optional[int] = None) -> Dict[str, Any]:
    """Return the resolved settings of preset `name`, with max_new_tokens set first if given."""
    from omegaconf import OmegaConf

    if name not in presets:
        raise ConfigError(f"sampler preset {name!r} is unknown; accepted: {', '.join(presets)}")
    node = presets[name].copy()
    if max_new_tokens is not None:
        node.max_new_tokens = int(max_new_tokens)
    values = OmegaConf.to_container(node, resolve=True)
    if max_new_tokens is not None and values["block_length"] > values["max_new_tokens"]:
        values["block_length"] = values["max_new_tokens"]  # one block when the answer is short
    return values


def page_settings(preset: Dict[str, Any]) -> Dict[str, Any]:
    """Return the page's values of a preset: threshold 0 and top_p 1 mean 'off'."""
    out = {k: preset[k] for k in PAGE_FIELDS}
    out["threshold"] = 0.0 if preset["threshold"] is None else preset["threshold"]
    out["top_p"] = 1.0 if preset["top_p"] is None else preset["top_p"]
    return out


def page_sampler(presets: Dict[str, Any], name: str, values: Optional[Dict[str, Any]] = None,
                 max_new_tokens: Optional[int] = None,
                 max_positions: Optional[int] = None,
                 accepted: tuple = PAGE_FIELDS) -> SamplerSettings:
    """Return the validated settings of preset `name` with the page's `values` on top."""
    args = preset_values(presets, name, max_new_tokens)
    for key, value in (values or {}).items():
        if key not in accepted:
            raise ConfigError(f"{key!r} is not a page setting; accepted: {', '.join(accepted)}")
        if value is None or value == "":
            raise ConfigError(f"{key} is empty; give it a value")
        args[key] = value
    for key in ("max_new_tokens", "steps", "block_length"):
        if float(args[key]) != int(float(args[key])):
            raise ConfigError(f"{key}={args[key]} must be a whole number")
        args[key] = int(float(args[key]))
    for key in ("temperature", "cfg_scale", "threshold", "top_p"):
        if args[key] is not None:
            args[key] = float(args[key])
    if args["threshold"] is not None and args["threshold"] <= 0:
        args["threshold"] = None
    if args["top_p"] is not None and args["top_p"] >= 1:
        args["top_p"] = None
    return SamplerSettings.from_config(args, max_positions)
