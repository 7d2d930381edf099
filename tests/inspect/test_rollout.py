"""Attention rollout (Abnar and Zuidema, 2020) on maps with known rollouts."""

from __future__ import annotations

import pytest
import torch

from attnlab.inspect.rollout import attention_rollout, fuse_heads

L = 5


@pytest.mark.parametrize("residual", [0.0, 0.5, 0.9])
def test_identity_maps_roll_out_to_the_identity(residual):
    maps = torch.eye(L, dtype=torch.float64).expand(4, 2, 3, L, L)  # (layers, B, H, L, L)
    out = attention_rollout(maps, residual=residual)
    assert out.shape == (2, L, L)
    torch.testing.assert_close(out, torch.eye(L, dtype=torch.float64).expand(2, L, L))


def test_uniform_maps_without_residual_give_uniform_and_with_residual_a_known_mix():
    u = torch.full((L, L), 1 / L, dtype=torch.float64)
    maps = u.expand(3, 1, 2, L, L)
    torch.testing.assert_close(attention_rollout(maps, residual=0.0), u.expand(1, L, L))
    # (r I + (1-r) U)^n = r^n I + (1 - r^n) U since U^2 = U and IU = U
    r, n = 0.5, 3
    expected = r**n * torch.eye(L, dtype=torch.float64) + (1 - r**n) * u
    torch.testing.assert_close(attention_rollout(maps, residual=r), expected.expand(1, L, L))


def test_order_of_the_product_and_intermediates():
    torch.manual_seed(0)
    a, b = (torch.softmax(torch.randn(1, 2, L, L, dtype=torch.float64), -1) for _ in range(2))
    out = attention_rollout([a, b], residual=0.0, return_all=True)
    assert out.shape == (2, 1, L, L)
    torch.testing.assert_close(out[0], a.mean(1))
    torch.testing.assert_close(out[1], b.mean(1) @ a.mean(1))  # later layer on the left
    torch.testing.assert_close(out[1].sum(-1), torch.ones(1, L, dtype=torch.float64))
    skip = attention_rollout([a, b], residual=0.0, start_layer=1, return_all=True)
    torch.testing.assert_close(skip[0], torch.eye(L, dtype=torch.float64).expand(1, L, L))
    torch.testing.assert_close(skip[1], b.mean(1))


def test_head_fusion_max_is_renormalised():
    torch.manual_seed(1)
    a = torch.softmax(torch.randn(1, 3, L, L, dtype=torch.float64), -1)
    out = attention_rollout([a], residual=0.0, head_fusion="max")
    m = fuse_heads(a, "max")
    torch.testing.assert_close(out, m / m.sum(-1, keepdim=True))


def test_rollout_errors():
    with pytest.raises(ValueError, match="L == S"):
        attention_rollout(torch.full((2, 1, 1, 3, 4), 0.25))
    with pytest.raises(ValueError, match="residual"):
        attention_rollout(torch.eye(3).expand(2, 1, 1, 3, 3), residual=1.5)
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(torch.eye(3).expand(2, 1, 1, 3, 3), head_fusion="median")
    with pytest.raises(TypeError, match="maps"):
        attention_rollout([])
