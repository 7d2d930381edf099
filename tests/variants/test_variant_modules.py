"""The variant modules: shapes, the function each wraps, gradients to every parameter, errors,
and a short training run in which the loss falls."""

from __future__ import annotations

import pytest
import torch

import attnlab as al
from attnlab.variants import (
    CogAttention, ContextBroadcasting, GaussianAdaptiveAttention, MixtureOfHeadAttention, MultiTokenAttention,
    ReversedAttention, SelectiveAttention, SigmoidAttention, TalkingHeadsAttention, cog_attention,
    multi_token_attention_reference, reversed_attention, selective_attention_reference, sigmoid_attention_reference,
    talking_heads_attention_reference,
)
from variant_checks import train_losses

E, H = 16, 4

MODULES = {
    "selective": lambda: SelectiveAttention(E, H, chunk_size=4),
    "cog": lambda: CogAttention(E, H, al.Causal()),
    "mta": lambda: MultiTokenAttention(E, H, (2, 3), pattern=al.Causal(), head_group=2, chunk_size=4),
    "mta_pre": lambda: MultiTokenAttention(E, H, (3, 3), pattern=al.Causal(), head_group=4, head_mix_position="pre"),
    "talking": lambda: TalkingHeadsAttention(E, H, pattern=al.Causal()),
    "talking_6": lambda: TalkingHeadsAttention(E, H, 6, pattern=al.Causal()),
    "moh": lambda: MixtureOfHeadAttention(E, H, top_k=1, num_shared=2, pattern=al.Causal()),
    "moh_no_shared": lambda: MixtureOfHeadAttention(E, H, top_k=1),
    "gaam": lambda: GaussianAdaptiveAttention(E, H, num_gaussians=2),
    "sigmoid": lambda: SigmoidAttention(E, H, al.Causal(), score_mod=al.ALiBi(num_heads=H)),
    "cb": lambda: ContextBroadcasting(E, learnable_scale=True),
    "reversed": lambda: ReversedAttention(E, H, al.Causal(), message_gate=True),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_shapes_and_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    m = MODULES[name]().double()
    x = torch.randn(2, 9, E, dtype=torch.float64, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    params = [p for p in m.parameters()]
    grads = torch.autograd.grad((y * torch.randn_like(y)).sum(), [x, *params], allow_unused=True)
    assert grads[0] is not None and torch.isfinite(grads[0]).all()
    for (pname, _), gp in zip(m.named_parameters(), grads[1:]):
        assert gp is not None and torch.isfinite(gp).all() and gp.abs().sum() > 0, f"{name}.{pname} gets no gradient"
    assert repr(m)


def _targets(name, module):
    """Toy targets a module can fit: for the attention layers a causal running mean of the
    tokens under a random mixing; for GAAM and context broadcasting, their own output under
    other parameters."""
    if name == "gaam":
        from attnlab.variants import gaussian_adaptive_attention

        def target(x):
            xh = x.view(*x.shape[:2], H, E // H).transpose(1, 2)
            m = torch.linspace(-0.5, 0.5, 2 * H).view(H, 2)
            out = gaussian_adaptive_attention(xh, m, torch.full((H, 2), 0.7), axis="tokens")
            return out.transpose(1, 2).reshape(x.shape)
        return target
    if name == "cb":
        return lambda x: x + torch.linspace(-1, 2, E) * x.mean(1, keepdim=True)
    return None


@pytest.mark.parametrize("name", list(MODULES))
def test_training_lowers_the_loss(name):
    torch.manual_seed(0)
    module = MODULES[name]()
    first, last = train_losses(module, steps=30, lr=2e-2, target_fn=_targets(name, module))
    assert last < 0.8 * first, f"{name}: loss {first:.4f} -> {last:.4f}"


def _split(m, x):
    q, k, v = m.heads(x)
    return q, k, v


def test_modules_compute_their_functions():
    torch.manual_seed(0)
    x = torch.randn(2, 11, E, dtype=torch.float64)
    m = SelectiveAttention(E, H).double()
    torch.testing.assert_close(m(x), m.out_proj(m.merge(selective_attention_reference(*_split(m, x)))))
    m = CogAttention(E, H, al.Causal()).double()
    torch.testing.assert_close(m(x), m.out_proj(m.merge(cog_attention(*_split(m, x), al.Causal(), backend="reference"))))
    m = MultiTokenAttention(E, H, (3, 5), pattern=al.Causal(), head_group=2).double()
    with torch.no_grad():
        m.kernel.normal_()
    ref = multi_token_attention_reference(*_split(m, x), m.kernel, al.Causal(), head_mix=m.head_mix)
    torch.testing.assert_close(m(x), m.out_proj(m.merge(ref)))
    m = TalkingHeadsAttention(E, H, 3, pattern=al.Causal()).double()
    ref = talking_heads_attention_reference(*_split(m, x), m.logits_mix, m.weights_mix, al.Causal())
    torch.testing.assert_close(m(x), m.out_proj(m.merge(ref)))
    m = SigmoidAttention(E, H, al.Causal(), logit_bias=-1.0).double()
    torch.testing.assert_close(m(x), m.out_proj(m.merge(sigmoid_attention_reference(*_split(m, x), al.Causal(), bias=-1.0))))
    m = ReversedAttention(E, H).double()
    torch.testing.assert_close(m(x), m.out_proj(m.merge(reversed_attention(*_split(m, x), backend="reference"))))
    m = ContextBroadcasting()
    torch.testing.assert_close(m(x), x + x.mean(1, keepdim=True))


def test_identity_initialisations_start_as_plain_attention():
    torch.manual_seed(0)
    x = torch.randn(2, 11, E, dtype=torch.float64)
    for m in (MultiTokenAttention(E, H, (3, 5), pattern=al.Causal(), head_group=2).double(),
              TalkingHeadsAttention(E, H, pattern=al.Causal()).double()):
        plain = m.out_proj(m.merge(al.attention(*_split(m, x), al.Causal())))
        torch.testing.assert_close(m(x), plain)


def test_moh_is_the_out_projection_of_gated_heads_and_reports_its_balance_loss():
    from attnlab.variants import mixture_of_heads_attention_reference, moh_gates_reference

    torch.manual_seed(0)
    m = MixtureOfHeadAttention(E, H, top_k=1, num_shared=1, pattern=al.Causal()).double()
    x = torch.randn(2, 11, E, dtype=torch.float64)
    y = m(x)
    assert m.balance_loss is not None and m.balance_loss.ndim == 0 and m.balance_loss > 0
    gates = moh_gates_reference(m.router(x), 1, m.shared_router(x), m.balance(x))
    assert ((gates[..., 1:] > 0).sum(-1) == 1).all()  # one routed head per token, plus the shared one
    heads = mixture_of_heads_attention_reference(*_split(m, x), gates, al.Causal())
    torch.testing.assert_close(y, m.out_proj(m.merge(heads)))


def test_gaam_matches_its_function_per_head():
    from attnlab.variants import gaussian_adaptive_attention

    torch.manual_seed(0)
    m = GaussianAdaptiveAttention(E, H, 2, axis="features").double()
    with torch.no_grad():
        m.mean_offset.normal_()
    x = torch.randn(2, 7, E, dtype=torch.float64)
    xh = x.view(2, 7, H, E // H).transpose(1, 2)
    want = gaussian_adaptive_attention(xh, m.mean_offset, m.log_scale.exp(), axis="features")
    torch.testing.assert_close(m(x), want.transpose(1, 2).reshape(2, 7, E))


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="embed_dim=10, expected a multiple of num_heads=4"):
        CogAttention(10, 4)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        SelectiveAttention(16, "4")
    with pytest.raises(TypeError, match="bias=1, expected a bool"):
        SigmoidAttention(16, 4, bias=1)
    with pytest.raises(ValueError, match=r"kernel_size=\(3,\), expected two positive ints"):
        MultiTokenAttention(16, 4, (3,))
    with pytest.raises(ValueError, match="head_group=3, expected a divisor of num_heads=4"):
        MultiTokenAttention(16, 4, head_group=3)
    with pytest.raises(ValueError, match="top_k=4, expected at most the 3 routed heads"):
        MixtureOfHeadAttention(16, 4, top_k=4, num_shared=1)
    with pytest.raises(ValueError, match="num_shared=4, expected fewer than num_heads=4"):
        MixtureOfHeadAttention(16, 4, top_k=1, num_shared=4)
    with pytest.raises(ValueError, match="learnable_scale=True needs embed_dim"):
        ContextBroadcasting(learnable_scale=True)
    with pytest.raises(ValueError, match="axis='heads', expected 'tokens' or 'features'"):
        GaussianAdaptiveAttention(16, 4, axis="heads")
    with pytest.raises(TypeError, match="pattern must be"):
        ReversedAttention(16, 4, pattern=5)
    with pytest.raises(ValueError, match=r"x.shape=\(2, 5, 8\), expected \(B, L, 16\)"):
        CogAttention(16, 4)(torch.randn(2, 5, 8))
    with pytest.raises(TypeError, match="x=list, expected a torch.Tensor"):
        TalkingHeadsAttention(16, 4)([1.0])
