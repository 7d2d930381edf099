r"""Mamba's selective state-space scan and its hidden attention matrix.

"The Hidden Attention of Mamba Models" (Ali, Zimerman and Wolf, 2024), on the selective SSM
(S6) of "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (Gu and Dao, 2023).
For every channel ``d`` (``Dm`` of them), with state size ``N`` and ``t = 0..L-1``::

    h_t[d] = exp(delta_t[d] A[d]) * h_{t-1}[d] + delta_t[d] B_t x_t[d]      (h_{-1} = h0 or 0)
    y_t[d] = C_t . h_t[d]  +  D[d] x_t[d]                                   (D optional)

(``*`` elementwise over the ``N`` state entries: ``A`` is diagonal). Shapes: ``x, delta (Bt, Dm,
L)``, ``A (Dm, N)``, ``B, C (Bt, N, L)`` (input-dependent), ``D (Dm,)``, ``h0 (Bt, Dm, N)``.
``delta`` must be positive and ``A`` non-positive (Mamba uses ``A = -exp(A_log)``), so every
decay ``exp(delta A)`` lies in ``(0, 1]`` and only non-positive numbers are exponentiated.

Unrolled, ``y = alpha @ x + D x`` (for ``h0 = 0``) with the causal hidden attention matrix

    alpha[d, i, j] = C_i . (prod_{s=j+1..i} exp(delta_s[d] A[d])) delta_j[d] B_j    (j <= i)

and ``alpha[d, i, j] = 0`` for ``j > i``.

* :func:`selective_scan_reference`: the defining loop over ``t``.
* :func:`selective_scan`: a Hillis-Steele parallel prefix scan (``ceil(log2 L)`` vectorised
  steps, no loop over tokens).
* :func:`mamba_implicit_attention`: ``alpha``, dense ``(Bt, Dm, L, L)``.
"""

from __future__ import annotations

import torch

__all__ = ["mamba_implicit_attention", "selective_scan", "selective_scan_reference"]

_HALF = (torch.float16, torch.bfloat16)


