"""LinearAttention, Retention and GatedLinearAttention: equations, state carry, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnlab.linear import Hedgehog, naive_recurrence, retnet_decay
from attnlab.nn import GatedLinearAttention, LinearAttention, Retention

E, H = 12, 3


def _x(L=11, B=2, seed=0):
    return torch.randn(B, L, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _heads(t, h):
    B, L, _ = t.shape
    return t.view(B, L, h, -1).transpose(1, 2)


def test_linear_attention_module_matches_its_equation():
    m = LinearAttention(E, H, causal=True, num_kv_heads=1).double()
    x = _x()
    q, k, v = _heads(m.q_proj(x), H), _heads(m.k_proj(x), 1), _heads(m.v_proj(x), 1)
    k, v = k.repeat_interleave(H, 1), v.repeat_interleave(H, 1)
    o = naive_recurrence((F.elu(q) + 1) / 2, F.elu(k) + 1, v, causal=True, normalize=True)
    torch.testing.assert_close(m(x), m.out_proj(o.transpose(1, 2).reshape(2, 11, E)))


@pytest.mark.parametrize("cls", [LinearAttention, Retention, GatedLinearAttention])
def test_prefill_then_decode_equals_one_pass(cls):
    kw = {"causal": True} if cls is LinearAttention else {}
    m = cls(E, H, chunk_size=4, **kw).double()
    x = _x(L=13)
    with torch.no_grad():
        whole = m(x)
        a, st = m(x[:, :9], return_state=True)
        outs = [a]
        for t in range(9, 13):
            o, st = m(x[:, t:t + 1], state=st, return_state=True)
            outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=1), whole)


def test_retention_matches_its_equation():
    m = Retention(E, H).double()
    x = _x()
    q, k, v = (_heads(p(x), H) for p in (m.q_proj, m.k_proj, m.v_proj))
    o = naive_recurrence(q * 2 ** -1, k, v, causal=True, decay=retnet_decay(H), normalize=False)
    y = F.layer_norm(o, (4,), eps=1e-5).transpose(1, 2).reshape(2, 11, E)
    torch.testing.assert_close(m(x), m.out_proj(F.silu(m.g_proj(x)) * y))


def test_gla_gates_are_in_range_and_every_parameter_learns():
    m = GatedLinearAttention(E, H, gate_low_rank=5)
    x = _x().float()
    a = m.gates(x)
    assert a.shape == (2, H, 11, 4) and bool(((a > 0) & (a <= 1)).all())
    m(x).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_learnable_feature_map_is_a_submodule_and_trains():
    m = LinearAttention(E, H, feature_map=Hedgehog(4, num_heads=H))
    assert any(n.startswith("feature_map.") for n, _ in m.named_parameters())
    m(_x().float()).sum().backward()
    assert m.feature_map.weight.grad is not None


def test_state_dict_round_trip():
    a, b = Retention(E, H), Retention(E, H)
    b.load_state_dict(a.state_dict())
    x = _x().float()
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("make,match", [
    (lambda: LinearAttention(10, 3), "multiple of num_heads"),
    (lambda: LinearAttention(E, H, num_kv_heads=2), "multiple of num_kv_heads"),
    (lambda: LinearAttention(E, H, chunk_size=0), "chunk_size"),
    (lambda: Retention(E, H, decay=1.5), "decay"),
    (lambda: GatedLinearAttention(E, H, gate_logit_normalizer=0), "gate_logit_normalizer"),
    (lambda: LinearAttention(E, H)(torch.zeros(2, 5, 7)), r"x must be \(B, L, embed_dim=12\)"),
])
def test_bad_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()
