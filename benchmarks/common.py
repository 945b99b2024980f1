"""What several benchmark scripts share: card peaks, device sync, a measured matmul peak, and the
one count of a training step's FLOPs (so every script reports the same MFU for the same run).

A script imports it as a sibling (`from common import ...`): Python puts a running script's folder
on sys.path.

FLOPs of one forward + backward step: 6 x encoder parameters (embeddings excluded) x tokens;
attention 12 x hidden x attended keys per token and layer (the context on a global layer, the
window on a sliding-window layer: ModernBERT's local layers attend to 128 keys); and the MLM head
(6 x rows x (hidden^2 + hidden x vocab)) at the rows it is applied to (the masked ones for ldm's
sparse head, every position for a dense one). Under SDPA the sliding-window layers still multiply
the dense L x L scores (a masked kernel); that work is not counted as useful.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

# Dense (no sparsity) datasheet peaks in FLOP/s, by card, for bf16 and fp32 (no TF32) math.
# Matched against torch.cuda.get_device_name(), lowercased, in this order; the first card whose
# every needle is in the name wins (so the more specific names come first).
PEAKS = [
    ("H100 NVL", ("h100", "nvl"), {"bf16": 835e12, "fp32": 60e12}),
    ("H100 PCIe", ("h100", "pcie"), {"bf16": 756e12, "fp32": 51e12}),
    ("H100 SXM", ("h100",), {"bf16": 989e12, "fp32": 67e12}),  # "NVIDIA H100 80GB HBM3"
    ("H200", ("h200",), {"bf16": 989e12, "fp32": 67e12}),  # GH200 too
    ("B200", ("b200",), {"bf16": 2250e12}),
    ("A100 80GB", ("a100", "80gb"), {"bf16": 312e12, "fp32": 19.5e12}),
    ("A100 40GB", ("a100", "40gb"), {"bf16": 312e12, "fp32": 19.5e12}),
    ("A100", ("a100",), {"bf16": 312e12, "fp32": 19.5e12}),
    ("L40S", ("l40s",), {"bf16": 362e12}),
    ("A10G", ("a10g",), {"bf16": 70e12}),
    ("L4", ("l4",), {"bf16": 121e12}),
]


def short_commit() -> str:
    """Return the repository's short HEAD commit, as the benchmarks print it beside their figures."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True).stdout.strip()


def spread(values: List[float], fmt: str = "{:,.0f}") -> str:
    """Return "median (min-max)" of `values`, each formatted with `fmt`."""
    return (f"{fmt.format(statistics.median(values))} "
            f"({fmt.format(min(values))}-{fmt.format(max(values))})")


def card_peak(name: str, precision: str = "bf16") -> Tuple[Optional[str], Optional[float]]:
    """Return (label, FLOP/s) of the datasheet dense peak of a card name at `precision`, or
    (None, None) when the card, or its figure at that precision, is not in PEAKS."""
    lowered = name.lower()
    for label, needles, peaks in PEAKS:
        if all(n in lowered for n in needles):
            return (label, peaks[precision]) if precision in peaks else (None, None)
    return None, None


def sync(device: str) -> None:
    """Wait for queued GPU work (timings must include it)."""
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, n: Optional[int] = None, timings: int = 5,
                calls: int = 10) -> float:
    """Return the dense matmul FLOP/s measured on this device: the median of `timings` timings
    of `calls` n x n products each (n: 8192 on a GPU, 1024 on CPU), after 3 warm-up products."""
    n = n or (8192 if device == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(timings):
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        sync(device)
        times.append((time.perf_counter() - start) / calls)
    return 2 * n ** 3 / statistics.median(times)


def attended_keys(config, context: int) -> List[int]:
    """Return, per layer, how many keys each query attends to (the window on sliding layers)."""
    layers = config.num_hidden_layers
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * layers)
    window = getattr(config, "local_attention", None)
    return [min(context, window) if kind == "sliding_attention" and window else context
            for kind in types]


def step_flops(model, tokens: int, context: int, head_rows: float) -> float:
    """Return the FLOPs of one forward + backward step: encoder, attention (windows counted) and
    the head at head_rows rows."""
    cfg = model.config
    embed = model.get_input_embeddings().weight.numel()
    encoder = sum(p.numel() for p in model.base_model.parameters()) - embed
    hidden = cfg.hidden_size
    attention = 12 * hidden * sum(attended_keys(cfg, context)) * tokens
    head = 6 * head_rows * (hidden * hidden + hidden * cfg.vocab_size)
    return 6 * encoder * tokens + attention + head
