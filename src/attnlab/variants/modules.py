"""``nn.Module`` s of the softmax variants: self-attention layers on ``x (B, L, E)`` with
packed q/k/v projections (``in_proj (E -> 3E)``, ``out_proj (E -> E)``, as
:class:`attnlab.nn.MultiheadAttention`-style layers), plus the parameter-light token
re-weightings (GAAM, context broadcasting). Each wraps the function of its own file; see
those docstrings for the exact semantics and papers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._checks import check_int
from .cog import cog_attention
from .context_broadcast import context_broadcasting
from .gaussian import gaussian_adaptive_attention
from .mixture_of_heads import mixture_of_heads_attention, moh_balance_loss, moh_gates
from .multi_token import multi_token_attention
from .reversed import reversed_attention
from .._checks import check_bool
from .._packed import PackedSelfAttention
from ._shell import module_pattern
from .selective import selective_attention
from .sigmoid import sigmoid_attention
from .talking_heads import talking_heads_attention

__all__ = [
    "SelectiveAttention", "CogAttention", "MultiTokenAttention", "TalkingHeadsAttention",
    "MixtureOfHeadAttention", "GaussianAdaptiveAttention", "SigmoidAttention",
    "ContextBroadcasting", "ReversedAttention",
]


class SelectiveAttention(PackedSelfAttention):
    """Causal self-attention with selective attention (Leviathan et al., 2024): head 0's
    ReLU'd logits, accumulated over earlier queries, are subtracted from every head's logits.
    Parameter-free beyond the projections. ``x (B, L, E) -> (B, L, E)``; see
    :func:`attnlab.variants.selective_attention`."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, *, chunk_size: int = 128,
                 device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, bias, device, dtype)
        self.chunk_size = check_int("chunk_size", chunk_size, 1)
        self.reset_projections()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(x)
        return self.out_proj(self.merge(selective_attention(q, k, v, chunk_size=self.chunk_size)))

    def extra_repr(self) -> str:
        return self._base_repr() + f", chunk_size={self.chunk_size}"


class CogAttention(PackedSelfAttention):
    """Self-attention with signed weights ``sign(s) softmax(|s|)`` (Cog attention, Lv et al.,
    2024) over ``pattern`` (None: Full; ``attnlab.Causal()`` for a decoder). ``x (B, L, E) ->
    (B, L, E)``; see :func:`attnlab.variants.cog_attention`."""

    def __init__(self, embed_dim: int, num_heads: int, pattern: Any = None, bias: bool = True, *,
                 device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, bias, device, dtype)
        self.pattern = module_pattern(pattern)
        self.reset_projections()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(x)
        return self.out_proj(self.merge(cog_attention(q, k, v, self.pattern)))

    def extra_repr(self) -> str:
        return self._base_repr() + f", pattern={self.pattern!r}"


