"""Per-head metrics on hand-built maps with known answers, dense against summary."""

from __future__ import annotations

import math

import pytest
import torch

import attnlab as al
from attnlab.inspect import capture
from attnlab.inspect.metrics import (
    cross_layer_similarity, head_entropy, head_max_prob, mean_attention_distance, token_distances,
)

L = 6


def sink_head(L: int = L, dtype=torch.float64) -> torch.Tensor:
    p = torch.zeros(L, L, dtype=dtype)
    p[:, 0] = 1
    return p


def diagonal_head(L: int = L, dtype=torch.float64) -> torch.Tensor:
    return torch.eye(L, dtype=dtype)


def uniform_head(L: int = L, dtype=torch.float64) -> torch.Tensor:
    return torch.full((L, L), 1.0 / L, dtype=dtype)


def causal_uniform_head(L: int = L, dtype=torch.float64) -> torch.Tensor:
    p = torch.tril(torch.ones(L, L, dtype=dtype))
    return p / p.sum(-1, keepdim=True)


def three_heads(dtype=torch.float64) -> torch.Tensor:
    return torch.stack([sink_head(dtype=dtype), diagonal_head(dtype=dtype), uniform_head(dtype=dtype)])[None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entropy_of_sink_diagonal_uniform(dtype):
    p = three_heads(dtype)
    ent = head_entropy(p)
    assert ent.shape == (1, 3) and ent.dtype == dtype
    torch.testing.assert_close(ent, torch.tensor([[0.0, 0.0, math.log(L)]], dtype=dtype))
    torch.testing.assert_close(head_entropy(p, normalize=True), torch.tensor([[0.0, 0.0, 1.0]], dtype=dtype))


def test_entropy_normalised_by_visible_keys_of_a_causal_head():
    p = causal_uniform_head()[None, None]
    visible = torch.tril(torch.ones(L, L, dtype=torch.bool))
    # query i sees i + 1 keys uniformly: entropy log(i + 1); normalised 1 except query 0 (one key -> 0)
    torch.testing.assert_close(head_entropy(p), torch.tensor([[sum(math.log(i + 1) for i in range(L)) / L]],
                                                             dtype=torch.float64))
    torch.testing.assert_close(head_entropy(p, visible=visible, normalize=True),
                               torch.tensor([[(L - 1) / L]], dtype=torch.float64))


def test_query_mask_and_empty_rows_are_left_out_of_the_mean():
    p = uniform_head()[None, None].clone()
    p[..., 0, :] = torch.tensor([1.0, 0, 0, 0, 0, 0])  # query 0: entropy 0
    p[..., 1, :] = 0  # query 1 sees no key: never counted
    ent_all = head_entropy(p)
    torch.testing.assert_close(ent_all, torch.tensor([[4 * math.log(L) / 5]], dtype=torch.float64))
    qm = torch.tensor([False, True, True, True, True, True])
    torch.testing.assert_close(head_entropy(p, query_mask=qm), torch.tensor([[math.log(L)]], dtype=torch.float64))
    nothing = torch.zeros(L, dtype=torch.bool)
    assert head_entropy(p, query_mask=nothing).item() == 0.0


def test_mean_attention_distance():
    p = three_heads()
    d = mean_attention_distance(p)
    expected_sink = sum(range(L)) / L  # query i attends to key 0: distance i
    expected_uniform = sum(abs(i - j) for i in range(L) for j in range(L)) / L**2
    torch.testing.assert_close(d, torch.tensor([[expected_sink, 0.0, expected_uniform]], dtype=torch.float64))


def test_distance_bottom_right_aligned_and_on_a_grid():
    # 2 queries over 5 keys, each query attends to its aligned key i + S - L: distance 0
    p = torch.zeros(1, 1, 2, 5, dtype=torch.float64)
    p[..., 0, 3] = 1
    p[..., 1, 4] = 1
    assert mean_attention_distance(p).item() == 0.0
    d = token_distances(4, 4, (2, 2), dtype=torch.float64)
    assert d[0, 3].item() == pytest.approx(math.sqrt(2)) and d[0, 1].item() == 1.0 and d[1, 2].item() == pytest.approx(
        math.sqrt(2))


def test_max_prob():
    torch.testing.assert_close(head_max_prob(three_heads()), torch.tensor([[1.0, 1.0, 1 / L]], dtype=torch.float64))


def test_metrics_from_a_summary_equal_the_dense_map():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 20, 8, dtype=torch.float64) for _ in range(3))
    pattern = al.SlidingWindow(left=4, right=2)
    with capture(summary=False, dtype=None) as dense:
        al.attention(q, k, v, pattern=pattern)
    with capture(summary=True, dtype=None, tile=(7, 6)) as summ:
        al.attention(q, k, v, pattern=pattern)
    p, s = dense[0].probs, summ[0].summary
    qm = torch.rand(2, 1, 20) > 0.3
    for fn in (head_entropy, mean_attention_distance, head_max_prob):
        torch.testing.assert_close(fn(s), fn(p))
        torch.testing.assert_close(fn(s, query_mask=qm), fn(p, query_mask=qm))
    i = torch.arange(20)[:, None]
    j = torch.arange(20)[None, :]
    visible = (j >= i - 4) & (j <= i + 2)
    torch.testing.assert_close(head_entropy(s, normalize=True), head_entropy(p, visible=visible, normalize=True))


