"""Single-process checks of the pieces under ring_attention: shard/assemble, the chunk-pair
pattern's analytic block layout against its elementwise mask, and the ring schedule."""

from __future__ import annotations

import subprocess
import sys

import torch
from hypothesis import given, settings, strategies as st

import attnlab as al
from attnlab.distributed import RingSchedule, assemble, chunk_visibility, padded_length, shard
from attnlab.distributed.local_pattern import ShardPattern, shift_safe
from attnlab.geometry import Geometry
from attnlab.patterns.layout import Tiling


@settings(max_examples=30, deadline=None)
@given(world=st.integers(1, 5), length=st.integers(1, 40), layout=st.sampled_from(["contiguous", "zigzag"]))
def test_shard_then_assemble_is_the_identity(world, length, layout):
    x = torch.arange(2 * length, dtype=torch.float32).view(1, 2, length, 1)
    shards = [shard(x, rank=r, world_size=world, layout=layout, pad=True) for r in range(world)]
    assert all(s.shape[2] * world == padded_length(length, world, layout) for s in shards)
    assert torch.equal(assemble(shards, layout, seq_len=length), x)


def test_zigzag_gives_each_rank_one_early_and_one_late_chunk():
    x = torch.arange(8).view(1, 1, 8, 1)
    assert shard(x, rank=0, world_size=2, layout="zigzag").flatten().tolist() == [0, 1, 6, 7]
    assert shard(x, rank=1, world_size=2, layout="zigzag").flatten().tolist() == [2, 3, 4, 5]


def _patterns(n):
    ids = torch.arange(n) * 4 // n
    return [
        al.Full(), al.Causal(), al.SlidingWindow(3, 1), al.SlidingWindow(4, 2, dilation=2),
        al.Document(ids), al.PrefixLM(5), al.Sinks(2) | al.SlidingWindow(2), al.GlobalTokens(3),
        al.Strided(3), (al.SlidingWindow(6) | al.Sinks(1)) & al.Document(ids),
        al.MaskMod(lambda b, h, q, k: (q + k) % 4 == 0), al.Neighborhood(kernel_size=5),
    ]


@settings(max_examples=100, deadline=None)
@given(n=st.integers(8, 40), q0=st.integers(0, 39), k0=st.integers(0, 39), cq=st.integers(1, 12),
       ck=st.integers(1, 12), tq=st.integers(1, 6), tk=st.integers(1, 6), which=st.integers(0, 11))
def test_chunk_pair_layout_covers_its_mask(n, q0, k0, cq, ck, tq, tk, which):
    """``any`` covers every visible pair and ``full`` only wholly visible tiles, at global
    positions, with padding past ``n`` invisible."""
    q0, k0 = q0 % n, k0 % n
    g = Geometry(1, 2, 2, (n,), (n,), 4, 4, torch.device("cpu"))
    pattern = _patterns(n)[which]
    sp = ShardPattern(pattern, g, q0, k0)
    local = Geometry(1, 2, 2, (cq,), (ck,), 4, 4, torch.device("cpu"))
    tiling = Tiling(local, (tq,), (tk,))
    layout = sp.block_layout(tiling)
    tq, tk = tiling.q_tile[0], tiling.kv_tile[0]  # tiles never exceed their axis
    qi, ki = torch.arange(cq).view(-1, 1), torch.arange(ck).view(1, -1)
    b, h = torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.arange(2).view(1, 2, 1, 1)
    mask = torch.broadcast_to(sp.mask(b, h, qi.view(1, 1, cq, 1), ki.view(1, 1, 1, ck), local), (1, 2, cq, ck))
    expect = pattern.mask(b, h, (qi + q0).clamp(max=n - 1).view(1, 1, cq, 1),
                          (ki + k0).clamp(max=n - 1).view(1, 1, 1, ck), g)
    valid = ((qi + q0) < n) & ((ki + k0) < n)
    assert torch.equal(mask, torch.broadcast_to(expect, (1, 2, cq, ck)) & valid)
    for a in range(tiling.num_q_tiles):
        for c in range(tiling.num_kv_tiles):
            block = mask[:, :, a * tq:(a + 1) * tq, c * tk:(c + 1) * tk]
            any_ = torch.broadcast_to(layout.any, (1, 2) + layout.any.shape[2:])[:, :, a, c]
            full = torch.broadcast_to(layout.full, (1, 2) + layout.full.shape[2:])[:, :, a, c]
            assert bool((any_ | ~block.flatten(2).any(-1)).all()), (pattern, a, c)
            whole = block.shape[2] == tq and block.shape[3] == tk
            assert bool((~full | (block.flatten(2).all(-1) & whole)).all()), (pattern, a, c)


def test_structured_patterns_use_the_analytic_layout():
    assert shift_safe(al.SlidingWindow(3) | al.Sinks(2))
    assert shift_safe(al.Document(torch.zeros(4, dtype=torch.long)) & al.Causal())
    assert not shift_safe(al.MaskMod(lambda b, h, q, k: q >= k))


def _schedule(pattern, world, n, layout="contiguous"):
    g = Geometry(1, 1, 1, (n,), (n,), 4, 4, torch.device("cpu"))
    per = 2 if layout == "zigzag" else 1
    c = n // (world * per)
    return RingSchedule(chunk_visibility(pattern, g, world, layout, c, c), world, layout)


def test_sliding_window_only_talks_to_neighbours():
    s = _schedule(al.SlidingWindow(5), 8, 64)
    assert s.steps == (0, 1)
    assert [s.source(r, 1) for r in range(8)] == [None, 0, 1, 2, 3, 4, 5, 6]
    assert all(s.shards_sent(r) == (r < 7) for r in range(8))
    both = _schedule(al.SlidingWindow(5, 5), 8, 64)
    assert both.steps == (0, 1, 7)


def test_causal_schedules_and_balance():
    s = _schedule(al.Causal(), 4, 32)
    assert s.steps == (0, 1, 2, 3)
    assert [s.pairs_computed(r) for r in range(4)] == [1, 2, 3, 4]
    z = _schedule(al.Causal(), 4, 32, "zigzag")
    assert len({z.pairs_computed(r) for r in range(4)}) == 1
    full = _schedule(al.Full(), 4, 32)
    assert all(full.shards_received(r) == 3 for r in range(4))


def test_import_attnlab_does_not_import_distributed():
    code = "import sys, attnlab; print('attnlab.distributed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
