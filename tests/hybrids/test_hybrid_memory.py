"""The fast paths never form an L x S tensor, forward or backward (the references do)."""

from __future__ import annotations

import pytest
import torch

from attnlab.hybrids import (
    combiner_attention, core_context_aware_attention, hilo_attention, landmark_attention, native_sparse_attention,
)
from attnlab.testing import MaxNumel

L = 3072
FAST = {
    "nsa": lambda q, k, v: native_sparse_attention(q, k, v, torch.rand(1, 1, L, 3), block_size=64, num_selected=6,
                                                   window=128),
    "hilo": lambda q, k, v: hilo_attention(*(x.view(1, 2, 48, 64, 8) for x in (q, k, v)), window=4,
                                           lo_heads=1),  # one Hi and one Lo head
    "combiner": lambda q, k, v: combiner_attention(q, k, v, region_size=55),
    "cca": lambda q, k, v: core_context_aware_attention(q, k, v, group_size=16, local_window=128),
    "landmark": lambda q, k, v: landmark_attention(q, k, v, block_size=63, top_k=4),
}


@pytest.mark.parametrize("name", list(FAST))
def test_fast_path_working_set_is_below_l_by_s(name):
    g = torch.Generator().manual_seed(0)
    H = 2 if name == "hilo" else 1
    q, k, v = (torch.randn(1, H, L, 8, generator=g).requires_grad_() for _ in range(3))
    with MaxNumel() as probe:
        out = FAST[name](q, k, v)
        out.sum().backward()
    assert probe.max_numel < L * L // 4, probe.max_numel  # the dense logits: L * L
