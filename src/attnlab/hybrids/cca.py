r"""Core Context Aware (CCA) attention: significance-weighted core tokens plus a local window.

Chen, You, Zhang, Li, Li, Wang, Tan, "Core Context Aware Transformers for Long Context Language
Modeling" (2024; arXiv 2412.12465, ICML 2025; v1 titled "Core Context Aware Attention for Long
Context Language Modeling").

Causal self-attention. Tokens are cut into groups of ``g = group_size`` (group ``c`` holds
positions ``c*g .. c*g + g - 1``; only the ``m = L // g`` complete groups are compressed). Per
query head, with ``s = scale`` and ``w = local_window``:

* globality-aware pooling: the last query of group ``c`` scores its group, and the group merges
  into one core token weighted by that significance::

      a_c = softmax_{j in group c}(s q_{(c+1)g-1} . k_j)
      kc_c = sum_j a_c[j] k_j,   vc_c = sum_j a_c[j] v_j

  (the paper pools the inputs, ``c = a_c X``, then projects with the shared ``W_K``, ``W_V``; a
  linear map commutes with a convex combination, so this is the same);
* locality-preserving attention: query ``p`` sees the keys ``J(p)*g .. p`` with
  ``J(p) = max(0, floor((p + 1 - w) / g))``: at least its ``w`` last tokens, extended back to a
  group boundary (the paper's window of ``w + ((i - w) mod g)`` tokens, 1-indexed ``i = p + 1``);
* the core tokens of the groups before that window, ``c < J(p)`` (every earlier token is
  reached exactly once, directly or through its core token);
* fusion: one softmax over the concatenated core and local keys (the paper's "differentiable
  fusion": ``softmax(q [K_core; K_local]^T) [V_core; V_local]``).

Details taken from the paper's equations as summarised in third-party notes (the paper text
itself was not available here): the 0-indexed window start ``J(p)*g`` above is chosen so that
the window has the paper's size ``w + ((i - w) mod g)`` and meets the core tokens without overlap.

Fast path on :func:`attnlab.attention`: the core tokens are one attention of the ``m`` group-end
queries over their own group (``BlockSparse``, keys and values concatenated as the values), the
core part is ``BlockSparse`` over the ``(L, m)`` core visibility and the local part
``BlockSparse(layout, (1, g)) & Causal()``; the two are merged by log-sum-exp (exactly the joint
softmax). No discrete choice: gradients flow through everything, the significance weights too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_int
from ..api import attention
from ..geometry import check_qkv, check_scale
from ..merge import merge_attentions
from ..patterns import BlockSparse, Causal
from ._common import Projections, check_1d, check_bool, check_self, masked_softmax, per_q_head

__all__ = [
    "core_context_aware_attention", "core_context_aware_attention_reference", "CoreContextAwareAttention",
]


def _check(q, k, v, group_size, local_window):
    g = check_qkv(q, k, v)
    check_1d(g, "core_context_aware_attention")
    check_self(g, "core_context_aware_attention")
    return g, check_int("group_size", group_size, 1), check_int("local_window", local_window, 1)


def _window_start_group(L: int, G: int, w: int, device) -> Tensor:
    """``J(p)`` for every query position ``p``: the first group of its local window."""
    p = torch.arange(L, device=device)
    return torch.clamp(torch.div(p + 1 - w, G, rounding_mode="floor"), min=0)


def core_context_aware_attention(q: Tensor, k: Tensor, v: Tensor, *, group_size: int, local_window: int,
                                 scale: float | None = None, backend: str = "auto") -> Tensor:
    """CCA attention (see the module docstring).

    Args:
        q: ``(B, Hq, L, D)``; k, v: ``(B, Hkv, L, D)`` / ``(..., Dv)`` (causal self-attention).
        group_size: ``g``, tokens per core token. local_window: ``w >= 1``, the minimum local
            window (``w >= L``: plain causal attention; ``g == 1``: also plain causal attention).
        scale: ``1/sqrt(D)`` when None. backend: passed to :func:`attnlab.attention`.

    Returns ``(B, Hq, L, Dv)``.
    """
    g, G, w = _check(q, k, v, group_size, local_window)
    scale = check_scale(scale, g.head_dim)
    L, dev = g.q_len, q.device
    nkb = math.ceil(L / G)
    J = _window_start_group(L, G, w, dev)
    local = torch.arange(nkb, device=dev)[None, :] >= J[:, None]
    o_loc, l_loc = attention(q, k, v, BlockSparse(local, (1, G)) & Causal(), scale=scale, return_lse=True,
                             backend=backend)
    m = L // G
    if m == 0 or int(J.max()) == 0:
        return o_loc
    own = torch.eye(m, nkb, dtype=torch.bool, device=dev)
    q_end = q[:, :, G - 1: m * G: G]  # (B, Hq, m, D)
    kv = torch.cat([k, v], -1)
    core = attention(q_end, k, kv, BlockSparse(own, (1, G)), scale=scale, backend=backend)
    kc, vc = core[..., : g.head_dim].contiguous(), core[..., g.head_dim:].contiguous()
    visible = torch.arange(m, device=dev)[None, :] < J[:, None]
    o_core, l_core = attention(q, kc, vc, BlockSparse(visible, (1, 1)), scale=scale, return_lse=True,
                               backend=backend)
    return merge_attentions([o_loc, o_core], [l_loc, l_core])[0]


def core_context_aware_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, group_size: int,
                                           local_window: int, scale: float | None = None) -> Tensor:
    """Dense reference of :func:`core_context_aware_attention`: significance weights from the
    group-end queries' masked ``(m, L)`` logits, core tokens as their weighted sums, then one
    masked softmax over ``[L local | m core]`` logits with the masks of the definition."""
    g, G, w = _check(q, k, v, group_size, local_window)
    scale = check_scale(scale, g.head_dim)
    Hq, L, dev = g.q_heads, g.q_len, q.device
    kf, vf = per_q_head(k, Hq), per_q_head(v, Hq)
    p = torch.arange(L, device=dev)
    m = L // G
    c = torch.arange(m, device=dev)
    ends = (c + 1) * G - 1
    in_group = (p[None, :] // G) == c[:, None]  # (m, L)
    a = masked_softmax(scale * q[:, :, ends] @ kf.transpose(-1, -2), in_group)  # (B, Hq, m, L)
    kc, vc = a @ kf, a @ vf
    start = G * torch.clamp(torch.div(p + 1 - w, G, rounding_mode="floor"), min=0)
    local = (p[None, :] <= p[:, None]) & (p[None, :] >= start[:, None])  # (L, L)
    core = (c[None, :] + 1) * G <= start[:, None]  # group entirely before the window
    logits = torch.cat([scale * q @ kf.transpose(-1, -2), scale * q @ kc.transpose(-1, -2)], -1)
    P = masked_softmax(logits, torch.cat([local, core], -1))
    return P[..., :L] @ vf + P[..., L:] @ vc


class CoreContextAwareAttention(Projections):
    """Causal multi-head self-attention with CCA (:func:`core_context_aware_attention`).

    Args:
        embed_dim: ``E``; num_heads: ``Hq``; num_kv_heads: GQA (default ``Hq``).
        group_size, local_window: as in the function. bias: projection biases.

    Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, shared by the pooling and the
    local module (as in the paper, no extra parameters). ``x (B, L, E) -> (B, L, E)``;
    ``forward(x, reference=True)`` runs the dense reference.
    """

    def __init__(self, embed_dim: int, num_heads: int, group_size: int, local_window: int, *,
                 num_kv_heads: int | None = None, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, num_kv_heads, bias, {"device": device, "dtype": dtype})
        self.group_size = check_int("group_size", group_size, 1)
        self.local_window = check_int("local_window", local_window, 1)

    def forward(self, x: Tensor, *, reference: bool = False) -> Tensor:
        q, k, v = self.qkv(x)
        ref = check_bool("reference", reference)
        fn = core_context_aware_attention_reference if ref else core_context_aware_attention
        return self.out(fn(q, k, v, group_size=self.group_size, local_window=self.local_window))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, group_size={self.group_size}, "
                f"local_window={self.local_window}")
