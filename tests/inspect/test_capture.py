"""capture(): records equal attention_weights; blockwise summaries equal dense ones."""

from __future__ import annotations

import pytest
import torch

import attnlab as al
from attnlab.api import INSPECT_HOOK
from attnlab.geometry import check_qkv
from attnlab.inspect import capture, layer_scope
from attnlab.inspect._summary import dense_summary
from attnlab.nn import MultiheadAttention
from attnlab.patterns import as_pattern, resolve_pattern
from attnlab.testing import dense_mask


def _qkv(B=2, Hq=4, Hkv=2, L=12, S=12, D=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, Hq, L, D, generator=g, dtype=dtype), torch.randn(B, Hkv, S, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, S, D, generator=g, dtype=dtype))


CASES = [
    (None, None),
    (al.Causal(), None),
    (al.SlidingWindow(3, 1) | al.Sinks(2), al.ALiBi(4)),
    (al.TopKBlocks(1, 4), None),
    (al.Causal(), al.RelativeEmbedding(8, max_distance=12)),
]


@pytest.mark.parametrize("pattern,score_mod", CASES, ids=["full", "causal", "window+sinks+alibi", "topk", "relemb"])
def test_capture_equals_attention_weights(pattern, score_mod):
    q, k, v = _qkv()
    if score_mod is not None:
        score_mod = score_mod.double()
    with capture(dtype=None) as rec:
        out = al.attention(q, k, v, pattern, score_mod)
    assert len(rec) == 1
    w = al.attention_weights(q, k, v, pattern, score_mod)
    assert torch.equal(rec.probs(0), w)
    assert rec.records[0].kv_heads == 2 and rec.records[0].q_shape == (12,)
    assert torch.allclose(rec.probs(0) @ v.repeat_interleave(2, 1), out, atol=1e-12)


def test_capture_default_is_float32_on_cpu_and_detached():
    q, k, v = (t.requires_grad_() for t in _qkv())
    with capture() as rec:
        al.attention(q, k, v, al.Causal())
    p = rec.probs(0)
    assert p.dtype == torch.float32 and p.device.type == "cpu" and not p.requires_grad
    assert torch.equal(p, al.attention_weights(q, k, v, al.Causal()).float())


def test_capture_without_detach_backpropagates():
    q, k, v = (t.requires_grad_() for t in _qkv())
    with capture(detach=False, dtype=None) as rec:
        al.attention(q, k, v)
    rec.probs(0)[..., 0].sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_capture_of_multihead_module_layers_and_stack():
    torch.manual_seed(0)
    mods = [MultiheadAttention(16, 4, pattern=al.SlidingWindow(2, 2)).double() for _ in range(3)]
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    with capture(dtype=None) as rec:
        h = x
        for m in mods:
            h = h + m(h, h, h, need_weights=False)[0]
    assert [r.layer for r in rec] == [0, 1, 2] and [r.name for r in rec] == ["call0", "call1", "call2"]
    stack = rec.stack()
    assert stack.shape == (3, 2, 4, 10, 10)
    # the module's own weights equal the captured map of its call
    _, w = mods[0](x, x, x, need_weights=True, average_attn_weights=False)
    assert torch.allclose(stack[0], w, atol=1e-12)


def test_layer_scope_names_and_errors():
    q, k, v = _qkv()
    with capture() as rec:
        with layer_scope(3, "block3"):
            al.attention(q, k, v)
            al.attention(q, k, v)
        al.attention(q, k, v)
    assert [(r.layer, r.name) for r in rec] == [(3, "block3"), (3, "block3"), (2, "call2")]
    assert len(rec.for_layer(3)) == 2
    with pytest.raises(ValueError, match="2 records"):
        rec.probs(3)
    with pytest.raises(ValueError, match="has 0 records"):
        rec.probs(7)
    with pytest.raises(ValueError, match="2 records"):
        rec.stack()
    with pytest.raises(ValueError, match="layer"):
        with layer_scope(-1):
            pass


def test_stack_shape_mismatch_and_empty():
    q, k, v = _qkv()
    with capture() as rec:
        al.attention(q, k, v)
        al.attention(q[:, :, :5], k, v)
    with pytest.raises(ValueError, match="different shapes"):
        rec.stack()
    with capture() as empty:
        pass
    with pytest.raises(ValueError, match="nothing was recorded"):
        empty.stack()


def test_nested_captures_and_hook_reset():
    q, k, v = _qkv()
    assert INSPECT_HOOK.get() is None
    with capture() as outer:
        al.attention(q, k, v)
        with capture() as inner:
            al.attention(q, k, v, al.Causal())
    assert INSPECT_HOOK.get() is None
    assert len(outer) == 2 and len(inner) == 1
    assert torch.equal(inner[0].probs, outer[1].probs)
    assert inner[0].layer == 0 and outer[1].layer == 1


