"""The segment loop of the causal chunked form: what its backward keeps, and the gradient of
every kind of input on its own, against the token-by-token recurrence in float64."""

import pytest
import torch
import torch.nn.functional as F

import attnlab.linear.segments as segments
from attnlab.linear import EluPlusOne, linear_attention, naive_recurrence
from attnlab.linear.forms import LinearAttentionState

TOL = dict(rtol=1e-9, atol=1e-9)


def _qkv(B=1, H=2, L=50, D=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g, dtype=dtype) for _ in range(3)]


@pytest.fixture
def short_segments(monkeypatch):
    monkeypatch.setattr(segments, "SEGMENT_TOKENS", 8)


def _saved_numel(fn) -> int:
    """Elements of the distinct tensors autograd saves while ``fn`` runs."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.shape, t.stride())] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("normalize", [False, True])
def test_autograd_keeps_only_inputs_and_entering_states(monkeypatch, normalize):
    """With 32 segments, what autograd saves is the inputs plus one small state per segment, not
    the chunked intermediates (scores, per-chunk states, feature maps) of every segment."""
    monkeypatch.setattr(segments, "SEGMENT_TOKENS", 64)
    B, H, L, D = 1, 2, 2048, 16
    q, k, v = (t.float().requires_grad_() for t in _qkv(B, H, L, D))
    numel = _saved_numel(lambda: linear_attention(q, k, v, causal=True, chunk_size=16,
                                                  feature_map="elu+1", normalize=normalize))
    n_segments = L // 64
    state = B * H * D * (D + int(normalize))
    assert numel <= 3 * q.numel() + n_segments * state


@pytest.mark.parametrize("which", ["q", "k", "v", "gate", "decay", "S0"])
def test_gradient_of_one_input_alone(short_segments, which):
    """Each input the only one that needs a gradient (the backward's bookkeeping skips the
    others): its gradient equals the recurrence's."""
    q, k, v = _qkv(L=29)
    g = torch.Generator().manual_seed(5)
    gate = 0.5 + 0.5 * torch.rand(1, 2, 29, 4, generator=g, dtype=torch.float64)
    decay = torch.tensor([0.9, 0.95], dtype=torch.float64)
    S0 = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)
    leaf = dict(q=q, k=k, v=v, gate=gate, decay=decay, S0=S0)[which].requires_grad_()
    kw = dict(causal=True, gate=gate, decay=decay, normalize=False)
    out, st = linear_attention(q, k, v, feature_map="identity", scale=1.0, chunk_size=3,
                               initial_state=(S0, None), return_state=True, **kw)
    ref, rst = naive_recurrence(q, k, v, initial_state=(S0, None), return_state=True, **kw)
    torch.testing.assert_close(out, ref, **TOL)
    go = torch.randn_like(out)
    (a,) = torch.autograd.grad((out * go).sum() + st.S.square().sum(), leaf)
    (b,) = torch.autograd.grad((ref * go).sum() + rst.S.square().sum(), leaf)
    torch.testing.assert_close(a, b, **TOL)


def test_gradient_through_the_state_only(short_segments):
    """A loss on the returned state alone (the outputs unused) reaches k and v; q, which only
    reads the state, gets none."""
    q, k, v = (t.requires_grad_() for t in _qkv(L=21))
    _, st = linear_attention(q, k, v, causal=True, feature_map="elu+1", chunk_size=4, return_state=True)
    phi = EluPlusOne()
    _, rst = naive_recurrence(phi(q), phi(k), v, causal=True, normalize=True, return_state=True)
    got = torch.autograd.grad((st.S.sum() + st.z.sum()), (q, k, v), allow_unused=True)
    want = torch.autograd.grad((rst.S.sum() + rst.z.sum()), (k, v))
    assert got[0] is None or torch.count_nonzero(got[0]) == 0
    for a, b in zip(got[1:], want):
        torch.testing.assert_close(a, b, **TOL)


def test_callable_map_closing_over_a_parameter_gets_its_gradient(short_segments):
    """A plain function is no module, so its parameters cannot be listed: it is applied to the
    whole sequence before the segments, and the tensor it closes over still gets its gradient."""
    q, k, v = _qkv(L=37)
    w = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2),
                    requires_grad=True)

    def phi(x):
        return F.elu(x @ w) + 1

    out = linear_attention(q, k, v, causal=True, feature_map=phi, scale=1.0, chunk_size=5)
    ref = naive_recurrence(phi(q), phi(k), v, causal=True, normalize=True)
    torch.testing.assert_close(out, ref, **TOL)
    go = torch.randn_like(out)
    (a,) = torch.autograd.grad((out * go).sum(), w)
    (b,) = torch.autograd.grad((ref * go).sum(), w)
    torch.testing.assert_close(a, b, **TOL)


def test_no_grad_and_grad_paths_agree(short_segments):
    q, k, v = _qkv(L=40)
    with torch.no_grad():
        a, sa = linear_attention(q, k, v, causal=True, decay=0.9, chunk_size=6, return_state=True)
    qg = q.clone().requires_grad_()
    b, sb = linear_attention(qg, k, v, causal=True, decay=0.9, chunk_size=6, return_state=True)
    assert isinstance(sb, LinearAttentionState) and b.requires_grad
    torch.testing.assert_close(a, b.detach(), **TOL)
    torch.testing.assert_close(sa.S, sb.S.detach(), **TOL)
