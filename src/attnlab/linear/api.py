"""``linear_attention`` and its implicit attention matrix ``linear_attention_weights``."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from attnlab._checks import check_int
from attnlab.geometry import check_qkv
from attnlab.linear.feature_maps import EluPlusOne, Identity, ReLU
from attnlab.linear.forms import (
    LinearAttentionState,
    _as_gate,
    _as_state,
    _joint_state,
    _split,
    _check_bool,
    _check_modes,
    _log_gates,
    chunked_form,
    gated_scores,
    parallel_form,
    recurrent_step,
)
from attnlab.linear.segments import causal_segments

__all__ = ["linear_attention", "linear_attention_weights"]

FORMS = ("auto", "chunked", "parallel", "recurrent")
_NAMED_MAPS: dict[str, Callable[[], torch.nn.Module]] = {
    "identity": Identity, "elu+1": EluPlusOne, "relu": ReLU,
}
WEIGHTS_LIMIT = 1 << 28  # elements of the (B, H, L, S) matrix linear_attention_weights builds


def _feature_maps(feature_map: Any) -> tuple[Callable, Callable]:
    if feature_map is None:
        feature_map = "elu+1"
    if isinstance(feature_map, str):
        if feature_map not in _NAMED_MAPS:
            raise ValueError(f"feature_map={feature_map!r} is not a known name; expected one of "
                             f"{sorted(_NAMED_MAPS)}, a feature-map module or a callable")
        return (_NAMED_MAPS[feature_map](),) * 2
    if isinstance(feature_map, (tuple, list)):
        if len(feature_map) != 2 or not all(callable(f) for f in feature_map):
            raise TypeError(f"feature_map as a pair must be two callables (phi_q, phi_k), got {feature_map!r}")
        return feature_map[0], feature_map[1]
    if not callable(feature_map):
        raise TypeError(f"feature_map must be a name, a callable or a pair of callables, got "
                        f"{type(feature_map).__name__}")
    return feature_map, feature_map


def _apply_map(phi, x: torch.Tensor, name: str, positions: torch.Tensor, length: int) -> torch.Tensor:
    out = phi(x, positions, length) if getattr(phi, "needs_positions", False) else phi(x)
    if not isinstance(out, torch.Tensor) or out.shape[:-1] != x.shape[:-1]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"feature map of {name} must return (B, H, L, F) for {name}.shape="
                         f"{tuple(x.shape)}, got {got}")
    if hasattr(phi, "out_dim"):
        want = phi.out_dim(x.shape[-1])
        if out.shape[-1] != want:
            raise ValueError(f"feature map of {name} returned F={out.shape[-1]} features but its "
                             f"out_dim({x.shape[-1]}) says {want}")
    return out


class _Mapper:
    """The feature maps of one call: ``(q, k, pos_q, pos_k) -> (scale * phi(q), phi(k))`` in the
    compute dtype, with ``F`` and ``scale`` fixed (and both maps checked) on the first token."""

    def __init__(self, feature_map, scale, q, k, position_offset: int, L: int, S: int):
        self.phi_q, self.phi_k = _feature_maps(feature_map)
        self.length = max(L, S) + position_offset
        dev = q.device
        # keys take positions 0..S-1 and queries are bottom-right aligned with them
        self.pos_k = torch.arange(S, device=dev) + position_offset
        self.pos_q = torch.arange(L, device=dev) + position_offset + (S - L)
        self.compute = q.dtype
        self.scale = 1.0
        with torch.no_grad():  # a probe of the output sizes, not part of the graph
            fq, fk = self(q[:, :, :1], k[:, :, :1], self.pos_q[:1], self.pos_k[:1])
        if fq.shape[-1] != fk.shape[-1]:
            raise ValueError(f"the feature maps of q and k must give the same number of features, got "
                             f"F={fq.shape[-1]} for q and F={fk.shape[-1]} for k")
        self.F = fq.shape[-1]
        if scale is None:
            scale = 1.0 / math.sqrt(self.F)
        elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise TypeError(f"scale must be a finite float or None, got scale={scale!r}")
        self.scale = scale

    def parameters(self) -> Optional[list[torch.Tensor]]:
        """The tensors the maps depend on that may need gradients (each once), or ``None`` when
        a map is not an ``nn.Module`` and so cannot list them."""
        if not all(isinstance(m, torch.nn.Module) for m in (self.phi_q, self.phi_k)):
            return None
        seen = {}
        for m in (self.phi_q, self.phi_k):
            for p in m.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def __call__(self, q, k, pos_q, pos_k):
        phi_q = _apply_map(self.phi_q, q, "q", pos_q, self.length).to(self.compute)
        phi_k = _apply_map(self.phi_k, k, "k", pos_k, self.length).to(self.compute)
        return phi_q * self.scale, phi_k


def _prepare(q, k, v, feature_map, causal, decay, gate, normalize, scale, position_offset):
    """Checked, flattened, head-expanded inputs in the compute dtype, and their :class:`_Mapper`."""
    geom = check_qkv(q, k, v)
    _check_bool("normalize", normalize)
    _check_modes(causal, decay, gate)
    check_int("position_offset", position_offset, 0)
    L, S = geom.q_len, geom.kv_len
    if causal and L != S and gate is not None:
        raise ValueError(f"a gate needs L == S (one gate per token), got L={L}, S={S}")
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    B, Hq, Hkv = geom.batch, geom.q_heads, geom.kv_heads
    q = q.reshape(B, Hq, L, -1).to(compute)
    k = k.reshape(B, Hkv, S, -1).to(compute)
    v = v.reshape(B, Hkv, S, -1).to(compute)
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    return geom, q, k, v, compute, _Mapper(feature_map, scale, q, k, position_offset, L, S)


def _segmented(mapper: _Mapper, q, k, v, positions, *, decay, gate, normalize, chunk_size, initial_state):
    """The causal chunked form (:func:`~attnlab.linear.segments.causal_segments`) with the
    feature maps applied inside each segment, so that under autograd memory beyond inputs,
    outputs and their gradients is about one segment's. Maps that are not modules may
    close over tensors that need gradients, which the segments' backward could not see: they are
    applied to the whole sequence first."""
    B, H, L, _ = q.shape
    Dv = v.shape[-1]
    S0, z0 = _as_state(initial_state, B, H, mapper.F, Dv, normalize, q, "initial_state")
    state = _joint_state(S0, z0, B, H, mapper.F, Dv, normalize, q)
    params = mapper.parameters()
    if params is None:
        q, k = mapper(q, k, positions, positions)
        features, params = None, ()
    else:
        features = lambda q_s, k_s, p: mapper(q_s, k_s, p, p)  # noqa: E731
    out, state = causal_segments(
        q, k, v, _log_gates(decay, None, B, H, 1, mapper.F, q),
        None if gate is None else _as_gate(gate, B, H, L, mapper.F, q), state, chunk_size, normalize,
        features=features, positions=positions, params=params)
    return _split(out, state, normalize, divided=True)


def _check_form(form, chunk_size) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got form={form!r}")
    check_int("chunk_size", chunk_size, 1)


def _recurrent(phi_q, phi_k, v, *, decay, gate, normalize, initial_state):
    state = initial_state
    outs = []
    for t in range(phi_q.shape[2]):
        g = None if gate is None else gate[:, :, t]
        o, state = recurrent_step(phi_q[:, :, t], phi_k[:, :, t], v[:, :, t], state,
                                  decay=decay, gate=g, normalize=normalize)
        outs.append(o)
    if state is None:  # zero tokens: the initial state (or zeros) passes through
        B, H, Fd = phi_q.shape[0], phi_q.shape[1], phi_q.shape[-1]
        state = LinearAttentionState(phi_q.new_zeros(B, H, Fd, v.shape[-1]),
                                     phi_q.new_zeros(B, H, Fd) if normalize else None)
    return torch.stack(outs, dim=2), state


def _run_form(form, phi_q, phi_k, v, *, causal, decay, gate, normalize, chunk_size, initial_state):
    kw = dict(decay=decay, gate=gate, normalize=normalize)
    if form == "recurrent" and causal and phi_q.shape[2] > 0:
        return _recurrent(phi_q, phi_k, v, initial_state=initial_state, **kw)
    if form == "parallel":
        return parallel_form(phi_q, phi_k, v, causal=causal, initial_state=initial_state, **kw), None
    return chunked_form(phi_q, phi_k, v, causal=causal, chunk_size=chunk_size,
                        initial_state=initial_state, return_state=True, **kw)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: Any = None,
    causal: bool = False,
    decay: Any = None,
    gate: Optional[torch.Tensor] = None,
    normalize: bool = True,
    scale: Optional[float] = None,
    chunk_size: int = 64,
    form: str = "auto",
    initial_state: Any = None,
    return_state: bool = False,
    position_offset: int = 0,
):
    r"""Linear attention ``o_i = sum_j w_ij phi(q_i) . phi(k_j) v_j (/ normaliser)`` in O(L).

    With ``phi`` the feature map, ``Q = scale * phi(q)``, ``K = phi(k)``, this is the
    recurrence of :mod:`attnlab.linear.forms`:
    ``S_t = g_t * S_{t-1} + K_t v_t^T``, ``z_t = g_t * z_{t-1} + K_t``,
    ``o_t = Q_t S_t / (Q_t . z_t + 1e-6)`` (``Q_t S_t`` when ``normalize=False``), with the gate
    ``g_t`` the product of ``decay`` (per head, RetNet/TransNormerLLM) and ``gate`` (per token,
    GLA); non-causal attention uses ``S = sum_j K_j v_j^T`` for every query.

    Katharopoulos et al., "Transformers are RNNs: Fast Autoregressive Transformers with Linear
    Attention", 2020; chunked form: Qin et al., "Lightning Attention-2", 2024.

    Args:
        q, k, v: ``(B, Hq, *L, D)``, ``(B, Hkv, *S, D)``, ``(B, Hkv, *S, Dv)`` as for
            :func:`attnlab.attention` (GQA: ``Hq`` a multiple of ``Hkv``; several token axes are
            flattened in row-major order, which is the causal order). float16/bfloat16 inputs
            are computed in float32 and the output is cast back.
        feature_map: a feature map module or callable ``(B, H, L, D) -> (B, H, L, F)`` (see
            :mod:`attnlab.linear.feature_maps`), a pair ``(phi_q, phi_k)``, or one of
            ``"elu+1"`` (the default), ``"relu"``, ``"identity"``.
        causal: query ``i`` sees keys ``j <= i + S - L`` (bottom-right, as ``attention``); a
            query with no visible key returns 0.
        decay: per-head constant in ``(0, 1]``: a float or a tensor broadcastable to ``(Hq,)``
            (see :func:`~attnlab.linear.decays.retnet_decay`, ``tnl_decay``). Causal only.
        gate: data-dependent gate in ``(0, 1]``, ``(B, Hq, L)`` or ``(B, Hq, L, F)``. Causal
            only, ``L == S``.
        normalize: divide by ``Q_t . z_t + 1e-6`` (Katharopoulos) or not (RetNet, GLA, fla).
        scale: multiplies ``phi(q)``; default ``F ** -0.5`` (it cancels, up to the 1e-6, when
            normalising).
        chunk_size: tokens per chunk of the chunked form (>= 1).
        form: ``"chunked"`` (``"auto"``), ``"parallel"`` (the ``L x L`` matrix; for short
            inputs) or ``"recurrent"`` (a loop of :func:`~attnlab.linear.forms.recurrent_step`;
            with ``L == 1`` it is one O(1) decoding step). All three give the same function.
        initial_state: the state before the first token, a
            :class:`~attnlab.linear.forms.LinearAttentionState` or ``(S, z)`` with
            ``S (B, Hq, F, Dv)``, ``z (B, Hq, F)`` (``z`` may be ``None`` when not
            normalising); e.g. the state returned by the previous call.
        return_state: also return the state after the last token (float32 for half inputs).
            Not available with ``form="parallel"``.
        position_offset: index of the first key (for position-dependent feature maps such as
            cosFormer when continuing from a state).

    Returns:
        ``(B, Hq, *L, Dv)``, or ``(out, LinearAttentionState)`` with ``return_state``.
    """
    _check_form(form, chunk_size)
    _check_bool("return_state", return_state)
    if form == "parallel" and return_state:
        raise ValueError("return_state=True needs form='chunked' or 'recurrent', got form='parallel'")
    geom, q_, k_, v_, compute, mapper = _prepare(q, k, v, feature_map, causal, decay, gate, normalize,
                                                 scale, position_offset)
    B, Hq, L, S = geom.batch, geom.q_heads, geom.q_len, geom.kv_len
    if gate is not None:
        gate = gate.to(compute)
    state = initial_state
    pos_q, pos_k = mapper.pos_q, mapper.pos_k
    kw = dict(causal=causal, decay=decay, gate=gate, normalize=normalize, chunk_size=chunk_size)
    if causal and S > L:
        # keys before the first query are visible to all queries: fold them into the state
        _, prefix_k = mapper(q_[:, :, :0], k_[:, :, :S - L], pos_q[:0], pos_k[:S - L])
        # the prefix's outputs are discarded, so its keys also serve as its queries
        _, state = chunked_form(prefix_k, prefix_k, v_[:, :, :S - L], initial_state=state,
                                return_state=True, **kw)
        k_, v_, pos_k = k_[:, :, S - L:], v_[:, :, S - L:], pos_k[S - L:]
    n_empty = max(L - S, 0) if causal else 0
    q_, pos_q = q_[:, :, n_empty:], pos_q[n_empty:]
    if causal and form in ("auto", "chunked") and q_.shape[2] > 0:
        # after the alignment above, query t and key t share position pos_q[t] == pos_k[t]
        out, state = _segmented(mapper, q_, k_, v_, pos_q, decay=decay, gate=gate, normalize=normalize,
                                chunk_size=chunk_size, initial_state=state)
    else:
        phi_q, phi_k = mapper(q_, k_, pos_q, pos_k)
        out, state = _run_form(form, phi_q, phi_k, v_, initial_state=state, **kw)
    if n_empty:
        out = torch.cat([out.new_zeros(B, Hq, n_empty, out.shape[-1]), out], dim=2)
    out = out.reshape(B, Hq, *geom.q_shape, out.shape[-1]).to(q.dtype)
    return (out, state) if return_state else out


def linear_attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: Any = None,
    causal: bool = False,
    decay: Any = None,
    gate: Optional[torch.Tensor] = None,
    normalize: bool = True,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """The implicit attention matrix ``W (B, Hq, L, S)`` of :func:`linear_attention`:
    ``linear_attention(q, k, v, **same) == W @ v`` (without ``initial_state``).

    ``W[i, j] = (Q_i * G_ij) . K_j`` for visible pairs (``G_ij`` the product of the gates
    between ``j`` and ``i``), divided by ``sum_j W[i, j] + 1e-6`` when normalising: the
    "hidden attention" of a linear recurrence (Ali, Zimerman, Wolf, "The Hidden Attention of
    Mamba Models", 2024), for inspection. Materialises ``L x S`` (``L x S x F`` for per-feature
    gates); refuses problems above ``2**28`` elements. ``v`` only fixes the geometry.
    """
    geom, q_, k_, _, _, mapper = _prepare(q, k, v, feature_map, causal, decay, gate, normalize, scale, 0)
    phi_q, phi_k = mapper(q_, k_, mapper.pos_q, mapper.pos_k)
    B, Hq, L, S = geom.batch, geom.q_heads, geom.q_len, geom.kv_len
    T = max(L, S) if causal else 0
    per_feature = gate is not None and gate.dim() == 4
    size = B * Hq * (T * T if causal else L * S) * (phi_q.shape[-1] if per_feature else 1)
    if size > WEIGHTS_LIMIT:
        raise ValueError(f"linear_attention_weights would build {size} elements (B={B}, Hq={Hq}, "
                         f"L={L}, S={S}), over the limit of {WEIGHTS_LIMIT}; use smaller inputs")
    if not causal:
        w = phi_q @ phi_k.transpose(-1, -2)
    else:
        log_g = _log_gates(decay, gate, B, Hq, T, phi_q.shape[-1], phi_q)
        pq = F.pad(phi_q, (0, 0, T - L, 0))
        pk = F.pad(phi_k, (0, 0, T - S, 0))
        w = gated_scores(pq, pk, log_g)[:, :, T - L:, T - S:]
    if normalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-6)
    return w.to(q.dtype)