def test_qkv_option_stores_inputs():
    q, k, v = _qkv()
    with capture(qkv=True, dtype=None) as rec:
        al.attention(q, k, v)
    r = rec[0]
    assert torch.equal(r.q, q) and torch.equal(r.k, k) and torch.equal(r.v, v)


SUMMARY_CASES = [
    (al.Causal(), None, 12, 12),
    (al.SlidingWindow(2, 0), al.ALiBi(4), 12, 12),
    (al.Causal(), None, 5, 12),  # bottom-right aligned, L != S
    (al.KeySet(torch.tensor([[[[0, 1]] * 11 + [[-1, -1]]]])), None, 12, 12),  # an empty row
    (al.Causal(), al.RelativeEmbedding(8, max_distance=12), 12, 12),
]


@pytest.mark.parametrize("pattern,score_mod,L,S", SUMMARY_CASES,
                         ids=["causal", "window+alibi", "L<S", "empty", "relemb"])
def test_blockwise_summary_equals_dense_summary(pattern, score_mod, L, S):
    q, k, v = _qkv(L=L, S=S)
    if score_mod is not None:
        score_mod = score_mod.double()
    with capture(summary=True, tile=(5, 3), dtype=None) as rec:
        al.attention(q, k, v, pattern, score_mod)
    r = rec[0]
    assert r.probs is None and r.summary is not None
    g = check_qkv(q, k, v)
    p = al.attention_weights(q, k, v, pattern, score_mod)
    visible = dense_mask(resolve_pattern(as_pattern(pattern), q, k), g)
    ref = dense_summary(p, visible, g)
    assert torch.equal(r.summary["visible_keys"], ref["visible_keys"])
    for key in ("entropy", "distance", "key_mass", "max_prob"):
        assert torch.allclose(r.summary[key], ref[key], atol=1e-10), key


def test_summary_hand_computed_values():
    # one query, uniform over 4 keys: entropy log 4, distance mean |3 - j| = 1.5
    q = torch.zeros(1, 1, 4, 2, dtype=torch.float64)
    k = torch.zeros(1, 1, 4, 2, dtype=torch.float64)
    with capture(summary=True, tile=(2, 3), dtype=None) as rec:
        al.attention(q, k, k, al.Causal())
    s = rec[0].summary
    assert torch.allclose(s["entropy"][0, 0], torch.log(torch.arange(1, 5, dtype=torch.float64)))
    assert torch.allclose(s["distance"][0, 0], torch.tensor([0, 0.5, 1.0, 1.5], dtype=torch.float64))
    assert torch.allclose(s["key_mass"][0, 0], torch.tensor([1 + 1 / 2 + 1 / 3 + 1 / 4, 1 / 2 + 1 / 3 + 1 / 4,
                                                             1 / 3 + 1 / 4, 1 / 4], dtype=torch.float64))
    assert s["visible_keys"][0, 0].tolist() == [1, 2, 3, 4]
    assert torch.allclose(s["max_prob"][0, 0], 1 / torch.arange(1, 5, dtype=torch.float64))


def test_auto_summary_threshold():
    q, k, v = _qkv()
    with capture(max_dense_elements=2 * 4 * 12 * 12 - 1) as rec:
        al.attention(q, k, v)
    assert rec[0].probs is None and rec[0].summary["entropy"].shape == (2, 4, 12)
    with pytest.raises(ValueError, match="summarised|summary"):
        rec.probs(0)
    with capture(max_dense_elements=2 * 4 * 12 * 12) as rec:
        al.attention(q, k, v)
    assert rec[0].probs is not None


def test_summary_on_a_2d_grid_uses_euclidean_distance():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 3, 4, 8, generator=g, dtype=torch.float64) for _ in range(2))
    with capture(summary=True, tile=(5, 7), dtype=None) as rec:
        al.attention(q, k, k)
    p = al.attention_weights(q, k, k).reshape(1, 2, 12, 12)
    ys, xs = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    c = torch.stack([ys.flatten(), xs.flatten()], -1).double()
    d = torch.cdist(c, c)
    assert torch.allclose(rec[0].summary["distance"], (p * d).sum(-1), atol=1e-10)


@pytest.mark.parametrize("kwargs,match", [
    (dict(summary="yes"), "summary"), (dict(summary=1), "summary"), (dict(max_dense_elements=0), "max_dense"),
    (dict(detach=1), "detach"), (dict(tile=(0, 2)), "tile"), (dict(device="nowhere"), "device"),
    (dict(dtype=torch.int64), "dtype"),
])
def test_capture_argument_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        with capture(**kwargs):
            pass
