"""Per-head decay schedules for :func:`attnlab.linear_attention` (``decay=``)."""

from __future__ import annotations

import torch

from attnlab._checks import check_int

__all__ = ["retnet_decay", "tnl_decay"]


def retnet_decay(num_heads: int) -> torch.Tensor:
    """RetNet's multi-scale decay ``gamma_h = 1 - 2^(-5 - h)``, ``h = 0 .. H-1`` (float64).

    Sun et al., "Retentive Network: A Successor to Transformer for Large Language Models", 2023.
    """
    h = torch.arange(check_int("num_heads", num_heads, 1), dtype=torch.float64)
    return 1.0 - torch.pow(2.0, -5.0 - h)


def tnl_decay(num_heads: int, layer: int = 0, num_layers: int = 1) -> torch.Tensor:
    """TransNormerLLM's decay ``lambda_h = exp(-(8 h / H) (1 - l / L))`` for head ``h`` of
    layer ``l`` (0-based) of ``L`` layers (float64); the last layers decay least.

    Qin et al., "TransNormerLLM: A Faster and Better Large Language Model with Improved
    TransNormer", 2023.
    """
    H = check_int("num_heads", num_heads, 1)
    n = check_int("num_layers", num_layers, 1)
    if not 0 <= check_int("layer", layer, 0) < n:
        raise ValueError(f"layer must lie in [0, num_layers={n}), got layer={layer}")
    h = torch.arange(H, dtype=torch.float64)
    return torch.exp(-(8.0 * h / H) * (1.0 - layer / n))
