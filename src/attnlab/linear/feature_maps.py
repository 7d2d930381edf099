"""Feature maps ``phi: (..., D) -> (..., F)`` for linear attention.

Linear attention replaces the softmax kernel ``exp(q . k)`` by a dot product of feature maps,
``phi(q) . phi(k)``, so that the attention can be computed with an ``F x Dv`` state instead of
an ``L x L`` matrix (see :mod:`attnlab.linear.forms`). Every map here is an ``nn.Module`` that
acts on the last dimension and has ``out_dim(head_dim) -> F``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnlab._checks import check_int

__all__ = ["Identity", "EluPlusOne", "ReLU", "PerformerRandomFeatures"]


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
    """Positive random features for the softmax kernel (FAVOR+ without orthogonalisation).

    ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)``, with ``W`` an ``(m, D)`` matrix of i.i.d.
    standard normal entries (``m = num_features``), so that for every ``q, k``
    ``E_W[phi(q) . phi(k)] = exp(q . k)`` (unbiased, and ``phi > 0``). To approximate
    ``softmax(q . k / sqrt(D))`` scale ``q`` and ``k`` by ``D ** -0.25`` before the map.

    ``W`` is drawn from a ``torch.Generator`` seeded with ``seed`` (deterministic given the seed,
    independent of the global RNG) and stored as the buffer ``weight``; :meth:`redraw` draws a
    fresh one. The rows are not orthogonalised.

    Choromanski et al., "Rethinking Attention with Performers", ICLR 2021.
    """

    weight: torch.Tensor

    def __init__(self, dim: int, num_features: int, seed: int = 0):
        super().__init__()
        self.dim = check_int("dim", dim, 1)
        self.num_features = check_int("num_features", num_features, 1)
        self.register_buffer("weight", self._draw(check_int("seed", seed, 0)))
        self.seed = seed

    def _draw(self, seed: int) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn(self.num_features, self.dim, generator=gen, dtype=torch.float64)

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
        w = self.weight.to(device=x.device, dtype=x.dtype)
        proj = x @ w.transpose(0, 1)
        sq = 0.5 * (x * x).sum(dim=-1, keepdim=True)
        return torch.exp(proj - sq) / math.sqrt(self.num_features)

    def out_dim(self, head_dim: int) -> int:
        if check_int("head_dim", head_dim, 1) != self.dim:
            raise ValueError(f"head_dim must equal dim={self.dim}, got head_dim={head_dim}")
        return self.num_features

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_features={self.num_features}, seed={self.seed}"
