"""Feature maps ``phi: (..., D) -> (..., F)`` for linear attention.

Linear attention replaces the softmax kernel ``exp(q . k)`` by a dot product of feature maps,
``phi(q) . phi(k)``, so that the attention can be computed with an ``F x Dv`` state instead of
an ``L x L`` matrix (see :mod:`attnlab.linear.forms`). Every map here is an ``nn.Module`` that
acts on the last dimension of ``(B, H, L, D)`` inputs and has ``out_dim(head_dim) -> F``. A map
whose ``needs_positions`` is True (cosFormer) is called as ``phi(x, positions, length)`` with
the token index of every row and the length ``M`` of its reweighting.

Any callable ``x -> phi(x)`` works with :func:`attnlab.linear_attention` too; these are the
ones of the literature.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnlab._checks import check_int

__all__ = [
    "Identity", "EluPlusOne", "ReLU", "PerformerRandomFeatures", "CosFormer", "TaylorExp",
]


class Identity(nn.Module):
    """``phi(x) = x`` (plain, un-normalised linear attention; ``F = D``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def out_dim(self, head_dim: int) -> int:
        return check_int("head_dim", head_dim, 1)


class EluPlusOne(nn.Module):
    """``phi(x) = elu(x) + 1`` elementwise, i.e. ``x + 1`` for ``x > 0`` and ``exp(x)`` otherwise
    (strictly positive; ``F = D``).

    Katharopoulos, Vyas, Pappas, Fleuret, "Transformers are RNNs: Fast Autoregressive
    Transformers with Linear Attention", ICML 2020.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1.0

    def out_dim(self, head_dim: int) -> int:
        return check_int("head_dim", head_dim, 1)


class ReLU(nn.Module):
    """``phi(x) = max(x, 0)`` elementwise (non-negative; ``F = D``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)

    def out_dim(self, head_dim: int) -> int:
        return check_int("head_dim", head_dim, 1)


class PerformerRandomFeatures(nn.Module):
    """Positive random features for the softmax kernel (FAVOR+).

    ``phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m)`` with ``x' = input_scale * x`` and ``W`` an
    ``(m, D)`` random matrix (``m = num_features``), so that
    ``E_W[phi(q) . phi(k)] = exp(input_scale^2 q . k)``, unbiased and ``phi > 0``. The default
    ``input_scale = D ** -0.25`` makes that ``exp(q . k / sqrt(D))``: normalised linear attention
    with this map approximates softmax attention. Rows of ``W`` are i.i.d. standard normal, or,
    with ``orthogonal=True`` (FAVOR+ proper), orthogonal within blocks of ``D`` rows and rescaled
    to chi-distributed norms (still unbiased, lower variance).

    ``W`` is drawn from a ``torch.Generator`` seeded with ``seed`` (deterministic given the seed,
    independent of the global RNG) and stored as the buffer ``weight``; :meth:`redraw` draws a
    fresh one.

    Choromanski et al., "Rethinking Attention with Performers", ICLR 2021.
    """

    weight: torch.Tensor

    def __init__(self, dim: int, num_features: int, seed: int = 0, *,
                 input_scale: float | None = None, orthogonal: bool = False):
        super().__init__()
        self.dim = check_int("dim", dim, 1)
        self.num_features = check_int("num_features", num_features, 1)
        if not isinstance(orthogonal, bool):
            raise TypeError(f"orthogonal must be a bool, got orthogonal={orthogonal!r}")
        self.orthogonal = orthogonal
        if input_scale is None:
            input_scale = dim ** -0.25
        if isinstance(input_scale, bool) or not isinstance(input_scale, (int, float)) or input_scale <= 0:
            raise ValueError(f"input_scale must be a positive float, got input_scale={input_scale!r}")
        self.input_scale = float(input_scale)
        self.register_buffer("weight", self._draw(check_int("seed", seed, 0)))
        self.seed = seed

    def _draw(self, seed: int) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        m, d = self.num_features, self.dim
        if not self.orthogonal:
            return torch.randn(m, d, generator=gen, dtype=torch.float64)
        blocks = []
        for _ in range(-(-m // d)):
            q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
            blocks.append(q.T)
        w = torch.cat(blocks)[:m]
        norms = torch.randn(m, d, generator=gen, dtype=torch.float64).norm(dim=1, keepdim=True)
        return w * norms

    def redraw(self, seed: int) -> None:
        """Replace ``weight`` by the draw for ``seed`` (keeping its device and dtype)."""
        new = self._draw(check_int("seed", seed, 0))
        self.weight = new.to(device=self.weight.device, dtype=self.weight.dtype)
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"x must have last dimension dim={self.dim}, got x.shape={tuple(x.shape)}"
            )
        x = x * self.input_scale
        w = self.weight.to(device=x.device, dtype=x.dtype)
        proj = x @ w.transpose(0, 1)
        sq = 0.5 * (x * x).sum(dim=-1, keepdim=True)
        return torch.exp(proj - sq) / math.sqrt(self.num_features)

    def out_dim(self, head_dim: int) -> int:
        if check_int("head_dim", head_dim, 1) != self.dim:
            raise ValueError(f"head_dim must equal dim={self.dim}, got head_dim={head_dim}")
        return self.num_features

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_features={self.num_features}, seed={self.seed}, "
                f"input_scale={self.input_scale:.4g}, orthogonal={self.orthogonal}")


class CosFormer(nn.Module):
    """cosFormer's re-weighted ReLU features, ``F = 2 D``.

    ``phi(x_i) = [relu(x_i) cos(pi i / (2 M)), relu(x_i) sin(pi i / (2 M))]``, so that
    ``phi(q_i) . phi(k_j) = (relu(q_i) . relu(k_j)) cos(pi (i - j) / (2 M))``: a non-negative
    similarity that favours nearby tokens (the cosine is >= 0 while ``|i - j| <= M``).
    ``M = max_len`` when given (needed for decoding with a carried state, so every call uses
    the same ``M``); otherwise :func:`attnlab.linear_attention` passes the number of tokens of the
    call. Positions must lie in ``[0, M]``.

    Qin et al., "cosFormer: Rethinking Softmax in Attention", ICLR 2022.
    """

    needs_positions = True

    def __init__(self, max_len: int | None = None):
        super().__init__()
        self.max_len = None if max_len is None else check_int("max_len", max_len, 1)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        M = self.max_len or length
        if positions.numel() and int(positions.max()) > M:
            raise ValueError(f"cosFormer positions must be <= M={M}, got a position "
                             f"{int(positions.max())}; raise max_len")
        angle = (math.pi / (2 * M)) * positions.to(dtype=x.dtype, device=x.device)[:, None]
        r = torch.relu(x)
        return torch.cat([r * torch.cos(angle), r * torch.sin(angle)], dim=-1)

    def out_dim(self, head_dim: int) -> int:
        return 2 * check_int("head_dim", head_dim, 1)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}"


