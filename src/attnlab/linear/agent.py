r"""Agent Attention: a few agent tokens gather from the keys, then broadcast to the queries.

Han, Ye, Han, Pan, Wan, Song, Huang, "Agent Attention: On the Integration of Softmax and Linear
Attention", ECCV 2024.

For one head, with ``n`` agent tokens ``A (n, D)`` (by default the adaptive average pooling of
the queries over their token axes), and ``s`` the logit scale (``1/sqrt(D)`` by default)::

    V_A = softmax(s A K^T) V            agent aggregation   (n, Dv)
    O   = softmax(s Q A^T) V_A          agent broadcast     (L, Dv)

i.e. ``O = softmax(s Q A^T) softmax(s A K^T) V``: an ``L x S`` matrix of rank ``<= n`` that is
never formed; the fast path is two calls of :func:`attnlab.attention` (``n x S`` and ``L x n``
logits). Non-causal. The paper's extra agent bias and depthwise-convolution branch are not part
of this function.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from attnlab._checks import check_int
from attnlab.api import attention
from attnlab.geometry import check_qkv, check_scale

__all__ = ["agent_attention", "agent_attention_reference"]

NumAgents = Union[int, Sequence[int]]

_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def _check_num_agents(num_agents: object, q_shape: tuple[int, ...]) -> tuple[int, ...]:
    """``num_agents`` as one count per token axis, each in ``[1, axis length]``."""
    nd = len(q_shape)
    if nd > 3:
        raise ValueError(
            f"num_agents pools one to three token axes, got q token axes {q_shape}; pass "
            "agents= explicitly"
        )
    if isinstance(num_agents, int) and not isinstance(num_agents, bool):
        if nd != 1:
            raise ValueError(
                f"num_agents must be a tuple of {nd} ints (an agent grid) for q with {nd} token "
                f"axes {q_shape}, got num_agents={num_agents!r}"
            )
        counts = (num_agents,)
    elif isinstance(num_agents, (tuple, list)) and len(num_agents) == nd:
        counts = tuple(num_agents)
    else:
        raise TypeError(
            f"num_agents must be an int (one token axis) or a tuple of {nd} ints (one per token "
            f"axis of q, shape {q_shape}), got num_agents={num_agents!r}"
        )
    for n, size in zip(counts, q_shape):
        check_int("num_agents", n, 1)
        if n > size:
            raise ValueError(
                f"num_agents must be <= the query token axes {q_shape} (pooling only "
                f"shrinks), got num_agents={num_agents!r}"
            )
    return counts


def _check_agents(agents: object, g, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(agents, torch.Tensor):
        raise TypeError(f"agents must be a torch.Tensor or None, got {type(agents).__name__}")
    expected = f"(B, Hq, *n, D) = ({g.batch}, {g.q_heads}, *n, {g.head_dim})"
    if (agents.ndim < 4 or agents.shape[0] != g.batch or agents.shape[1] != g.q_heads
            or agents.shape[-1] != g.head_dim or 0 in agents.shape):
        raise ValueError(
            f"agents must have shape {expected}, got agents.shape={tuple(agents.shape)}"
        )
    if agents.dtype != dtype or agents.device != g.device:
        raise TypeError(
            f"agents must have the dtype and device of q ({dtype}, {g.device}), got "
            f"agents.dtype={agents.dtype}, agents.device={agents.device}"
        )
    return agents


def _prepare(q, k, v, num_agents, agents, scale):
    """Validate; return flat float ``q (B,Hq,L,D)``, ``k``, ``v``, ``agents (B,Hq,n,D)``, the
    scale and the geometry."""
    g = check_qkv(q, k, v)
    s = check_scale(scale, g.head_dim)
    if (num_agents is None) == (agents is None):
        raise ValueError(
            "exactly one of num_agents and agents must be given, got "
            f"num_agents={num_agents!r} and agents={'a tensor' if agents is not None else None}"
        )
    dt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qf = q.to(dt)
    if agents is None:
        counts = _check_num_agents(num_agents, g.q_shape)
        # (B, H, *L, D) -> (B*H, D, *L): pool every feature channel over the token axes
        x = qf.movedim(-1, 2).reshape(g.batch * g.q_heads, g.head_dim, *g.q_shape)
        a = _POOL[g.ndim](x, counts).reshape(g.batch, g.q_heads, g.head_dim, -1)
        a = a.transpose(-1, -2)
    else:
        a = _check_agents(agents, g, q.dtype).to(dt).flatten(2, -2)
    qf = qf.reshape(g.batch, g.q_heads, g.q_len, g.head_dim)
    kf = k.to(dt).reshape(g.batch, g.kv_heads, g.kv_len, g.head_dim)
    vf = v.to(dt).reshape(g.batch, g.kv_heads, g.kv_len, g.value_dim)
    return qf, kf, vf, a, s, g


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_agents: Optional[NumAgents] = None,
    agents: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Agent Attention (Han et al., 2024): ``softmax(s Q A^T) (softmax(s A K^T) V)``.

    Args:
        q: ``(B, Hq, *L, D)`` queries, one to three token axes.
        k: ``(B, Hkv, *S, D)`` keys (same number of token axes), ``Hq`` a multiple of ``Hkv``
            (GQA: query head ``h`` uses key/value head ``h // (Hq // Hkv)``).
        v: ``(B, Hkv, *S, Dv)`` values.
        num_agents: agents are ``adaptive_avg_pool(q)`` over the token axes to this size: an
            int ``<= L`` for one token axis, a tuple with one count per axis (e.g. a pair
            ``(nx, ny) <= (X, Y)`` for ``q (B, H, X, Y, D)``: an agent grid, flattened
            row-major). Each query head pools its own queries; along an axis of length
            ``L``, agent ``a`` of ``n`` averages tokens ``floor(a L / n)`` to
            ``ceil((a + 1) L / n) - 1`` (torch's adaptive average pooling).
        agents: explicit agent tokens ``(B, Hq, *n, D)`` instead of pooling (exclusive with
            ``num_agents``; exactly one of the two).
        scale: logit scale of both softmaxes, ``1/sqrt(D)`` when None.

    Returns:
        ``(B, Hq, *L, Dv)`` in the dtype of ``q`` (float16/bfloat16 computed in float32).
    """
    qf, kf, vf, a, s, g = _prepare(q, k, v, num_agents, agents, scale)
    agent_values = attention(a, kf, vf, scale=s)  # (B, Hq, n, Dv)
    out = attention(qf, a, agent_values, scale=s)
    return out.reshape(g.batch, g.q_heads, *g.q_shape, g.value_dim).to(q.dtype)


def agent_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_agents: Optional[NumAgents] = None,
    agents: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Reference for :func:`agent_attention`: the dense ``(B, Hq, L, S)`` matrix
    ``softmax(s Q A^T) @ softmax(s A K^T)`` (key/value heads repeated for GQA) times ``V``."""
    qf, kf, vf, a, s, g = _prepare(q, k, v, num_agents, agents, scale)
    kf = kf.repeat_interleave(g.group_size, dim=1)
    vf = vf.repeat_interleave(g.group_size, dim=1)
    agent_from_keys = torch.softmax(s * (a @ kf.transpose(-1, -2)), dim=-1)  # (n, S)
    query_from_agents = torch.softmax(s * (qf @ a.transpose(-1, -2)), dim=-1)  # (L, n)
    out = (query_from_agents @ agent_from_keys) @ vf
    return out.reshape(g.batch, g.q_heads, *g.q_shape, g.value_dim).to(q.dtype)
