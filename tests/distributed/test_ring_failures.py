"""Bad inputs give ValueError/TypeError naming the argument on every rank (never a hang); a
rank that dies or stops answering makes the others fail fast with PeerFailure."""

from __future__ import annotations

import os
import time

import pytest
import torch

import attnlab as al
from attnlab.distributed import PeerFailure, ring_attention, ring_linear_attention, shard
from _ring_harness import expect_ok, run_world


def _qkv(L, Hq=2, Hkv=2, D=4):
    return (torch.randn(1, Hq, L, D), torch.randn(1, Hkv, L, D), torch.randn(1, Hkv, L, D))


def _error_of(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _bad_inputs(rank: int, world: int) -> dict:
    out = {}
    q, k, v = _qkv(6)
    # shapes differing across ranks: every rank must get the same ValueError
    ql = q if rank == 0 else q[:, :, :4]
    out["lengths differ"] = _error_of(lambda: ring_attention(ql, k[:, :, :ql.shape[2]],
                                                             v[:, :, :ql.shape[2]], timeout=10))
    out["odd zigzag"] = _error_of(lambda: ring_attention(*_qkv(5), layout="zigzag", timeout=10))
    out["bad layout"] = _error_of(lambda: ring_attention(q, k, v, layout="striped"))
    out["2-D tokens"] = _error_of(lambda: ring_attention(q.view(1, 2, 2, 3, 4), k.view(1, 2, 2, 3, 4),
                                                         v.view(1, 2, 2, 3, 4)))
    out["content pattern"] = _error_of(lambda: ring_attention(q, k, v, pattern=al.TopKBlocks(1, 2)))
    out["seq_len too long"] = _error_of(lambda: ring_attention(q, k, v, seq_len=6 * world + 1))
    out["timeout"] = _error_of(lambda: ring_attention(q, k, v, timeout=-1))
    out["gqa heads"] = _error_of(lambda: ring_attention(*_qkv(6, Hq=3, Hkv=2)))
    out["linear noncausal padding"] = _error_of(
        lambda: ring_linear_attention(q, k, v, causal=False, seq_len=6 * world - 1))
    # after all those, the group still works
    out["still works"] = tuple(ring_attention(q, k, v, timeout=10).shape)
    return out


def test_bad_inputs_raise_clear_errors_on_every_rank():
    per_rank = expect_ok(run_world(2, _bad_inputs, deadline_s=60))
    for res in per_rank:
        assert res["lengths differ"].startswith("ValueError") and "local query length" in res["lengths differ"]
        assert "rank 0: 6, rank 1: 4" in res["lengths differ"]
        assert "q.shape[2]=5" in res["odd zigzag"]
        assert "layout='striped'" in res["bad layout"]
        assert "(B, H, L, D)" in res["2-D tokens"] and "q.shape=(1, 2, 2, 3, 4)" in res["2-D tokens"]
        assert "static pattern" in res["content pattern"]
        assert "seq_len=13" in res["seq_len too long"]
        assert "timeout=-1" in res["timeout"]
        assert "k.shape[1]=2" in res["gqa heads"]
        assert "seq_len=11" in res["linear noncausal padding"]
        assert res["still works"] == (1, 2, 6, 4)
    assert per_rank[0]["lengths differ"] == per_rank[1]["lengths differ"]


def test_not_initialised_and_indivisible_lengths_are_value_errors():
    q, k, v = _qkv(8)
    with pytest.raises(ValueError, match="init_process_group"):
        ring_attention(q, k, v)
    with pytest.raises(ValueError, match="init_process_group"):
        shard(q, layout="zigzag")
    with pytest.raises(ValueError, match=r"x.shape\[2\]=8 is not divisible by 6.*pad=True"):
        shard(q, rank=0, world_size=3, layout="zigzag")
    with pytest.raises(ValueError, match="rank=3 must be < world_size=3"):
        shard(q, rank=3, world_size=3)


def _dies(rank: int, world: int) -> str:
    q, k, v = _qkv(6)
    ring_attention(q, k, v, timeout=10)  # one call that works
    if rank == 1:
        os._exit(3)  # dies without leaving the group
    t0 = time.monotonic()
    try:
        ring_attention(q, k, v, timeout=10)
    except PeerFailure as e:
        return f"PeerFailure after {time.monotonic() - t0:.1f}s: {e}"
    return "no error"


def _hangs(rank: int, world: int) -> str:
    q, k, v = _qkv(6)
    if rank == 1:
        time.sleep(2)  # alive but never calls
        return "slept"
    try:
        ring_attention(q, k, v, timeout=1.0)
    except PeerFailure as e:
        return f"PeerFailure: {e}"
    return "no error"


def test_a_dead_rank_makes_the_others_fail_fast():
    results = run_world(2, _dies, deadline_s=40)
    status, value = results[0]
    assert status == "ok", value
    assert value.startswith("PeerFailure"), value
    assert "rank 0 of 2" in value and "Another rank has most likely failed" in value
    assert results[1][0] == "missing"


def test_a_silent_rank_times_out_with_a_clear_error():
    results = run_world(2, _hangs, deadline_s=40)
    status, value = results[0]
    assert status == "ok", value
    assert value.startswith("PeerFailure") and "bounded by 1 s" in value, value
