"""TopKPerQuery / TopTheta / KeySet: the streamed selection equals the top-k of the dense logits,
attention over it is exact, thresholds calibrate, masks and layouts agree; plus the fidelity
function on hand-built cases."""

import pytest
import torch

import attnlab as al
import attnlab.patterns.top_keys as top_keys
from attnlab.fidelity import attention_fidelity
from attnlab.patterns import KeySet, TopKPerQuery, TopTheta, calibrate_thresholds, resolve_pattern
from attnlab.testing import random_qkv, check_pattern_layout, dense_mask, make_geometry

TOL = dict(rtol=1e-9, atol=1e-10)


def _qkv(L=90, **kw):
    return random_qkv(L=L, **kw)


def _dense_logits(q, k):
    G = q.shape[1] // k.shape[1]
    return q @ k.repeat_interleave(G, 1).transpose(-1, -2) / q.shape[-1] ** 0.5


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(top_keys, "CHUNK", 16)


def test_streamed_top_k_is_the_dense_top_k(small_chunks):
    q, k, _ = _qkv(L=70, S=83)
    static = resolve_pattern(TopKPerQuery(9), q, k)
    g = al.geometry.check_qkv(q, k, k)
    want = torch.zeros(2, 4, 70, 83, dtype=torch.bool).scatter_(-1, _dense_logits(q, k).topk(9, -1).indices, True)
    assert torch.equal(dense_mask(static, g), want)


def test_top_k_inside_causal_and_with_a_score_mod_ranks_the_final_visible_logits(small_chunks):
    q, k, _ = _qkv(L=40)
    alibi = al.ALiBi(4)
    static = resolve_pattern(TopKPerQuery(5) & al.Causal(), q, k, score_mod=alibi)
    g = al.geometry.check_qkv(q, k, k)
    i, j = torch.arange(40)[:, None], torch.arange(40)[None, :]
    logits = _dense_logits(q, k) + alibi.slopes.double().view(1, -1, 1, 1) * (j - i)
    logits = logits.masked_fill(j > i, float("-inf"))
    top = logits.topk(5, -1)
    want = torch.zeros(2, 4, 40, 40, dtype=torch.bool).scatter_(-1, top.indices, True) & (j <= i)
    assert torch.equal(dense_mask(static, g), want)


@pytest.mark.parametrize("pattern", [TopKPerQuery(6) & al.Causal(), TopKPerQuery(4) | al.SlidingWindow(3),
                                     TopKPerQuery(90)], ids=repr)
def test_attention_over_the_selection_is_exact(pattern):
    q, k, v = _qkv(grad=True)
    out = al.attention(q, k, v, pattern=pattern)
    ref = al.attention(q, k, v, pattern=resolve_pattern(pattern, q, k), backend="reference")
    torch.testing.assert_close(out, ref, **TOL)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * go).sum(), (q, k, v)),
                    torch.autograd.grad((ref * go).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, **TOL)


def test_k_equal_to_s_is_dense():
    q, k, v = _qkv(L=30, S=45)
    torch.testing.assert_close(al.attention(q, k, v, pattern=TopKPerQuery(45)), al.attention(q, k, v), **TOL)


def test_top_theta_keeps_the_logits_above_each_heads_threshold():
    q, k, v = _qkv(L=60)
    theta = calibrate_thresholds(q, k, keep=10)
    assert theta.shape == (4,)
    static = resolve_pattern(TopTheta(theta, max_keys=60), q, k)
    g = al.geometry.check_qkv(q, k, v)
    want = _dense_logits(q, k) >= theta.double().view(1, -1, 1, 1)
    assert torch.equal(dense_mask(static, g), want)
    kept = want.sum(-1).double()
    assert 7 <= kept.median().item() <= 13  # calibrated to ~10 per row
    out = al.attention(q, k, v, pattern=TopTheta(theta, max_keys=60))
    torch.testing.assert_close(out, al.attention(q, k, v, pattern=static, backend="reference"), **TOL)


def test_top_theta_with_an_unreachable_threshold_gives_empty_rows_not_nan():
    q, k, v = _qkv(L=20)
    out, lse = al.attention(q, k, v, pattern=TopTheta(1e9, max_keys=4), return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()


def test_key_set_mask_and_layout_agree_with_blocks_and_empty_rows():
    g = make_geometry((23,), (31,), batch=2, q_heads=3)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(-1, 31, (2, 3, 23, 4), generator=gen)
    idx[0, 0, 5] = -1  # an empty row
    for pat in (KeySet(idx), KeySet(torch.randint(-1, 4, (1, 3, 23, 2), generator=gen), block=8)):
        pat.validate(g)
        for tiles in ((4, 4), (5, 3), (23, 31), (1, 8)):
            check_pattern_layout(pat, g, *tiles)
    m = dense_mask(KeySet(idx), g)
    assert not m[0, 0, 5].any()
    assert m[1, 2, 7, idx[1, 2, 7][idx[1, 2, 7] >= 0]].all()


@pytest.mark.parametrize("make,exc,match", [
    (lambda: TopKPerQuery(0), ValueError, "k must be an int >= 1"),
    (lambda: TopTheta("x", 4), TypeError, "thresholds must be a float"),
    (lambda: TopTheta(0.5, 0), ValueError, "max_keys"),
    (lambda: KeySet(torch.zeros(2, 3, dtype=torch.long)), ValueError, r"indices must have shape"),
    (lambda: KeySet(torch.zeros(1, 1, 2, 2)), TypeError, "int32/int64"),
])
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_bad_calls():
    q, k, v = _qkv(L=10)
    with pytest.raises(ValueError, match="k=11 is larger than the number of keys S=10"):
        al.attention(q, k, v, pattern=TopKPerQuery(11))
    with pytest.raises(ValueError, match="thresholds must have 1 or Hq=4"):
        al.attention(q, k, v, pattern=TopTheta(torch.zeros(3), 4))
    with pytest.raises(ValueError, match="indices must be < S = 10"):
        al.attention(q, k, v, pattern=KeySet(torch.full((1, 1, 10, 1), 10)))
    with pytest.raises(ValueError, match="keep=11 is larger"):
        calibrate_thresholds(q, k, keep=11)


def test_fidelity_on_known_cases():
    q, k, v = _qkv(L=40)
    full = attention_fidelity(q, k, v, pattern=al.Full())
    assert full["mass_recall"] == pytest.approx(1.0) and full["rel_error"] < 1e-12 and full["density"] == 1.0
    # a sink-only pattern keeps exactly the first key's probability
    res = attention_fidelity(q, k, v, pattern=al.Sinks(1), base=al.Causal())
    p = al.attention_weights(q, k, v, pattern=al.Causal())
    assert res["mass_recall"] == pytest.approx(p[..., 0].mean().item())
    assert res["density"] == pytest.approx(2 * 4 * 40 / (2 * 4 * 40 * 41 / 2))
    assert res["rel_error"] > 0.1
    only = attention_fidelity(q, k, v, output=torch.zeros(2, 4, 40, 8, dtype=torch.float64))
    assert set(only) == {"rel_error"} and only["rel_error"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs a pattern, an output"):
        attention_fidelity(q, k, v)
    with pytest.raises(ValueError, match="over max_elements"):
        attention_fidelity(q, k, v, pattern=al.Full(), max_elements=10)
