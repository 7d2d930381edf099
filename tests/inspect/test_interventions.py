"""Each intervention on hand-built maps; composition, filters, gradients, capture of edits."""

from __future__ import annotations

import math

import pytest
import torch

import attnlab as al
from attnlab.inspect import (
    AmplifyKeys, Flatten, HeadMask, RedistributeSinkMass, SinkCalibration, Temperature, TowardIdentity,
    capture, intervene, layer_scope,
)

D64 = torch.float64


def _map_inputs(logits: torch.Tensor):
    """q, k, v with ``scale * q k^T == logits`` (L = S = logits.shape[-1], one head per row
    block): q = logits (D = S), k = identity / scale; v = identity, so out == probs."""
    B, H, L, S = logits.shape
    q = logits.clone().to(D64)
    k = torch.eye(S, dtype=D64).expand(B, H, S, S) * math.sqrt(S)
    v = torch.eye(S, dtype=D64).expand(B, H, S, S).contiguous()
    return q, k.contiguous(), v


def _run(logits, *edits, pattern=None, **kw):
    q, k, v = _map_inputs(logits)
    with intervene(*edits, **kw), capture(dtype=None) as rec:
        out = al.attention(q, k, v, pattern)
    assert rec[0].edited
    assert torch.allclose(out, rec[0].probs, atol=1e-12)  # v = I: the output is the map
    return out, al.attention_weights(q, k, v, pattern)


def test_inputs_reproduce_the_logits():
    logits = torch.randn(1, 2, 4, 4, dtype=D64)
    q, k, v = _map_inputs(logits)
    assert torch.allclose(al.attention(q, k, v), torch.softmax(logits, -1), atol=1e-12)


def test_head_mask_bool_and_per_layer():
    logits = torch.randn(2, 3, 5, 5, dtype=D64)
    out, p = _run(logits, HeadMask(torch.tensor([True, False, True])))
    assert torch.allclose(out[:, 0], p[:, 0]) and torch.all(out[:, 1] == 0) and torch.allclose(out[:, 2], p[:, 2])
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.0, 2.0]], dtype=D64)
    q, k, v = _map_inputs(logits)
    with intervene(HeadMask(mask)):
        o0 = al.attention(q, k, v)
        o1 = al.attention(q, k, v)
        with pytest.raises(ValueError, match="no row for layer 2"):
            al.attention(q, k, v)
    assert torch.allclose(o0, p) and torch.allclose(o1, p * mask[1].view(1, 3, 1, 1))


