"""Sink scores, secondary sinks, massive activations and the retrieval-head score."""

from __future__ import annotations

import pytest
import torch

import attnlab as al
from attnlab.inspect import capture
from attnlab.inspect.metrics_retrieval import copy_targets, retrieval_score
from attnlab.inspect.metrics_sinks import (
    key_attention, massive_activations, secondary_sinks, sink_alignment, sink_score,
)

L = 6


def _maps() -> torch.Tensor:
    sink = torch.zeros(L, L, dtype=torch.float64)
    sink[:, 0] = 1
    uniform = torch.full((L, L), 1 / L, dtype=torch.float64)
    second = torch.zeros(L, L, dtype=torch.float64)  # 70% on the first token, 30% on token 3
    second[:, 0], second[:, 3] = 0.7, 0.3
    return torch.stack([sink, uniform, second, torch.eye(L, dtype=torch.float64)])[None]  # (1, 4, L, L)


def test_sink_scores():
    p = _maps()
    torch.testing.assert_close(sink_score(p), torch.tensor([[1.0, 1 / L, 0.7, 1 / L]], dtype=torch.float64))
    torch.testing.assert_close(sink_score(p, [0, 3]), torch.tensor([[1.0, 2 / L, 1.0, 2 / L]], dtype=torch.float64))
    a = key_attention(p)
    assert a.shape == (1, 4, L)
    torch.testing.assert_close(a.sum(-1), torch.ones(1, 4, dtype=torch.float64))


def test_secondary_sinks():
    scores, idx = secondary_sinks(_maps(), k=2)
    assert scores.shape == idx.shape == (1, 4, 2) and idx.dtype == torch.int64
    assert idx[0, 2].tolist() == [3, 1] and scores[0, 2, 0].item() == pytest.approx(0.3)
    assert scores[0, 0].tolist() == [0.0, 0.0]  # a pure first-token sink has no secondary sink
    assert idx[0, 1].tolist() == [1, 2]  # ties: the earlier key
    s_all, i_all = secondary_sinks(_maps(), exclude=[])
    assert i_all[0, 2, 0].item() == 0 and s_all[0, 2, 0].item() == pytest.approx(0.7)
    with pytest.raises(ValueError, match="k=6"):
        secondary_sinks(_maps(), k=6)


def test_sink_score_from_a_summary_and_with_empty_rows():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64) for _ in range(3))
    pattern = al.Causal()
    with capture(summary=False, dtype=None) as dense, capture(summary=True, dtype=None, tile=(5, 3)) as summ:
        al.attention(q, k, v, pattern=pattern)
    torch.testing.assert_close(sink_score(summ[0].summary), sink_score(dense[0].probs))
    torch.testing.assert_close(key_attention(summ[0].summary), key_attention(dense[0].probs))
    with pytest.raises(ValueError, match="query_mask"):
        key_attention(summ[0].summary, query_mask=torch.ones(16, dtype=torch.bool))
    p = _maps().clone()
    p[..., 2, :] = 0  # query 2 sees nothing: not counted
    torch.testing.assert_close(sink_score(p)[0, 0], torch.tensor(1.0, dtype=torch.float64))


def test_massive_activations():
    torch.manual_seed(0)
    h = torch.randn(2, 10, 64) * 0.5
    h[0, 0, 7] = 2000.0
    h[1, 4, 11] = -900.0
    h[1, 5, 3] = 60.0  # large but below the magnitude threshold
    m = massive_activations(h)
    assert m.tokens() == [(0, 0), (1, 4)]
    assert m.feature[0, 0].item() == 7 and m.feature[1, 4].item() == 11
    assert m.magnitude[1, 4].item() == 900.0
    torch.testing.assert_close(m.ratio[0, 0], 2000.0 / h[0].abs().median())
    assert massive_activations(h, min_magnitude=50, min_ratio=10).tokens() == [(0, 0), (1, 4), (1, 5)]


def test_sink_alignment():
    h = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    torch.testing.assert_close(sink_alignment(h), torch.tensor([1.0, 1.0, 0.0, -1.0]))
    with pytest.raises(ValueError, match="sink=4"):
        sink_alignment(h, 4)


def test_copy_targets():
    t = copy_targets(10, source=1, copy=6, span=3)
    assert t.tolist() == [-1, -1, -1, -1, -1, 1, 2, 3, -1, -1]
    assert copy_targets(10, 1, 6, 3, predict_next=False).tolist() == [-1] * 6 + [1, 2, 3, -1]
    with pytest.raises(ValueError, match="source"):
        copy_targets(10, source=4, copy=6, span=3)


def test_retrieval_score_on_a_constructed_copy_case():
    # tokens: a b c d | x | b c d ; the copy of "b c d" (source 1..3) starts at 5
    T = 8
    targets = copy_targets(T, source=1, copy=5, span=3)  # queries 4, 5, 6 copy keys 1, 2, 3
    causal = torch.tril(torch.ones(T, T, dtype=torch.float64))
    base = causal / causal.sum(-1, keepdim=True)
    retrieval, induction, previous, uniform = (base.clone() for _ in range(4))
    for i, j in ((4, 1), (5, 2), (6, 3)):
        retrieval[i] = 0
        retrieval[i, j], retrieval[i, i] = 0.6, 0.4  # top attention on the copied token
        induction[i] = 0
        induction[i, j - 1], induction[i, j] = 0.6, 0.4  # top on the token before it: misses (top-2 hits)
        previous[i] = 0
        previous[i, i - 1] = 1.0
    half = retrieval.clone()
    half[6] = 0
    half[6, 6] = 1.0  # copies 2 of the 3 tokens
    p = torch.stack([retrieval, induction, previous, uniform, half])[None]
    score = retrieval_score(p, targets)
    torch.testing.assert_close(score, torch.tensor([[1.0, 0.0, 0.0, 0.0, 2 / 3]], dtype=torch.float64))
    torch.testing.assert_close(retrieval_score(p, targets, top_k=2)[0, 1], torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="targets holds"):
        retrieval_score(p, torch.full((T,), T, dtype=torch.int64))
    with pytest.raises(TypeError, match="targets"):
        retrieval_score(p, targets.float())