def test_cross_layer_similarity():
    sink, diag, unif = sink_head(), diagonal_head(), uniform_head()
    stack = torch.stack([sink, sink, diag])[:, None, None]  # (layers=3, B=1, H=1, L, L)
    for measure in ("cosine", "jsd"):
        sim = cross_layer_similarity(stack, measure=measure)
        assert sim.shape == (1, 3, 3)
        torch.testing.assert_close(sim.diagonal(dim1=-2, dim2=-1), torch.ones(1, 3, dtype=torch.float64))
        assert sim[0, 0, 1].item() == pytest.approx(1.0)
        torch.testing.assert_close(sim, sim.transpose(-1, -2))
    # sink vs diagonal: cosine = <e0 rows, e_i rows> / (sqrt(L) sqrt(L)) = 1 / L; jsd: row 0 identical, others 0
    assert cross_layer_similarity(stack)[0, 0, 2].item() == pytest.approx(1 / L)
    assert cross_layer_similarity(stack, measure="jsd")[0, 0, 2].item() == pytest.approx(1 / L)
    # per head: (B, H, layers, layers); layer 0 = [sink, unif], layer 1 = [sink, diag]
    two = torch.stack([torch.stack([sink, unif]), torch.stack([sink, diag])])[:, None]
    ph = cross_layer_similarity([two[0], two[1]], per_head=True)
    assert ph.shape == (1, 2, 2, 2)
    assert ph[0, 0, 0, 1].item() == pytest.approx(1.0)
    assert ph[0, 1, 0, 1].item() == pytest.approx(1 / math.sqrt(L))  # uniform vs diagonal


def test_metric_on_the_implicit_attention_of_a_linear_recurrence():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 12, 4, dtype=torch.float64) for _ in range(3))
    w = al.linear_attention_weights(q, k, v, feature_map="elu+1", causal=True)
    ent = head_entropy(w)  # unchanged metric: rows of the implicit map are distributions
    upper = sum(math.log(i + 1) for i in range(12)) / 12  # causal: at most log(i + 1) per query
    assert ent.shape == (1, 2) and bool((ent > 0).all()) and bool((ent < upper).all())
    # every key equal: the implicit causal map is uniform over keys 0..i, entropy log(i + 1)
    same = k[:, :, :1].expand_as(k)
    w = al.linear_attention_weights(q, same, v, feature_map="elu+1", causal=True)
    torch.testing.assert_close(head_entropy(w), torch.full((1, 2), upper, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean_attention_distance(w), torch.full((1, 2), sum(i / 2 for i in range(12)) / 12,
                                                                      dtype=torch.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, err, text", [
    ([[0.5, 0.5]], TypeError, "expected a torch.Tensor"),
    (torch.ones(2, 2), ValueError, "rank 2"),
    (torch.full((1, 2, 2), 0.4), ValueError, "sums to 0.8"),
    (torch.tensor([[[1.5, -0.5]]]), ValueError, "negative"),
    (torch.ones(1, 1, 1, dtype=torch.int64), TypeError, "floating"),
])
def test_errors_name_the_argument(bad, err, text):
    with pytest.raises(err, match=text):
        head_entropy(bad)


def test_argument_errors():
    p = three_heads()
    with pytest.raises(ValueError, match="query_mask has shape"):
        head_entropy(p, query_mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="query_mask"):
        head_entropy(p, query_mask=torch.ones(L))
    with pytest.raises(ValueError, match="measure"):
        cross_layer_similarity(torch.stack([p, p]), measure="kl")
    with pytest.raises(ValueError, match="different shapes"):
        cross_layer_similarity([p, p[..., :1, :, :]])
    with pytest.raises(ValueError, match="lacks"):
        head_entropy({"entropy": torch.zeros(1, 1, 2)})


def test_metrics_are_exported_from_attnlab_inspect():
    import attnlab.inspect as inspect_pkg
    from attnlab.inspect import importance, metrics_retrieval, metrics_sinks, rollout

    for module in (importance, metrics_retrieval, metrics_sinks, rollout):
        for name in module.__all__:
            assert getattr(inspect_pkg, name) is getattr(module, name), name
    assert inspect_pkg.head_entropy is head_entropy and "head_entropy" in inspect_pkg.__all__
