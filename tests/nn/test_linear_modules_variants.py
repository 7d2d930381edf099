"""AgentAttention, FlowAttention and NormAttention against the references of their functions."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from attnlab.linear.agent import agent_attention_reference
from attnlab.linear.feature_maps import ReLU
from attnlab.linear.flow import flow_attention_reference
from attnlab.linear.transnormer import norm_attention_reference
from attnlab.nn.agent import AgentAttention
from attnlab.nn.flow import FlowAttention
from attnlab.nn.norm_attention import NormAttention

F64 = torch.float64
E, H, B, L = 16, 4, 2, 11
TOL = dict(rtol=1e-10, atol=1e-10)


def _x(seed=1, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, E, generator=gen, dtype=dtype).requires_grad_()


def _heads(module, x):
    qkv = F.linear(x, module.in_proj.weight, module.in_proj.bias).view(B, L, 3, H, E // H)
    return qkv.permute(2, 0, 3, 1, 4)


def _merge(out):
    return out.transpose(1, 2).reshape(B, L, E)


def ref_agent(m, x):
    q, k, v = _heads(m, x)
    return m.out_proj(_merge(agent_attention_reference(q, k, v, num_agents=m.num_agents)))


def ref_flow(m, x):
    q, k, v = _heads(m, x)
    return m.out_proj(_merge(flow_attention_reference(q, k, v, eps=m.eps)))


def ref_norm(m, x):
    q, k, v = _heads(m, x)
    o = norm_attention_reference(q, k, v, causal=m.causal, decay=m.decay,
                                 feature_map=m.feature_map, norm=m.norm, eps=m.eps)
    o = _merge(o) * m.norm_weight
    return m.out_proj(o if m.norm_bias is None else o + m.norm_bias)


CASES = {
    "agent": (lambda: AgentAttention(E, H, 3, dtype=F64), ref_agent),
    "agent-all-tokens-no-bias": (
        lambda: AgentAttention(E, H, L, bias=False, dtype=F64), ref_agent),
    "flow": (lambda: FlowAttention(E, H, dtype=F64), ref_flow),
    "flow-eps": (lambda: FlowAttention(E, H, eps=0.5, dtype=F64), ref_flow),
    "norm-rms": (lambda: NormAttention(E, H, dtype=F64), ref_norm),
    "norm-layer-causal": (
        lambda: NormAttention(E, H, causal=True, norm="layer", chunk_size=4, dtype=F64), ref_norm),
    "norm-decay-float": (lambda: NormAttention(E, H, causal=True, decay=0.8, dtype=F64), ref_norm),
    "norm-decay-heads": (
        lambda: NormAttention(E, H, causal=True, decay=torch.tensor([0.5, 0.7, 0.9, 1.0]),
                              norm="layer", chunk_size=3, dtype=F64), ref_norm),
    "norm-relu": (lambda: NormAttention(E, H, feature_map=ReLU(), dtype=F64), ref_norm),
}


def _perturb(module):
    """Non-default parameters so that every parameter's gradient is exercised."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("name", list(CASES))
def test_module_matches_reference_outputs_and_gradients(name):
    make, ref = CASES[name]
    torch.manual_seed(0)
    m = make()
    _perturb(m)
    x = _x()
    params = [p for p in m.parameters()]
    inputs = [x, *params]
    out, expected = m(x), ref(m, x)
    assert out.shape == (B, L, E) and out.dtype == F64
    torch.testing.assert_close(out, expected, **TOL)
    go = torch.randn(B, L, E, generator=torch.Generator().manual_seed(7), dtype=F64)
    grads = torch.autograd.grad(out, inputs, go)
    for a, b in zip(grads, torch.autograd.grad(expected, inputs, go)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("name", ["agent", "flow", "norm-layer-causal", "norm-decay-heads"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.15)])
def test_low_precision_close_to_float64(name, dtype, tol):
    torch.manual_seed(0)
    m = CASES[name][0]()
    low = copy.deepcopy(m).to(dtype)
    x = _x().detach()
    out = low(x.to(dtype))
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.to(F64), m(x), rtol=tol, atol=tol)


def test_norm_attention_module_is_causal():
    torch.manual_seed(0)
    m = NormAttention(E, H, causal=True, decay=0.9, dtype=F64)
    x = _x().detach()
    y = x.clone()
    y[:, 6:] += 1.0
    torch.testing.assert_close(m(y)[:, :6], m(x)[:, :6], **TOL)
    assert (m(y)[:, 6:] - m(x)[:, 6:]).abs().max() > 1e-3


