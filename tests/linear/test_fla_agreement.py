"""Agreement with flash-linear-attention's reference code (fla/ops/*/naive.py), when installed.

fla's layouts are heads-last ``(B, T, H, D)`` except ``naive_retention`` (heads-first); its
queries are scaled by ``D ** -0.5``, as attnlab's default for identity features."""

from __future__ import annotations

import warnings

import pytest
import torch

from attnlab.linear import linear_attention, retnet_decay

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fla_linear = pytest.importorskip("fla.ops.linear_attn.naive")
    fla_retention = pytest.importorskip("fla.ops.retention.naive")
    fla_gla = pytest.importorskip("fla.ops.gla.naive")


def _inputs(B=2, H=3, T=37, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g) for _ in range(3)]


def _heads_last(*xs):
    return [x.transpose(1, 2).contiguous() for x in xs]


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_attention_matches_fla_naive(normalize):
    q, k, v = _inputs()
    if normalize:  # fla normalises with raw features: keep the denominator away from zero
        q, k = q.abs() + 0.1, k.abs() + 0.1
    ours, state = linear_attention(q, k, v, feature_map="identity", causal=True, normalize=normalize,
                                   chunk_size=16, return_state=True)
    theirs, S = fla_linear.naive_recurrent_linear_attn(*_heads_last(q, k, v), output_final_state=True,
                                                       normalize=normalize)
    torch.testing.assert_close(ours, theirs.transpose(1, 2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.S, S[0] if isinstance(S, tuple) else S, rtol=1e-4, atol=1e-4)


def test_retention_matches_fla_naive():
    q, k, v = _inputs(H=4)
    ours = linear_attention(q, k, v, feature_map="identity", causal=True, normalize=False,
                            decay=retnet_decay(4), chunk_size=8)
    theirs = fla_retention.naive_retention(q, k, v)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_gla_matches_fla_naive():
    q, k, v = _inputs()
    g = torch.Generator().manual_seed(1)
    log_gate = torch.nn.functional.logsigmoid(torch.randn(q.shape, generator=g)) / 16
    ours, state = linear_attention(q, k, v, feature_map="identity", causal=True, normalize=False,
                                   gate=log_gate.exp(), chunk_size=16, return_state=True)
    theirs, h = fla_gla.naive_recurrent_gla(*_heads_last(q, k, v, log_gate), output_final_state=True)
    torch.testing.assert_close(ours, theirs.transpose(1, 2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.S, h, rtol=1e-4, atol=1e-4)