def test_head_mask_gradient_is_head_importance():
    """d loss / d xi_h = sum over the head's output of d loss / d out_h * out_h (Michel et al.)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 6, 4, generator=g, dtype=D64) for _ in range(3))
    target = torch.randn(1, 3, 6, 4, generator=g, dtype=D64)
    xi = torch.ones(3, dtype=D64, requires_grad=True)
    with intervene(HeadMask(xi)):
        out = al.attention(q, k, v)
    loss = ((out - target) ** 2).sum()
    loss.backward()
    plain = al.attention(q, k, v)
    expected = (2 * (plain - target) * plain).sum(dim=(0, 2, 3))
    assert torch.allclose(xi.grad, expected, atol=1e-10)


def test_sink_calibration_hand_case():
    # 4 queries, causal; every query puts most mass on key 2 once visible: key 2 is a (hidden) sink
    logits = torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 5, 0], [0, 0, 5, 0]], dtype=D64).view(1, 1, 4, 4)
    out, p = _run(logits, SinkCalibration(threshold=1.5, beta=0.5), pattern=al.Causal())
    # detection: mean over queries seeing key j of p_ij * n_i
    cal = SinkCalibration(threshold=1.5, beta=0.5)
    vis = torch.tril(torch.ones(4, 4, dtype=torch.bool)).view(1, 1, 4, 4)
    assert cal.sinks(p, vis).view(-1).tolist() == [False, False, True, False]  # key 0 kept (keep_first)
    exp = p.clone()
    for i in (2, 3):
        removed = 0.5 * p[0, 0, i, 2]
        others = [j for j in range(i + 1) if j != 2]
        mass = p[0, 0, i, others].sum()
        exp[0, 0, i, 2] = 0.5 * p[0, 0, i, 2]
        for j in others:
            exp[0, 0, i, j] = p[0, 0, i, j] * (1 + removed / mass)
    assert torch.allclose(out, exp, atol=1e-12)
    assert torch.allclose(out.sum(-1), torch.ones(1, 1, 4, dtype=D64))
    assert torch.all(out[torch.broadcast_to(~vis, out.shape)] == 0)


def test_sink_calibration_keep_first_false_finds_key0():
    logits = torch.tensor([[6.0, 0, 0], [6, 0, 0], [6, 0, 0]], dtype=D64).view(1, 1, 3, 3)
    out, p = _run(logits, SinkCalibration(threshold=2.0, beta=0.0, keep_first=False))
    assert torch.all(out[..., 0] == 0) and torch.allclose(out[..., 1:], torch.full((1, 1, 3, 2), 0.5, dtype=D64))
    out, p = _run(logits, SinkCalibration(threshold=2.0, beta=0.0))
    assert torch.allclose(out, p)


def test_redistribute_sink_mass_hand_case():
    logits = torch.log(torch.tensor([[0.5, 0.1, 0.2, 0.2], [0.4, 0.3, 0.3, 0.0 + 1e-300]], dtype=D64)).view(1, 1, 2, 4)
    out, p = _run(logits, RedistributeSinkMass([0], fraction=0.5, targets=[1, 2]))
    r0 = p[0, 0, 0]
    budget = 0.5 * r0[0]
    exp0 = torch.stack([r0[0] / 2, r0[1] + budget * r0[1] / (r0[1] + r0[2]), r0[2] + budget * r0[2] / (r0[1] + r0[2]),
                        r0[3]])
    assert torch.allclose(out[0, 0, 0], exp0, atol=1e-12)
    assert torch.allclose(out.sum(-1), p.sum(-1))
    # only the chosen query rows
    out_q, p = _run(logits, RedistributeSinkMass(torch.tensor([True, False, False, False]), 0.5, queries=[1]))
    assert torch.allclose(out_q[0, 0, 0], p[0, 0, 0]) and not torch.allclose(out_q[0, 0, 1], p[0, 0, 1])


def test_redistribute_respects_hidden_keys():
    logits = torch.zeros(1, 1, 4, 4, dtype=D64)
    out, p = _run(logits, RedistributeSinkMass([0], fraction=1.0), pattern=al.Causal())
    assert torch.all(out[0, 0][~torch.tril(torch.ones(4, 4, dtype=torch.bool))] == 0)
    assert out[0, 0, 0, 0] == 1  # row 0 sees only the sink: no target mass, unchanged
    assert torch.allclose(out[0, 0, 3], torch.tensor([0, 1 / 3, 1 / 3, 1 / 3], dtype=D64))


def test_amplify_keys_equals_logit_shift_per_head():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 2, 5, 5, generator=g, dtype=D64)
    gain = torch.tensor([3.0, 0.5], dtype=D64)
    out, _ = _run(logits, AmplifyKeys([1, 3], gain), pattern=al.SlidingWindow(2, 2))
    shifted = logits.clone()
    shifted[:, :, :, [1, 3]] += torch.log(gain).view(1, 2, 1, 1)
    q, k, v = _map_inputs(shifted)
    assert torch.allclose(out, al.attention_weights(q, k, v, al.SlidingWindow(2, 2)), atol=1e-12)


def test_flatten_is_uniform_over_visible_keys():
    logits = torch.randn(1, 1, 4, 4, dtype=D64)
    out, p = _run(logits, Flatten(), pattern=al.Causal())
    assert torch.allclose(out[0, 0], torch.tril(torch.ones(4, 4, dtype=D64)) / torch.arange(1, 5, dtype=D64)[:, None])
    half, p = _run(logits, Flatten(0.5), pattern=al.Causal())
    assert torch.allclose(half, 0.5 * p + 0.5 * out)


def test_toward_identity():
    logits = torch.randn(1, 1, 4, 4, dtype=D64)
    out, p = _run(logits, TowardIdentity(0.25), pattern=al.Causal())
    assert torch.allclose(out, 0.75 * p + 0.25 * torch.eye(4, dtype=D64))
    # L < S: the identity is bottom-right aligned (query i -> key i + S - L)
    q = torch.randn(1, 1, 2, 3, dtype=D64)
    k = torch.randn(1, 1, 4, 3, dtype=D64)
    with intervene(TowardIdentity(1.0)):
        o = al.attention(q, k, torch.eye(4, dtype=D64).view(1, 1, 4, 4))
    assert torch.equal(o[0, 0], torch.tensor([[0, 0, 1, 0], [0, 0, 0, 1]], dtype=D64))
    with intervene(TowardIdentity(1.0)), pytest.raises(ValueError, match="S >= L"):
        al.attention(k, q, q)


def test_temperature_equals_scaled_logits():
    logits = torch.randn(2, 2, 5, 5, dtype=D64)
    out, _ = _run(logits, Temperature(0.5), pattern=al.SlidingWindow(1, 1))
    q, k, v = _map_inputs(logits / 0.5)
    assert torch.allclose(out, al.attention_weights(q, k, v, al.SlidingWindow(1, 1)), atol=1e-12)


def test_composition_applies_in_order_and_nests():
    logits = torch.randn(1, 2, 4, 4, dtype=D64)
    q, k, v = _map_inputs(logits)
    with intervene(HeadMask(torch.tensor([0.5, 1.0], dtype=D64)), Flatten()):
        a = al.attention(q, k, v)
    with intervene(HeadMask(torch.tensor([0.5, 1.0], dtype=D64))):
        with intervene(Flatten()):
            b = al.attention(q, k, v)
    # flatten keeps the (halved) row mass
    assert torch.allclose(a, b) and torch.allclose(a[0, 0], torch.full((4, 4), 0.125, dtype=D64))
    with intervene(Flatten(), Temperature(0.5)):
        c = al.attention(q, k, v)
    assert torch.allclose(c[0, 0], torch.full((4, 4), 0.25, dtype=D64))  # uniform stays uniform


def test_layer_and_head_filters():
    logits = torch.randn(1, 3, 4, 4, dtype=D64)
    q, k, v = _map_inputs(logits)
    p = al.attention_weights(q, k, v)
    with intervene(Flatten(), layers=[1], heads=[2]):
        o0, o1 = al.attention(q, k, v), al.attention(q, k, v)
    assert torch.allclose(o0, p)
    assert torch.allclose(o1[:, :2], p[:, :2]) and torch.allclose(o1[:, 2], torch.full((1, 4, 4), 0.25, dtype=D64))
    with intervene(Flatten(), layers="attn.5"):
        with layer_scope(5, "attn.5"):
            o = al.attention(q, k, v)
        o_other = al.attention(q, k, v)
    assert torch.allclose(o[0, 0], torch.full((4, 4), 0.25, dtype=D64)) and torch.allclose(o_other, p)
    with intervene(Flatten(), heads=torch.tensor([True, False, True])):
        o = al.attention(q, k, v)
    assert torch.allclose(o[:, 1], p[:, 1]) and not torch.allclose(o[:, 0], p[:, 0])


def test_gqa_and_gradients_through_edits():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 6, 8, generator=g, dtype=D64, requires_grad=True)
    k, v = (torch.randn(1, 2, 6, 8, generator=g, dtype=D64, requires_grad=True) for _ in range(2))
    with intervene(Flatten(0.0)):  # identity edit: the dense path equals attention
        out = al.attention(q, k, v, al.Causal())
    ref = al.attention(q, k, v, al.Causal())
    assert torch.allclose(out, ref, atol=1e-12)
    def fn(q, k, v):
        return _with(lambda: al.attention(q, k, v, al.Causal()), AmplifyKeys([0], 2.0), Temperature(0.7))

    assert torch.autograd.gradcheck(fn, (q, k, v))


def _with(f, *edits):
    with intervene(*edits):
        return f()


def test_return_lse_refused_inside_intervention():
    q = torch.randn(1, 1, 3, 2)
    with intervene(Flatten()), pytest.raises(ValueError, match="return_lse"):
        al.attention(q, q, q, return_lse=True)


@pytest.mark.parametrize("make,match", [
    (lambda: HeadMask([1, 0]), "mask"), (lambda: HeadMask(torch.tensor([1, 0])), "dtype"),
    (lambda: SinkCalibration(threshold=0), "threshold"), (lambda: SinkCalibration(beta=1.5), "beta"),
    (lambda: RedistributeSinkMass("first"), "sinks"), (lambda: RedistributeSinkMass([0], fraction=-1), "fraction"),
    (lambda: AmplifyKeys([0], -1.0), "gain"), (lambda: AmplifyKeys([-2]), "keys"), (lambda: Flatten(2), "alpha"),
    (lambda: TowardIdentity("a"), "alpha"), (lambda: Temperature(0), "t="),
    (lambda: intervene(Flatten(), layers=[-1]).__enter__(), "layers"),
    (lambda: intervene(Flatten(), heads=["a"]).__enter__(), "heads"),
    (lambda: intervene("flatten").__enter__(), "Edit"),
])
def test_argument_errors(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_call_time_errors_name_the_problem():
    q = torch.randn(1, 2, 3, 4)
    with intervene(AmplifyKeys([5])), pytest.raises(ValueError, match="S=3"):
        al.attention(q, q, q)
    with intervene(HeadMask(torch.ones(3))), pytest.raises(ValueError, match="Hq=2"):
        al.attention(q, q, q)
    with intervene(Flatten(), heads=[4]), pytest.raises(ValueError, match="Hq=2"):
        al.attention(q, q, q)
    with intervene(Flatten(), max_elements=10), pytest.raises(ValueError, match="max_elements=10"):
        al.attention(q, q, q)