def test_reset_parameters_and_parameters():
    torch.manual_seed(0)
    m = NormAttention(E, H, norm="layer")
    names = {n for n, _ in m.named_parameters()}
    assert names == {"in_proj.weight", "in_proj.bias", "out_proj.weight", "out_proj.bias",
                     "norm_weight", "norm_bias"}
    assert {n for n, _ in NormAttention(E, H).named_parameters()} == names - {"norm_bias"}
    assert {n for n, _ in AgentAttention(E, H, 2, bias=False).named_parameters()} == {
        "in_proj.weight", "out_proj.weight"}
    for mod in (m, AgentAttention(E, H, 2), FlowAttention(E, H)):
        _perturb(mod)
        mod.reset_parameters()
        bound = math.sqrt(6 / (E + 3 * E))  # xavier_uniform of in_proj (3E, E)
        assert mod.in_proj.weight.abs().max() <= bound
        assert mod.in_proj.weight.abs().max() > bound / 2
        assert torch.equal(mod.in_proj.bias, torch.zeros(3 * E))
        assert torch.equal(mod.out_proj.bias, torch.zeros(E))
    assert torch.equal(m.norm_weight, torch.ones(E)) and torch.equal(m.norm_bias, torch.zeros(E))


def test_extra_repr():
    assert "num_agents=3" in repr(AgentAttention(E, H, 3))
    assert "eps=0.5" in repr(FlowAttention(E, H, eps=0.5))
    r = repr(NormAttention(E, H, causal=True, decay=0.5, norm="layer"))
    assert "causal=True" in r and "decay=[0.5, 0.5, 0.5, 0.5]" in r and "norm='layer'" in r


def test_decay_is_a_buffer_that_follows_the_module():
    m = NormAttention(E, H, causal=True, decay=torch.tensor([0.5, 0.6, 0.7, 0.8]))
    assert "decay" in dict(m.named_buffers())
    assert m.double().decay.dtype == F64
    assert NormAttention(E, H).decay is None


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: AgentAttention(15, 4, 2), ValueError, "embed_dim=15, expected a multiple"),
        (lambda: AgentAttention(E, 0, 2), ValueError, "num_heads must be an int >= 1"),
        (lambda: AgentAttention(E, H, 0), ValueError, "num_agents must be an int >= 1"),
        (lambda: AgentAttention(E, H, 2.0), TypeError, "num_agents must be an int"),
        (lambda: AgentAttention(E, H, 2, bias="yes"), TypeError, "bias='yes', expected a bool"),
        (lambda: FlowAttention(E, H, eps=-1.0), ValueError, "eps must be a finite float >= 0"),
        (lambda: FlowAttention(E, "4"), TypeError, "num_heads must be an int"),
        (lambda: NormAttention(E, H, norm="batch"), ValueError, "norm must be one of"),
        (lambda: NormAttention(E, H, decay=0.9), ValueError, "decay needs causal=True"),
        (lambda: NormAttention(E, H, causal=True, decay=1.5), ValueError, "decay must lie in"),
        (lambda: NormAttention(E, H, causal=True, decay="tnl"), TypeError, "decay must be"),
        (lambda: NormAttention(E, H, causal=True, decay=torch.ones(3) * 0.5), ValueError,
         "decay must be broadcastable to \\(H,\\)=\\(4,\\)"),
        (lambda: NormAttention(E, H, causal="no"), TypeError, "causal must be a bool"),
        (lambda: NormAttention(E, H, eps=0.0), ValueError, "eps must be a finite float > 0"),
        (lambda: NormAttention(E, H, chunk_size=0), ValueError, "chunk_size must be an int"),
        (lambda: NormAttention(E, H, feature_map="elu"), TypeError, "feature_map must be"),
    ],
)
def test_constructor_errors_name_the_argument(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("make", [lambda: AgentAttention(E, H, 2), lambda: FlowAttention(E, H),
                                  lambda: NormAttention(E, H)])
def test_forward_errors_name_the_argument(make):
    m = make()
    with pytest.raises(TypeError, match="x=list, expected a torch.Tensor"):
        m([[0.0] * E])
    with pytest.raises(ValueError, match=r"x.shape=\(2, 5, 8\), expected \(B, L, 16\)"):
        m(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"x.shape=\(5, 16\)"):
        m(torch.randn(5, E))


def test_agent_module_needs_enough_tokens():
    with pytest.raises(ValueError, match="num_agents must be <="):
        AgentAttention(E, H, 6)(torch.randn(2, 5, E))
