r"""HiLo attention: high-frequency heads inside local windows, low-frequency heads on pooled windows.

Pan, Cai, Zhuang, "Fast Vision Transformers with HiLo Attention" (LITv2, NeurIPS 2022).

The token grid (1, 2 or 3 axes; images are ``(H, W)``) is cut into non-overlapping windows of
``window`` tokens per axis; the last window of an axis is shorter when ``window`` does not divide
it. Of the ``Hq`` query heads, the first ``Hq - lo_heads`` are Hi heads and the last ``lo_heads``
Lo heads (with GQA, Hi query heads use the first ``(Hq - lo_heads) / G`` key/value heads and Lo
heads the rest, ``G = Hq / Hkv``)::

    Hi head:  o_i = softmax over keys j in the window of i of (s q_i . k_j) v_j
    Lo head:  kbar_w = mean of k over window w,  vbar_w = mean of v over window w
              o_i = softmax over all windows w of (s q_i . kbar_w) vbar_w

Both are exact softmax attentions on :func:`attnlab.attention`: the Hi part with
``Blocked(window)`` on the token grid, the Lo part dense over the ``nW`` pooled keys (``L x nW``
logits, never ``L x S``). Non-causal self-attention. The paper pools the input ``x`` before the
Lo key/value projection (``AvgPool2d`` then ``Linear``), which equals pooling the projected keys
and values (a linear map commutes with a mean); :class:`HiLoAttention` pools ``x``, as LITv2.
LITv2's ``hilo.py`` needs ``H`` and ``W`` divisible by the window (its model pads the feature
map); here border windows are shorter and Lo pools them by the mean over their own tokens.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..api import attention
from ..geometry import Geometry, check_qkv, check_scale, unravel
from ..patterns import Blocked
from ._common import check_bool, check_self, masked_softmax, per_q_head

__all__ = ["hilo_attention", "hilo_attention_reference", "HiLoAttention", "window_mean"]

Window = int | Sequence[int]


def _check_window(window: Window, shape: tuple[int, ...]) -> tuple[int, ...]:
    nd = len(shape)
    if isinstance(window, int) and not isinstance(window, bool):
        w = (window,) * nd
    elif isinstance(window, (tuple, list)) and len(window) == nd:
        w = tuple(window)
    else:
        raise TypeError(
            f"window must be an int or a tuple of {nd} ints (one per token axis of shape {shape}), "
            f"got window={window!r}"
        )
    for ax, (wi, n) in enumerate(zip(w, shape)):
        check_int(f"window[{ax}]", wi, 1)
        if wi > n:
            raise ValueError(
                f"window[{ax}]={wi} is larger than token axis {ax} of length {n}; expected <= {n}"
            )
    return w


def _check_heads(g: Geometry, lo_heads: object) -> tuple[int, int]:
    lo = check_int("lo_heads", lo_heads, 0)
    if lo > g.q_heads:
        raise ValueError(f"lo_heads={lo} is larger than the number of query heads Hq={g.q_heads}")
    if lo % g.group_size:
        raise ValueError(
            f"lo_heads={lo} must be a multiple of the GQA group size Hq / Hkv = {g.group_size} (Lo and "
            "Hi query heads must not share a key/value head)"
        )
    return g.q_heads - lo, (g.q_heads - lo) // g.group_size


def window_mean(x: Tensor, window: tuple[int, ...]) -> Tensor:
    """``x (B, H, *T, D)`` -> ``(B, H, nW, D)``: the mean of each window (row-major window
    order); a border window averages only its own tokens."""
    nd = len(window)
    for ax, w in enumerate(window):
        dim = 2 + ax
        n = x.shape[dim]
        nw = math.ceil(n / w)
        pad = nw * w - n
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_zeros(shape)], dim)
        x = x.unflatten(dim, (nw, w)).sum(dim + 1)
        counts = torch.clamp(n - torch.arange(nw, device=x.device) * w, max=w).to(x.dtype)
        x = x / counts.view(*([1] * dim), nw, *([1] * (x.dim() - dim - 1)))
    return x.flatten(2, 1 + nd)


def hilo_attention(q: Tensor, k: Tensor, v: Tensor, *, window: Window, lo_heads: int,
                   scale: float | None = None, backend: str = "auto") -> Tensor:
    """HiLo attention (see the module docstring).

    Args:
        q: ``(B, Hq, *T, D)``; k, v: ``(B, Hkv, *T, D)`` / ``(..., Dv)``, the same token grid.
        window: window size, an int or one int per token axis, each ``<= `` its axis.
        lo_heads: how many of the last query heads are Lo heads, ``0 <= lo_heads <= Hq``, a
            multiple of ``Hq / Hkv``.
        scale: ``1/sqrt(D)`` when None. backend: passed to :func:`attnlab.attention`.

    Returns ``(B, Hq, *T, Dv)``.
    """
    g = check_qkv(q, k, v)
    check_self(g, "hilo_attention")
    w = _check_window(window, g.q_shape)
    hi, hi_kv = _check_heads(g, lo_heads)
    scale = check_scale(scale, g.head_dim)
    outs = []
    if hi:
        hi_out = attention(q[:, :hi], k[:, :hi_kv], v[:, :hi_kv], Blocked(w), scale=scale, backend=backend)
        outs.append(hi_out)
    if hi < g.q_heads:
        nd = g.ndim
        ql = q[:, hi:].flatten(2, 1 + nd)
        kp, vp = window_mean(k[:, hi_kv:], w), window_mean(v[:, hi_kv:], w)
        lo = attention(ql, kp, vp, scale=scale, backend=backend)
        outs.append(lo.unflatten(2, g.q_shape))
    return torch.cat(outs, 1) if len(outs) > 1 else outs[0]


def _window_ids(shape: tuple[int, ...], window: tuple[int, ...], device) -> tuple[Tensor, int]:
    coords = unravel(torch.arange(math.prod(shape), device=device), shape)
    nws = [math.ceil(n / w) for n, w in zip(shape, window)]
    wid = torch.zeros_like(coords[0])
    for c, w, nw in zip(coords, window, nws):
        wid = wid * nw + c // w
    return wid, math.prod(nws)


def hilo_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, window: Window, lo_heads: int,
                             scale: float | None = None) -> Tensor:
    """Dense reference of :func:`hilo_attention`: the Hi heads' ``(N, N)`` same-window mask and
    the Lo heads' window-averaging matrix ``A (nW, N)`` (``A[w, j] = [j in w] / |w|``) are built
    from the window index of every token; each head is a dense masked softmax."""
    g = check_qkv(q, k, v)
    check_self(g, "hilo_attention")
    w = _check_window(window, g.q_shape)
    hi, hi_kv = _check_heads(g, lo_heads)
    scale = check_scale(scale, g.head_dim)
    nd = g.ndim
    qf, kf, vf = (x.flatten(2, 1 + nd) for x in (q, k, v))
    wid, nw = _window_ids(g.q_shape, w, q.device)
    outs = []
    if hi:
        same = wid[:, None] == wid[None, :]
        logits = scale * qf[:, :hi] @ per_q_head(kf[:, :hi_kv], hi).transpose(-1, -2)
        outs.append(masked_softmax(logits, same) @ per_q_head(vf[:, :hi_kv], hi))
    if hi < g.q_heads:
        member = (torch.arange(nw, device=q.device)[:, None] == wid[None, :]).to(q.dtype)
        A = member / member.sum(-1, keepdim=True)
        kp, vp = A @ kf[:, hi_kv:], A @ vf[:, hi_kv:]
        lo = g.q_heads - hi
        logits = scale * qf[:, hi:] @ per_q_head(kp, lo).transpose(-1, -2)
        outs.append(torch.softmax(logits, -1) @ per_q_head(vp, lo))
    out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
    return out.unflatten(2, g.q_shape)


class HiLoAttention(nn.Module):
    """LITv2's HiLo self-attention layer on an image token grid.

    Args:
        embed_dim: ``E``, a multiple of ``num_heads``; head dim ``D = E // num_heads``.
        num_heads: heads; ``lo_heads = int(num_heads * alpha)`` of them are Lo heads, the rest Hi.
            As in LITv2, a window of 1 (every axis) makes every head a Lo head (plain global
            attention).
        window: window size ``s`` (int or ``(sh, sw)``; LITv2 uses 2).
        alpha: fraction of Lo heads, in ``[0, 1]``.
        qkv_bias: biases of the q/k/v projections.

    Parameters (LITv2's names): ``h_qkv (E -> 3*Dh)``, ``h_proj (Dh -> Dh)`` for the Hi heads,
    ``l_q (E -> Dl)``, ``l_kv (E -> 2*Dl)``, ``l_proj (Dl -> Dl)`` for the Lo heads, with
    ``Dh = hi_heads * D`` and ``Dl = lo_heads * D``. The output is ``cat(h_proj(hi), l_proj(lo))``
    on the channel axis. The Lo keys/values project the window means of ``x``.

    ``forward(x, hw)``: ``x (B, H*W, E)`` with ``hw = (H, W)``, or ``x (B, H, W, E)``; same layout
    out. ``reference=True`` runs :func:`hilo_attention_reference` on full-resolution keys.
    """

    def __init__(self, embed_dim: int, num_heads: int, window: int | tuple[int, int] = 2, alpha: float = 0.5,
                 qkv_bias: bool = False, *, device=None, dtype=None) -> None:
        super().__init__()
        check_int("embed_dim", embed_dim, 1)
        check_int("num_heads", num_heads, 1)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be a multiple of num_heads={num_heads}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be a float in [0, 1], got alpha={alpha!r}")
        check_bool("qkv_bias", qkv_bias)
        self.window = _check_window(window, (1 << 30, 1 << 30))
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = d = embed_dim // num_heads
        lo = int(num_heads * alpha)
        if self.window == (1, 1):
            lo = num_heads
        self.lo_heads, self.hi_heads = lo, num_heads - lo
        fk = {"device": device, "dtype": dtype}
        dh, dl = self.hi_heads * d, lo * d
        if self.hi_heads:
            self.h_qkv = nn.Linear(embed_dim, 3 * dh, bias=qkv_bias, **fk)
            self.h_proj = nn.Linear(dh, dh, **fk)
        if lo:
            self.l_q = nn.Linear(embed_dim, dl, bias=qkv_bias, **fk)
            self.l_kv = nn.Linear(embed_dim, 2 * dl, bias=qkv_bias, **fk)
            self.l_proj = nn.Linear(dl, dl, **fk)

    def _grid(self, x: object, hw) -> tuple[Tensor, bool]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.shape[-1] != self.embed_dim or x.dim() not in (3, 4):
            E = self.embed_dim
            raise ValueError(f"x.shape={tuple(x.shape)}, expected (B, H*W, {E}) or (B, H, W, {E})")
        if x.dim() == 4:
            if hw is not None and tuple(hw) != tuple(x.shape[1:3]):
                raise ValueError(f"hw={hw!r} does not match x.shape={tuple(x.shape)}")
            return x, False
        if (not isinstance(hw, (tuple, list)) or len(hw) != 2
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in hw)):
            raise TypeError(
                f"hw must be a pair of positive ints (H, W) for x of shape (B, N, E), got hw={hw!r}"
            )
        if hw[0] * hw[1] != x.shape[1]:
            raise ValueError(f"hw={tuple(hw)} has {hw[0] * hw[1]} tokens but x.shape[1]={x.shape[1]}")
        return x.view(x.shape[0], hw[0], hw[1], self.embed_dim), True

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None, *, reference: bool = False) -> Tensor:
        xg, flat = self._grid(x, hw)
        B, H, W, _ = xg.shape
        w = _check_window(self.window, (H, W))
        d, hh, lh = self.head_dim, self.hi_heads, self.lo_heads
        heads = lambda y, n: y.view(B, H, W, n, d).permute(0, 3, 1, 2, 4)  # noqa: E731
        merge = lambda o: o.permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)  # noqa: E731
        outs = []
        if check_bool("reference", reference):
            qs, ks, vs = [], [], []
            if hh:
                qh, kh, vh = self.h_qkv(xg).view(B, H, W, 3, hh * d).unbind(3)
                qs.append(heads(qh, hh)), ks.append(heads(kh, hh)), vs.append(heads(vh, hh))
            if lh:
                kl, vl = self.l_kv(xg).view(B, H, W, 2, lh * d).unbind(3)
                qs.append(heads(self.l_q(xg), lh)), ks.append(heads(kl, lh)), vs.append(heads(vl, lh))
            qa, ka, va = torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1)
            o = hilo_attention_reference(qa, ka, va, window=w, lo_heads=lh)
            if hh:
                outs.append(self.h_proj(merge(o[:, :hh])))
            if lh:
                outs.append(self.l_proj(merge(o[:, hh:])))
        else:
            if hh:
                qh, kh, vh = self.h_qkv(xg).view(B, H, W, 3, hh * d).unbind(3)
                o = attention(heads(qh, hh), heads(kh, hh), heads(vh, hh), Blocked(w))
                outs.append(self.h_proj(merge(o)))
            if lh:
                q = self.l_q(xg).view(B, H * W, lh, d).transpose(1, 2)
                xp = window_mean(xg.unsqueeze(1), w)[:, 0]  # (B, nW, E)
                kl, vl = self.l_kv(xp).view(B, -1, 2, lh, d).permute(2, 0, 3, 1, 4)
                o = attention(q, kl, vl).transpose(1, 2).reshape(B, H, W, lh * d)
                outs.append(self.l_proj(o))
        out = torch.cat(outs, -1) if len(outs) > 1 else outs[0]
        return out.reshape(B, H * W, self.embed_dim) if flat else out

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, hi_heads={self.hi_heads}, "
                f"lo_heads={self.lo_heads}, window={self.window}")