def _tensor(name: str, x: object, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point tensor, got {name}.dtype={x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {name}.shape={tuple(x.shape)}")
    return x


def _expect(name: str, x: torch.Tensor, shape: tuple, layout: str, like: torch.Tensor) -> None:
    if tuple(x.shape) != shape:
        raise ValueError(
            f"{name} must have shape {layout}={shape}, got {name}.shape={tuple(x.shape)}"
        )
    if x.device != like.device:
        raise ValueError(f"{name} must be on the device of x ({like.device}), got {x.device}")


def _check_values(delta: torch.Tensor, A: torch.Tensor) -> None:
    if not bool((delta > 0).all()):
        bad = delta.detach()[~(delta.detach() > 0)][0].item()
        raise ValueError(
            f"delta must be positive (> 0) everywhere (e.g. softplus of a projection), got an "
            f"entry delta={bad!r}"
        )
    if not bool((A <= 0).all()):
        bad = A.detach()[~(A.detach() <= 0)][0].item()
        raise ValueError(
            f"A must be non-positive (<= 0) everywhere (Mamba uses A = -exp(A_log)), got an "
            f"entry A={bad!r}"
        )


def _prepare_params(delta, A, B, C):
    """Checked ``delta (Bt, Dm, L)``, ``A (Dm, N)``, ``B, C (Bt, N, L)``."""
    _tensor("delta", delta, 3, "(Bt, Dm, L)")
    _tensor("A", A, 2, "(Dm, N)")
    _tensor("B", B, 3, "(Bt, N, L)")
    _tensor("C", C, 3, "(Bt, N, L)")
    Bt, Dm, L = delta.shape
    N = A.shape[1]
    _expect("A", A, (Dm, N), "(Dm, N)", delta)
    _expect("B", B, (Bt, N, L), "(Bt, N, L)", delta)
    _expect("C", C, (Bt, N, L), "(Bt, N, L)", delta)
    for name, t in (("delta", delta), ("A", A), ("B", B), ("C", C)):
        if any(s == 0 for s in t.shape):
            raise ValueError(f"{name} has an empty dimension: {name}.shape={tuple(t.shape)}")
    _check_values(delta, A)


def _compute_dtype(*xs: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is computed in float32)."""
    if any(x is not None and x.dtype == torch.float64 for x in xs):
        return torch.float64
    return torch.float32


def _prepare(x, delta, A, B, C, D, initial_state, return_state):
    _tensor("x", x, 3, "(Bt, Dm, L)")
    _tensor("delta", delta, 3, "(Bt, Dm, L)")
    _expect("delta", delta, tuple(x.shape), "(Bt, Dm, L) like x", x)
    _prepare_params(delta, A, B, C)
    Bt, Dm, _ = x.shape
    N = A.shape[1]
    if D is not None:
        _tensor("D", D, 1, "(Dm,)")
        _expect("D", D, (Dm,), "(Dm,)", x)
    if initial_state is not None:
        _tensor("initial_state", initial_state, 3, "(Bt, Dm, N)")
        _expect("initial_state", initial_state, (Bt, Dm, N), "(Bt, Dm, N)", x)
    if not isinstance(return_state, bool):
        raise TypeError(f"return_state must be a bool, got return_state={return_state!r}")
    dtype = _compute_dtype(x, delta, A, B, C, D, initial_state)
    return tuple(None if t is None else t.to(dtype) for t in (x, delta, A, B, C, D,
                                                              initial_state))


def _finish(y, x, D, h, out_dtype, return_state):
    if D is not None:
        y = y + D[:, None] * x
    y = y.to(out_dtype)
    return (y, h.to(out_dtype)) if return_state else y


def selective_scan_reference(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
):
    """The selective SSM as its defining loop over ``t`` (see the module docstring).

    Returns ``y (Bt, Dm, L)`` in the dtype of ``x``, or ``(y, h_{L-1} (Bt, Dm, N))`` when
    ``return_state`` (the state to pass as ``initial_state`` to the continuation).
    """
    out_dtype = x.dtype if isinstance(x, torch.Tensor) else None
    x, delta, A, B, C, D, h = _prepare(x, delta, A, B, C, D, initial_state, return_state)
    if h is None:
        h = x.new_zeros(x.shape[0], x.shape[1], A.shape[1])
    ys = []
    for t in range(x.shape[-1]):
        dt = delta[:, :, t, None]  # (Bt, Dm, 1)
        h = torch.exp(dt * A) * h + (dt * x[:, :, t, None]) * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(dim=-1))
    return _finish(torch.stack(ys, dim=-1), x, D, h, out_dtype, return_state)


def selective_scan(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
):
    """Mamba's selective scan ("The Hidden Attention of Mamba Models", 2024; Mamba, 2023).

    Same arguments, semantics and result as :func:`selective_scan_reference`: ``h_t =
    exp(delta_t A) h_{t-1} + delta_t B_t x_t``, ``y_t = C_t . h_t (+ D x_t)`` per channel, with
    ``x, delta (Bt, Dm, L)`` (``delta > 0``), ``A (Dm, N)`` (``<= 0``), ``B, C (Bt, N, L)``,
    optional ``D (Dm,)`` and ``initial_state (Bt, Dm, N)`` (zeros when None); returns ``y (Bt,
    Dm, L)`` in the dtype of ``x`` (half precision computed in float32), or ``(y, h_{L-1})``.

    The recurrence ``h_t = a_t h_{t-1} + b_t`` (``a_t = exp(delta_t A)`` in ``(0, 1]``, ``b_t =
    delta_t B_t x_t``) is an inclusive Hillis-Steele scan of the associative operator
    ``(a1, b1) (+) (a2, b2) = (a1 a2, a2 b1 + b2)``: ``ceil(log2 L)`` vectorised steps on
    ``(Bt, Dm, L, N)`` tensors, only products of decays (no exponent above 0, no division).
    The scanned ``a`` is ``prod_{s<=t} a_s``, which carries ``initial_state`` in.
    """
    out_dtype = x.dtype if isinstance(x, torch.Tensor) else None
    x, delta, A, B, C, D, h0 = _prepare(x, delta, A, B, C, D, initial_state, return_state)
    L = x.shape[-1]
    dt = delta[..., None]  # (Bt, Dm, L, 1)
    a = torch.exp(dt * A[:, None, :])  # (Bt, Dm, L, N)
    b = (dt * x[..., None]) * B.transpose(1, 2)[:, None]
    d = 1
    while d < L:
        a_hi = a[:, :, d:]
        b = torch.cat([b[:, :, :d], a_hi * b[:, :, :-d] + b[:, :, d:]], dim=2)
        a = torch.cat([a[:, :, :d], a_hi * a[:, :, :-d]], dim=2)
        d *= 2
    h = b if h0 is None else b + a * h0[:, :, None, :]
    y = (h * C.transpose(1, 2)[:, None]).sum(dim=-1)
    return _finish(y, x, D, h[:, :, -1], out_dtype, return_state)


def mamba_implicit_attention(
    delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """Mamba's hidden attention matrix ("The Hidden Attention of Mamba Models", 2024).

    ``alpha[b, d, i, j] = C_i . (prod_{s=j+1..i} exp(delta_s[d] A[d])) delta_j[d] B_j`` for
    ``j <= i`` and 0 above the diagonal, so that ``selective_scan(x, delta, A, B, C, D) ==
    alpha @ x[..., None] + D x`` (zero initial state). ``delta (Bt, Dm, L)`` positive, ``A (Dm,
    N)`` non-positive, ``B, C (Bt, N, L)``; returns ``(Bt, Dm, L, L)`` in the dtype of ``delta``
    (half precision computed in float32). The exponent ``A[d, n] sum_{s=j+1..i} delta_s[d]``
    uses segment sums from a masked cumulative sum (no difference of prefix sums, so no
    cancellation), accumulated over the ``N`` state entries one at a time: peak memory is a few
    ``(Bt, Dm, L, L)`` tensors.
    """
    _prepare_params(delta, A, B, C)
    out_dtype = delta.dtype
    dtype = _compute_dtype(delta, A, B, C)
    delta, A, B, C = delta.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype)
    L = delta.shape[-1]
    idx = torch.arange(L, device=delta.device)
    below = idx[:, None] > idx[None, :]  # s > j, indexed (s, j)
    # seg[b, d, i, j] = sum_{j < s <= i} delta_s
    seg = torch.cumsum(delta[..., :, None] * below, dim=-2)
    alpha = None
    for n in range(A.shape[1]):
        term = torch.exp(seg * A[None, :, n, None, None]) * (
            C[:, None, n, :, None] * B[:, None, n, None, :]
        )
        alpha = term if alpha is None else alpha + term
    causal = idx[:, None] >= idx[None, :]
    return (alpha * delta[..., None, :] * causal).to(out_dtype)
