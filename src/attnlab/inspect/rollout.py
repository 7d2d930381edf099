"""Attention rollout: "Quantifying Attention Flow in Transformers" (Abnar and Zuidema, 2020).

Raw attention of one layer says how a layer mixes its inputs, not how the output tokens
depend on the input tokens. Rollout accounts for the residual connections and multiplies the
layers: with the head-fused map ``A_l`` of layer ``l`` (``(L, L)``, rows sum to 1),

    Ahat_l    = normalize_rows(residual * I + (1 - residual) * A_l)
    rollout_l = Ahat_l @ rollout_{l-1},   rollout_{start - 1} = I

so ``rollout[i, j]`` is the share of input token ``j`` in the last layer's token ``i``. The
paper uses ``residual = 0.5`` and the mean over heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .metrics import stack_maps

__all__ = ["attention_rollout", "fuse_heads"]


def fuse_heads(probs: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """``(..., H, L, S) -> (..., L, S)``: the mean, max or min over heads (``how``). Rows of the
    max / min are not distributions; :func:`attention_rollout` renormalises them."""
    if how == "mean":
        return probs.mean(-3)
    if how == "max":
        return probs.amax(-3)
    if how == "min":
        return probs.amin(-3)
    raise ValueError(f"head_fusion={how!r}, expected 'mean', 'max' or 'min'")


def attention_rollout(maps: torch.Tensor | Sequence[torch.Tensor], *, residual: float = 0.5,
                      head_fusion: str = "mean", start_layer: int = 0, return_all: bool = False) -> torch.Tensor:
    """The attention rollout of a stack of self-attention maps (module docstring).

    Args:
        maps: ``(layers, ..., H, L, L)`` (e.g. :meth:`Recording.stack`) or a list of
            ``(..., H, L, L)`` maps, first layer first.
        residual: the weight of the identity (the residual connection), in ``[0, 1]``; 0 is
            the plain product of the maps, 1 gives the identity.
        head_fusion: ``"mean"`` (the paper), ``"max"`` or ``"min"`` over heads.
        start_layer: layers before it are skipped (their rollout is the identity).
        return_all: also return every intermediate rollout.

    Returns:
        ``(..., L, L)`` (the rollout after the last layer), or ``(layers, ..., L, L)`` with
        ``return_all`` (entry ``l`` after layer ``l``; the identity before ``start_layer``).
        Rows sum to 1. Identity maps roll out to the identity at any ``residual``.
    """
    stack = stack_maps(maps)
    L, S = stack.shape[-2:]
    if L != S:
        raise ValueError(f"maps have L={L} queries and S={S} keys, expected self-attention (L == S) for rollout")
    if isinstance(residual, bool) or not isinstance(residual, (int, float)) or not 0 <= residual <= 1:
        raise ValueError(f"residual={residual!r}, expected a number in [0, 1]")
    layers = stack.shape[0]
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer < layers:
        raise ValueError(f"start_layer={start_layer!r}, expected an int in [0, {layers})")
    eye = torch.eye(L, dtype=stack.dtype, device=stack.device)
    fused = fuse_heads(stack, head_fusion)  # (layers, ..., L, L)
    roll = torch.broadcast_to(eye, fused.shape[1:]).clone()
    out = []
    for layer in range(layers):
        if layer >= start_layer:
            a = residual * eye + (1 - residual) * fused[layer]
            a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
            roll = a @ roll
        out.append(roll)
    return torch.stack(out) if return_all else roll