class MultiTokenAttention(PackedSelfAttention):
    """Multi-Token Attention (Golovneva et al., 2025): a learned per-head ``(c_q, c_k)``
    convolution over the logit map (queries looking back, keys centred), masked with 0 before
    and ``-inf`` after, and optional head mixing in groups of ``head_group`` heads.

    Parameters: ``kernel (H, c_q, c_k)``, initialised to the identity (a 1 at the current
    query and key, so the layer starts as plain attention); ``head_mix (H / c_h, c_h, c_h)``
    initialised to identity matrices when ``head_group`` is set. ``x (B, L, E) -> (B, L, E)``;
    see :func:`attnlab.variants.multi_token_attention`."""

    def __init__(self, embed_dim: int, num_heads: int, kernel_size: tuple[int, int] = (3, 5), *,
                 pattern: Any = None, head_group: int | None = None, head_mix_position: str = "post",
                 bias: bool = True, chunk_size: int = 64, device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, bias, device, dtype)
        if (not isinstance(kernel_size, (tuple, list)) or len(kernel_size) != 2
                or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in kernel_size)):
            raise ValueError(f"kernel_size={kernel_size!r}, expected two positive ints (c_q, c_k)")
        self.kernel_size = tuple(kernel_size)
        self.pattern = module_pattern(pattern)
        self.chunk_size = check_int("chunk_size", chunk_size, 1)
        if head_mix_position not in ("pre", "post"):
            raise ValueError(f"head_mix_position={head_mix_position!r}, expected 'pre' or 'post'")
        self.head_mix_position = head_mix_position
        fk = {"device": device, "dtype": dtype}
        self.kernel = nn.Parameter(torch.empty(num_heads, *self.kernel_size, **fk))
        self.head_group = None
        self.head_mix = None
        if head_group is not None:
            ch = check_int("head_group", head_group, 1)
            if num_heads % ch:
                raise ValueError(f"head_group={head_group!r}, expected a divisor of num_heads={num_heads}")
            self.head_group = ch
            self.head_mix = nn.Parameter(torch.empty(num_heads // ch, ch, ch, **fk))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier projections; identity kernel and head mixing (plain attention at init)."""
        self.reset_projections()
        with torch.no_grad():
            self.kernel.zero_()
            self.kernel[:, 0, self.kernel_size[1] // 2] = 1.0
            if self.head_mix is not None:
                self.head_mix.copy_(torch.eye(self.head_group).expand_as(self.head_mix))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(x)
        out = multi_token_attention(q, k, v, self.kernel, self.pattern, head_mix=self.head_mix,
                                    head_mix_position=self.head_mix_position, chunk_size=self.chunk_size)
        return self.out_proj(self.merge(out))

    def extra_repr(self) -> str:
        return (self._base_repr() + f", kernel_size={self.kernel_size}, head_group={self.head_group}, "
                f"head_mix_position={self.head_mix_position!r}, pattern={self.pattern!r}")


class TalkingHeadsAttention(PackedSelfAttention):
    """Talking-heads attention (Shazeer et al., 2020): learned ``logits_mix (H, H_l)`` across
    heads before the softmax and ``weights_mix (H_l, H)`` after it, over ``pattern``.
    Initialised to identities when ``num_logit_heads == num_heads`` (plain attention at
    init), else to ``normal(0, 1/sqrt(fan_in))``. ``x (B, L, E) -> (B, L, E)``; see
    :func:`attnlab.variants.talking_heads_attention`."""

    def __init__(self, embed_dim: int, num_heads: int, num_logit_heads: int | None = None, *,
                 pattern: Any = None, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, bias, device, dtype)
        self.num_logit_heads = num_heads if num_logit_heads is None else check_int("num_logit_heads", num_logit_heads, 1)
        self.pattern = module_pattern(pattern)
        fk = {"device": device, "dtype": dtype}
        self.logits_mix = nn.Parameter(torch.empty(num_heads, self.num_logit_heads, **fk))
        self.weights_mix = nn.Parameter(torch.empty(self.num_logit_heads, num_heads, **fk))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.reset_projections()
        with torch.no_grad():
            if self.num_logit_heads == self.num_heads:
                self.logits_mix.copy_(torch.eye(self.num_heads))
                self.weights_mix.copy_(torch.eye(self.num_heads))
            else:
                self.logits_mix.normal_(0.0, self.num_heads ** -0.5)
                self.weights_mix.normal_(0.0, self.num_logit_heads ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(x)
        out = talking_heads_attention(q, k, v, self.logits_mix, self.weights_mix, self.pattern)
        return self.out_proj(self.merge(out))

    def extra_repr(self) -> str:
        return self._base_repr() + f", num_logit_heads={self.num_logit_heads}, pattern={self.pattern!r}"


class MixtureOfHeadAttention(PackedSelfAttention):
    """Mixture-of-Head attention (MoH, 2024): ``num_shared`` always-on heads plus the
    ``top_k`` of the other heads chosen per token by a router; the head outputs are summed
    with the gates of :func:`attnlab.variants.moh_gates` (through ``out_proj``), and rows a
    token did not route to are not computed.

    Parameters besides the projections: ``router (E -> H - num_shared)``, and with shared
    heads ``shared_router (E -> num_shared)`` and ``balance (E -> 2)`` (no biases). After each
    forward ``self.balance_loss`` holds MoH's load-balance loss (add ``beta *`` it to the
    training loss). ``x (B, L, E) -> (B, L, E)``."""

    def __init__(self, embed_dim: int, num_heads: int, top_k: int, num_shared: int = 0, *,
                 pattern: Any = None, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, bias, device, dtype)
        self.num_shared = check_int("num_shared", num_shared, 0)
        routed = num_heads - self.num_shared
        if routed < 1:
            raise ValueError(f"num_shared={num_shared!r}, expected fewer than num_heads={num_heads}")
        self.top_k = check_int("top_k", top_k, 1)
        if top_k > routed:
            raise ValueError(f"top_k={top_k!r}, expected at most the {routed} routed heads")
        self.pattern = module_pattern(pattern)
        fk = {"device": device, "dtype": dtype}
        self.router = nn.Linear(embed_dim, routed, bias=False, **fk)
        self.shared_router = nn.Linear(embed_dim, self.num_shared, bias=False, **fk) if self.num_shared else None
        self.balance = nn.Linear(embed_dim, 2, bias=False, **fk) if self.num_shared else None
        self.balance_loss: torch.Tensor | None = None
        self.reset_projections()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(x)
        r = self.router(x)
        if self.num_shared:
            gates = moh_gates(r, self.top_k, self.shared_router(x), self.balance(x))
        else:
            gates = moh_gates(r, self.top_k)
        self.balance_loss = moh_balance_loss(r, self.top_k)
        out = mixture_of_heads_attention(q, k, v, gates, self.pattern)
        return self.out_proj(self.merge(out))

    def extra_repr(self) -> str:
        return self._base_repr() + f", top_k={self.top_k}, num_shared={self.num_shared}, pattern={self.pattern!r}"


class GaussianAdaptiveAttention(nn.Module):
    """Multi-head Gaussian adaptive attention (GAAM, 2024): the ``E`` features are split into
    ``num_heads`` heads and each head reweights its features by a product of
    ``num_gaussians`` Gaussians with learnable mean offsets and scales, normalised along
    ``axis`` (``"tokens"`` or ``"features"``); see
    :func:`attnlab.variants.gaussian_adaptive_attention`. No q/k/v projections (GAAM has no
    dot product). Parameters ``mean_offset (H, G)`` (init 0) and ``log_scale (H, G)`` (init 0,
    scale 1). ``x (B, L, E) -> (B, L, E)``."""

    def __init__(self, embed_dim: int, num_heads: int, num_gaussians: int = 1, *, axis: str = "tokens",
                 eps: float = 1e-8, device=None, dtype=None) -> None:
        super().__init__()
        check_int("embed_dim", embed_dim, 1)
        check_int("num_heads", num_heads, 1)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim!r}, expected a multiple of num_heads={num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.num_gaussians = check_int("num_gaussians", num_gaussians, 1)
        if axis not in ("tokens", "features"):
            raise ValueError(f"axis={axis!r}, expected 'tokens' or 'features'")
        self.axis, self.eps = axis, eps
        fk = {"device": device, "dtype": dtype}
        self.mean_offset = nn.Parameter(torch.zeros(num_heads, num_gaussians, **fk))
        self.log_scale = nn.Parameter(torch.zeros(num_heads, num_gaussians, **fk))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x={type(x).__name__}, expected a torch.Tensor")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x.shape={tuple(x.shape)}, expected (B, L, {self.embed_dim})")
        B, L, E = x.shape
        xh = x.view(B, L, self.num_heads, E // self.num_heads).transpose(1, 2)
        out = gaussian_adaptive_attention(xh, self.mean_offset, self.log_scale.exp(), axis=self.axis, eps=self.eps)
        return out.transpose(1, 2).reshape(B, L, E)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_gaussians={self.num_gaussians}, "
                f"axis={self.axis!r}")


class SigmoidAttention(PackedSelfAttention):
    """Sigmoid self-attention (Ramapuram et al., 2024): ``sigmoid(s + b) @ v`` per head over
    ``pattern``, ``b = logit_bias`` or ``-log(L)`` when None, with an optional score mod
    (ALiBi, ...). ``x (B, L, E) -> (B, L, E)``; see :func:`attnlab.variants.sigmoid_attention`."""

    def __init__(self, embed_dim: int, num_heads: int, pattern: Any = None, *, score_mod: Any = None,
                 logit_bias: float | None = None, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, bias, device, dtype)
        self.pattern = module_pattern(pattern)
        self.score_mod = score_mod
        if logit_bias is not None and (isinstance(logit_bias, bool) or not isinstance(logit_bias, (int, float))):
            raise TypeError(f"logit_bias={logit_bias!r}, expected a float or None")
        self.logit_bias = logit_bias
        self.reset_projections()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(x)
        out = sigmoid_attention(q, k, v, self.pattern, self.score_mod, bias=self.logit_bias)
        return self.out_proj(self.merge(out))

    def extra_repr(self) -> str:
        return self._base_repr() + f", pattern={self.pattern!r}, logit_bias={self.logit_bias}"


class ContextBroadcasting(nn.Module):
    """Context broadcasting (Hyeon-Woo et al., 2023): ``x + mean_tokens(x)``, parameter free;
    with ``learnable_scale=True`` (needs ``embed_dim``) the mean is scaled per channel by a
    learned vector initialised to 1. ``x (B, N, C) -> (B, N, C)``."""

    def __init__(self, embed_dim: int | None = None, learnable_scale: bool = False, *, device=None,
                 dtype=None) -> None:
        super().__init__()
        check_bool("learnable_scale", learnable_scale)
        if learnable_scale and embed_dim is None:
            raise ValueError("learnable_scale=True needs embed_dim (the channel count C)")
        self.embed_dim = None if embed_dim is None else check_int("embed_dim", embed_dim, 1)
        self.scale = nn.Parameter(torch.ones(embed_dim, device=device, dtype=dtype)) if learnable_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x={type(x).__name__}, expected a torch.Tensor")
        if x.dim() != 3 or (self.embed_dim is not None and x.shape[-1] != self.embed_dim):
            raise ValueError(f"x.shape={tuple(x.shape)}, expected (B, N, {self.embed_dim or 'C'})")
        return context_broadcasting(x, 1, 1.0 if self.scale is None else self.scale)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, learnable_scale={self.scale is not None}"


class ReversedAttention(PackedSelfAttention):
    """DependencyViT's reversed attention (Ding et al., 2023): weights normalised over the
    queries, so each (child) token distributes its value over the (parent) tokens that see it.
    With ``message_gate=True`` a learned per-token, per-head gate ``sigmoid(W x + b)``
    (``message_gate_proj``, E -> H) scales what each token sends (our reading of the paper's
    message controller). ``x (B, L, E) -> (B, L, E)``; see
    :func:`attnlab.variants.reversed_attention`."""

    def __init__(self, embed_dim: int, num_heads: int, pattern: Any = None, *, message_gate: bool = False,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, bias, device, dtype)
        self.pattern = module_pattern(pattern)
        check_bool("message_gate", message_gate)
        self.message_gate_proj = (nn.Linear(embed_dim, num_heads, device=device, dtype=dtype)
                                  if message_gate else None)
        self.reset_projections()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(x)
        if self.message_gate_proj is not None:
            v = v * torch.sigmoid(self.message_gate_proj(x)).transpose(1, 2).unsqueeze(-1)
        return self.out_proj(self.merge(reversed_attention(q, k, v, self.pattern)))

    def extra_repr(self) -> str:
        return self._base_repr() + f", pattern={self.pattern!r}, message_gate={self.message_gate_proj is not None}"
