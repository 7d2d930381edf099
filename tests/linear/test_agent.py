"""Agent Attention (Han et al., 2024) against its dense two-softmax reference."""

from __future__ import annotations

import math

import pytest
import torch

import attnlab as al
from attnlab.linear.agent import agent_attention, agent_attention_reference
from attnlab.testing import MaxNumel

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def _rand(*shape, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _qkv(Hq, Hkv, L, S, D=6, Dv=5, B=2, seed=0):
    L, S = (L,) if isinstance(L, int) else L, (S,) if isinstance(S, int) else S
    q = _rand(B, Hq, *L, D, seed=seed).requires_grad_()
    k = _rand(B, Hkv, *S, D, seed=seed + 1).requires_grad_()
    v = _rand(B, Hkv, *S, Dv, seed=seed + 2).requires_grad_()
    return q, k, v


def _same_with_grads(kwargs, inputs):
    out = agent_attention(*inputs[:3], **kwargs)
    ref = agent_attention_reference(*inputs[:3], **kwargs)
    torch.testing.assert_close(out, ref, **TOL)
    go = _rand(*out.shape, seed=9)
    for a, b in zip(torch.autograd.grad(out, inputs, go), torch.autograd.grad(ref, inputs, go)):
        torch.testing.assert_close(a, b, **TOL)
    return out


@pytest.mark.parametrize(
    "Hq,Hkv,L,S,num_agents,scale",
    [
        (3, 3, 13, 13, 5, None),
        (4, 2, 13, 7, 1, 0.3),
        (4, 1, 9, 17, 9, None),
        (2, 2, (5, 7), (3, 4), (2, 3), None),
        (4, 2, (3, 4, 5), (2, 2, 3), (2, 1, 3), 0.5),
    ],
)
def test_pooled_agents_match_reference(Hq, Hkv, L, S, num_agents, scale):
    q, k, v = _qkv(Hq, Hkv, L, S)
    out = _same_with_grads(dict(num_agents=num_agents, scale=scale), (q, k, v))
    assert out.shape == (2, Hq, *((L,) if isinstance(L, int) else L), 5)


@pytest.mark.parametrize("agent_shape", [(4,), (2, 3)])
def test_explicit_agents_match_reference(agent_shape):
    q, k, v = _qkv(4, 2, 11, 7)
    a = _rand(2, 4, *agent_shape, 6, seed=7).requires_grad_()
    _same_with_grads(dict(agents=a), (q, k, v, a))


def test_pooling_is_adaptive_average_over_tokens():
    """Agent ``a`` of ``n`` averages tokens ``floor(a L / n) .. ceil((a + 1) L / n) - 1``."""
    q, k, v = (t.detach() for t in _qkv(2, 2, 7, 5))
    n = 3
    means = [q[:, :, (a * 7) // n: -((-(a + 1) * 7) // n)].mean(2) for a in range(n)]
    manual = torch.stack(means, dim=2)
    torch.testing.assert_close(
        agent_attention(q, k, v, num_agents=n), agent_attention(q, k, v, agents=manual), **TOL
    )
    # 2-D grid (4, 6) -> (2, 3): means of 2 x 2 patches, flattened row-major
    q2 = _rand(1, 1, 4, 6, 3, seed=5)
    k2, v2 = _rand(1, 1, 1, 5, 3, seed=6), _rand(1, 1, 1, 5, 2, seed=7)
    patches = q2.view(1, 1, 2, 2, 3, 2, 3).mean(dim=(3, 5)).reshape(1, 1, 6, 3)
    flat = agent_attention(q2.view(1, 1, 24, 3), k2.view(1, 1, 5, 3), v2.view(1, 1, 5, 2),
                           agents=patches)
    torch.testing.assert_close(
        agent_attention(q2, k2, v2, num_agents=(2, 3)), flat.view(1, 1, 4, 6, 2), **TOL
    )


def test_agents_equal_to_the_keys():
    """``num_agents == L`` pools nothing, so ``A = Q``; with ``q == k`` also ``A = K`` and

        O = softmax(s Q K^T) softmax(s K K^T) V = P (P V),   P = softmax(s Q K^T):

    attention applied twice, which is *not* plain attention ``P V``."""
    q, _, v = (t.detach() for t in _qkv(3, 3, 9, 9))
    out = agent_attention(q, q, v, num_agents=9)
    twice = al.attention(q, q, al.attention(q, q, v))
    torch.testing.assert_close(out, twice, **TOL)
    assert (out - al.attention(q, q, v)).abs().max() > 1e-2
    # explicit agents = keys: O = softmax(s Q K^T) softmax(s K K^T) V in general ...
    k = _rand(2, 3, 9, 6, seed=4)
    torch.testing.assert_close(
        agent_attention(q, k, v, agents=k), al.attention(q, k, al.attention(k, k, v)), **TOL
    )
    # ... which is plain attention when softmax(s K K^T) = I: orthogonal keys with
    # s |k_j|^2 = 40 leave off-diagonal weights below 8 e^-40
    S, D = 5, 6
    s = 1 / math.sqrt(D)
    k_orth = math.sqrt(40 / s) * torch.eye(S, D, dtype=F64).expand(2, 3, S, D)
    v5 = v[:, :, :S]
    torch.testing.assert_close(
        agent_attention(q, k_orth, v5, agents=k_orth), al.attention(q, k_orth, v5), **TOL
    )


def test_rows_of_the_implied_matrix_sum_to_one():
    q, k, _ = (t.detach() for t in _qkv(4, 2, 8, 6))
    eye = torch.eye(6, dtype=F64).expand(2, 2, 6, 6)
    m = agent_attention(q, k, eye, num_agents=3)
    assert bool((m >= 0).all())
    torch.testing.assert_close(m.sum(-1), torch.ones(2, 4, 8, dtype=F64), **TOL)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_close_to_float64(dtype, tol):
    q, k, v = (t.detach() for t in _qkv(4, 2, 17, 11))
    ref = agent_attention(q, k, v, num_agents=4)
    out = agent_attention(q.to(dtype), k.to(dtype), v.to(dtype), num_agents=4)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.to(F64), ref, rtol=tol, atol=tol)




def test_fast_path_never_forms_L_by_S():
    L, S = 512, 384
    q, k, v = (torch.randn(1, 1, n, 8, requires_grad=True) for n in (L, S, S))
    mode = MaxNumel()
    with mode:
        agent_attention(q, k, v, num_agents=16).sum().backward()
    assert k.grad is not None and 0 < mode.max_numel < L * S / 16
    mode = MaxNumel()
    with mode:
        agent_attention_reference(q, k, v, num_agents=16)
    assert mode.max_numel >= L * S


def test_bad_inputs_name_the_argument():
    q, k, v = (t.detach() for t in _qkv(4, 2, 5, 5))
    with pytest.raises(ValueError, match="exactly one of num_agents and agents"):
        agent_attention(q, k, v)
    with pytest.raises(ValueError, match="exactly one of num_agents and agents"):
        agent_attention(q, k, v, num_agents=2, agents=q)
    with pytest.raises(ValueError, match="num_agents must be <= .*num_agents=6"):
        agent_attention(q, k, v, num_agents=6)
    with pytest.raises(ValueError, match="num_agents must be an int >= 1, got num_agents=0"):
        agent_attention(q, k, v, num_agents=0)
    with pytest.raises(TypeError, match="num_agents must be an int"):
        agent_attention(q, k, v, num_agents=2.5)
    q2, k2, v2 = (_rand(1, 2, 4, 4, 3, seed=s) for s in range(3))
    with pytest.raises(ValueError, match="num_agents must be a tuple of 2 ints"):
        agent_attention(q2, k2, v2, num_agents=2)
    with pytest.raises(TypeError, match="num_agents must be .*num_agents=\\(2, 2, 2\\)"):
        agent_attention(q2, k2, v2, num_agents=(2, 2, 2))
    with pytest.raises(ValueError, match="agents must have shape .*agents.shape=\\(2, 2, 3, 6\\)"):
        agent_attention(q, k, v, agents=q[:, :2, :3])
    with pytest.raises(ValueError, match="agents.shape"):
        agent_attention(q, k, v, agents=q[..., :4])
    with pytest.raises(TypeError, match="agents.dtype=torch.float32"):
        agent_attention(q, k, v, agents=q.float())
    with pytest.raises(TypeError, match="agents must be a torch.Tensor"):
        agent_attention(q, k, v, agents=[1.0])
    with pytest.raises(TypeError, match="scale"):
        agent_attention(q, k, v, num_agents=2, scale="big")
    with pytest.raises(ValueError, match="k.shape"):
        agent_attention(q, k[..., :2], v, num_agents=2)