class TaylorExp(nn.Module):
    """Second-order Taylor features of ``exp``, ``F = 1 + D + D^2``.

    ``phi(x) = [1, x', vec(x' x'^T) / sqrt(2)]`` with ``x' = input_scale * x`` (default
    ``D ** -0.25``), so that ``phi(q) . phi(k) = 1 + s + s^2 / 2`` with
    ``s = input_scale^2 q . k`` (``q . k / sqrt(D)`` by default): the Taylor expansion of
    ``exp(s)``, which is positive for every ``s``. Based applies it to small projected
    feature dimensions (``D = 16``), where ``D^2`` stays cheap.

    Arora et al., "Simple linear attention language models balance the recall-throughput
    tradeoff" (Based), 2024; Zhang et al., "The Hedgehog & the Porcupine", 2024.
    """

    def __init__(self, input_scale: float | None = None):
        super().__init__()
        if input_scale is not None and (isinstance(input_scale, bool)
                                        or not isinstance(input_scale, (int, float)) or input_scale <= 0):
            raise ValueError(f"input_scale must be a positive float or None, got input_scale={input_scale!r}")
        self.input_scale = input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.input_scale if self.input_scale is not None else x.shape[-1] ** -0.25
        x = x * scale
        outer = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2.0)
        return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)

    def out_dim(self, head_dim: int) -> int:
        d = check_int("head_dim", head_dim, 1)
        return 1 + d + d * d

    def extra_repr(self) -> str:
        return f"input_scale={self.input_scale}"
