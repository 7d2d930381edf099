"""Head importance by masking and by gradient on a tiny two-layer attention model whose
head gates can also be applied by hand, so the answer is known independently."""

from __future__ import annotations

import pytest
import torch

import attnlab as al
from attnlab.inspect import layer_scope
from attnlab.inspect.importance import head_importance_by_gradient, head_importance_by_masking

H, D, E, T = 3, 4, 12, 7


class Tiny(torch.nn.Module):
    """Two attention layers (H heads) with a tanh MLP; head 2 of layer 1 has a zero output
    projection, so nothing depends on it."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.qkv = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(E, 3 * H * D, generator=g, dtype=torch.float64) / E**0.5)
             for _ in range(2)])
        self.out = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(H * D, E, generator=g, dtype=torch.float64) / (H * D) ** 0.5)
             for _ in range(2)])
        with torch.no_grad():
            self.out[1][2 * D:3 * D] = 0

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        B = x.shape[0]
        for layer in range(2):
            q, k, v = (x @ self.qkv[layer]).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
            with layer_scope(layer, f"layer{layer}"):
                o = al.attention(q, k, v, pattern=al.Causal())  # (B, H, T, D)
            if gate is not None:  # the same gate, applied by hand to the head outputs
                o = o * gate[layer].view(1, H, 1, 1)
            x = x + torch.tanh(o.transpose(1, 2).reshape(B, T, H * D) @ self.out[layer])
        return x


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(1)
    model = Tiny()
    x = torch.randn(2, T, E, dtype=torch.float64)
    target = torch.randn(2, T, E, dtype=torch.float64)
    return model, x, target


def _loss(model, x, target, gate=None):
    return ((model(x, gate) - target) ** 2).mean()


def test_masking_equals_removing_the_head_by_hand(setup):
    model, x, target = setup
    imp = head_importance_by_masking(lambda: _loss(model, x, target), 2, H)
    assert imp.shape == (2, H) and imp.dtype == torch.float64
    base = _loss(model, x, target).item()
    for layer in range(2):
        for head in range(H):
            gate = torch.ones(2, H, dtype=torch.float64)
            gate[layer, head] = 0
            assert imp[layer, head].item() == pytest.approx(_loss(model, x, target, gate).item() - base, abs=1e-12)
    assert imp[1, 2].item() == 0.0  # the head with a zero output projection
    assert bool((imp.flatten()[:-1].abs() > 1e-6).all())


def test_gradient_equals_the_gradient_of_the_hand_gate(setup):
    model, x, target = setup
    imp = head_importance_by_gradient(lambda: _loss(model, x, target), 2, H)
    gate = torch.ones(2, H, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(_loss(model, x, target, gate), gate)
    torch.testing.assert_close(imp, g.abs())
    assert imp[1, 2].item() == 0.0
    normed = head_importance_by_gradient(lambda: _loss(model, x, target), 2, H, normalize_layers=True)
    torch.testing.assert_close(normed.norm(dim=-1), torch.ones(2, dtype=torch.float64))


def test_gradient_per_example_is_the_mean_of_absolute_values(setup):
    model, x, target = setup
    per_example = lambda: ((model(x) - target) ** 2).mean(dim=(1, 2))  # (B,)
    imp = head_importance_by_gradient(per_example, 2, H)
    expected = torch.zeros(2, H, dtype=torch.float64)
    for n in range(2):
        gate = torch.ones(2, H, dtype=torch.float64, requires_grad=True)
        loss = ((model(x[n:n + 1], gate) - target[n:n + 1]) ** 2).mean()
        expected += torch.autograd.grad(loss, gate)[0].abs() / 2
    torch.testing.assert_close(imp, expected)


def test_a_linear_loss_makes_masking_the_negated_gradient():
    # one layer, loss linear in the head outputs: loss(xi) = sum_h xi_h c_h, so the masking
    # importance is exactly -c_h and the gradient importance |c_h|
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, H, T, D, dtype=torch.float64) for _ in range(3))
    w = torch.randn(1, H, T, D, dtype=torch.float64)
    loss_fn = lambda: (al.attention(q, k, v) * w).sum()
    c = (al.attention(q, k, v) * w).sum(dim=(0, 2, 3))
    torch.testing.assert_close(head_importance_by_masking(loss_fn, 1, H)[0], -c)
    torch.testing.assert_close(head_importance_by_gradient(loss_fn, 1, H)[0], c.abs())


def test_subset_and_errors(setup):
    model, x, target = setup
    imp = head_importance_by_masking(lambda: _loss(model, x, target), 2, H, heads=[(0, 1)])
    assert torch.isnan(imp).sum().item() == 2 * H - 1 and not torch.isnan(imp[0, 1])
    with pytest.raises(ValueError, match="heads contains"):
        head_importance_by_masking(lambda: _loss(model, x, target), 2, H, heads=[(2, 0)])
    with pytest.raises(ValueError, match="does not require grad"):
        head_importance_by_gradient(lambda: _loss(model, x, target).detach(), 2, H)
    with pytest.raises(ValueError, match="num_heads"):
        head_importance_by_gradient(lambda: 0.0, 2, 0)
