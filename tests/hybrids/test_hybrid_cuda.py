"""The hybrid fast paths and modules on CUDA (float32) against the float64 CPU reference,
forward and backward (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from attnlab.hybrids import (
    CombinerAttention, CoreContextAwareAttention, HiLoAttention, LandmarkAttention, NativeSparseAttention,
    hybrid_mechanisms,
)
from attnlab.testing import rel_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ROWS = hybrid_mechanisms()


@pytest.mark.parametrize("mech", ROWS, ids=[m.name for m in ROWS])
def test_operator_on_cuda_matches_float64_reference(mech):
    L, H, D = 200, 4, 32
    g = torch.Generator().manual_seed(0)
    cpu = [torch.randn(2, H, L, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    gpu = [x.detach().to("cuda", torch.float32).requires_grad_() for x in cpu]
    op = mech.operator(L, L, H, D, mech.causal)
    ref, out = op.reference(*cpu), op.fast(*gpu)
    assert out.device.type == "cuda" and rel_error(out.cpu(), ref) < 1e-4
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    gr = torch.autograd.grad(ref, cpu, go)
    gf = torch.autograd.grad(out, gpu, go.to("cuda", torch.float32))
    for a, b in zip(gf, gr):
        assert rel_error(a.cpu(), b, floor=1.0) < 1e-3


MODULES = {
    "nsa": lambda: NativeSparseAttention(64, 4, block_size=16, num_selected=4, window=32, num_kv_heads=2),
    "hilo": lambda: HiLoAttention(64, 4, window=2),
    "combiner": lambda: CombinerAttention(64, 4, region_size=12),
    "cca": lambda: CoreContextAwareAttention(64, 4, group_size=8, local_window=32),
    "landmark": lambda: LandmarkAttention(64, 4, block_size=15, top_k=3),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_module_on_cuda_matches_float64_reference(name):
    torch.manual_seed(0)
    m64 = MODULES[name]().double()
    m32 = MODULES[name]().cuda()
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    x = torch.randn(2, 144, 64, dtype=torch.float64)
    if name == "hilo":
        x = x.view(2, 12, 12, 64)
    if name == "landmark":  # run on the sequence with each layer's landmark inserted
        ref = m64(m64.insert(x), reference=True)
        out = m32(m32.insert(x.to("cuda", torch.float32)))
    else:
        ref = m64(x, reference=True)
        out = m32(x.to("cuda", torch.float32))
    assert rel_error(out.cpu(), ref) < 1e-4
    out.square().mean().backward()
    ref.square().mean().backward()
    for (n, p32), p64 in zip(m32.named_parameters(), m64.parameters()):
        assert p32.grad is not None and p64.grad is not None, n
        assert rel_error(p32.grad.cpu(), p64.grad, floor=1.0) < 1e-3, n
