"""Learnable feature maps: Hedgehog's softmax MLP and T2R's ReLU MLP.

Both apply an affine map ``x W + b`` to every head's ``D``-vector, shared across heads or one
per head (``num_heads`` given: inputs must then have exactly that many heads on dim 1 of
``(B, H, L, D)``), followed by their nonlinearity.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnlab._checks import check_int

__all__ = ["Hedgehog", "T2R"]


class _HeadwiseAffine(nn.Module):
    """``x W + b`` on the last dim; ``W (H|1, D, F)``, ``b (H|1, F)``."""

    def __init__(self, head_dim: int, feature_dim: int | None, num_heads: int | None):
        super().__init__()
        self.head_dim = check_int("head_dim", head_dim, 1)
        self.feature_dim = head_dim if feature_dim is None else check_int("feature_dim", feature_dim, 1)
        self.num_heads = None if num_heads is None else check_int("num_heads", num_heads, 1)
        n = self.num_heads or 1
        self.weight = nn.Parameter(torch.empty(n, self.head_dim, self.feature_dim))
        self.bias = nn.Parameter(torch.empty(n, self.feature_dim))

    def affine(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"x must be (B, H, L, head_dim={self.head_dim}), got x.shape={tuple(x.shape)}")
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if self.num_heads is None:
            return x @ w[0] + b[0]
        if x.shape[1] != self.num_heads:
            raise ValueError(f"x must have num_heads={self.num_heads} heads on dim 1, got x.shape={tuple(x.shape)}")
        return torch.einsum("bhld,hdf->bhlf", x, w) + b[None, :, None]

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, feature_dim={self.feature_dim}, num_heads={self.num_heads}"


class Hedgehog(_HeadwiseAffine):
    """Hedgehog's feature map, ``F = 2 * feature_dim``:
    ``phi(x) = [softmax(x W + b), softmax(-(x W + b))]`` (softmax over the features).

    Spiky and monotonic like ``exp`` (the property the paper shows linear attention needs to
    mimic softmax), always positive. ``W`` starts as the identity (padded/truncated when
    ``feature_dim != head_dim``) and ``b`` as zero; train it, e.g. to match softmax attention
    weights (the paper's distillation loss).

    Zhang, Bhatia, Kumbong, Ré, "The Hedgehog & the Porcupine: Expressive Linear Attentions
    with Softmax Mimicry", ICLR 2024.
    """

    def __init__(self, head_dim: int, feature_dim: int | None = None, num_heads: int | None = None):
        super().__init__(head_dim, feature_dim, num_heads)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            n = min(self.head_dim, self.feature_dim)
            self.weight[:, range(n), range(n)] = 1.0
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.affine(x)
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)

    def out_dim(self, head_dim: int) -> int:
        if check_int("head_dim", head_dim, 1) != self.head_dim:
            raise ValueError(f"head_dim must equal {self.head_dim}, got head_dim={head_dim}")
        return 2 * self.feature_dim


class T2R(_HeadwiseAffine):
    """T2R's feature map, ``F = feature_dim``: ``phi(x) = relu(x W + b)`` (learned; init as
    ``nn.Linear``).

    Kasai et al., "Finetuning Pretrained Transformers into RNNs", EMNLP 2021.
    """

    def __init__(self, head_dim: int, feature_dim: int | None = None, num_heads: int | None = None):
        super().__init__(head_dim, feature_dim, num_heads)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.head_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.affine(x))

    def out_dim(self, head_dim: int) -> int:
        if check_int("head_dim", head_dim, 1) != self.head_dim:
            raise ValueError(f"head_dim must equal {self.head_dim}, got head_dim={head_dim}")
        return self.feature_dim
