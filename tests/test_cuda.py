"""Every catalog mechanism on CUDA against the float64 CPU reference (skipped without a GPU).

CI has no GPU; these run on a machine that has one:
``python -m pytest -q tests/test_cuda.py``.
"""

import pytest
import torch

import attnlab as al
from attnlab import registry
from attnlab.api import BackendUnavailable
from attnlab.testing import rel_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

MECHS = [m for m in registry.catalog() if m.kind != "function"]
TOL = {torch.float32: (2e-5, 2e-4), torch.float16: (4e-3, 2e-2), torch.bfloat16: (2e-2, 8e-2)}


def _err(a, b):
    """Relative error floored at 1: gradients that are exactly zero in the reference (one
    visible key per row) make a plain relative error meaningless."""
    return rel_error(a, b, floor=1.0)


def _inputs(shape, dtype, hq=4, hkv=2, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    cpu = [torch.randn(2, h, *shape, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv)]
    return cpu, [x.to("cuda", dtype).requires_grad_() for x in cpu]


def _check(mech, shape, dtype, backend):
    pattern, score_mod = mech.example(shape, 4)
    cpu, gpu = _inputs(shape, dtype)
    if isinstance(score_mod, torch.nn.Module):
        score_mod = score_mod.double()
    cpu = [x.requires_grad_() for x in cpu]
    ref = al.attention(*cpu, pattern, score_mod, backend="reference")
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, cpu, grad)
    if isinstance(score_mod, torch.nn.Module):
        score_mod = score_mod.to("cuda", torch.float32)
    try:
        out = al.attention(*gpu, pattern, score_mod, backend=backend)
    except BackendUnavailable as e:
        pytest.skip(f"{backend} cannot run {mech.name}: {e}")
    grads = torch.autograd.grad(out, gpu, grad.to("cuda", dtype))
    out_tol, grad_tol = TOL[dtype]
    assert out.device.type == "cuda" and out.dtype == dtype
    assert _err(out.cpu(), ref) < out_tol, mech.name
    for g, r in zip(grads, ref_grads):
        assert _err(g.cpu(), r) < grad_tol, mech.name


@pytest.mark.parametrize("backend", ["auto", "tiled", "flex"])
@pytest.mark.parametrize("mech", MECHS, ids=[m.name for m in MECHS])
def test_mechanism_matches_reference_on_cuda(mech, backend):
    _check(mech, (333,), torch.float32, backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["causal", "sliding_window", "neighborhood", "alibi", "document"])
def test_half_precision_on_cuda(name, dtype):
    _check(registry.get(name), (300,), dtype, "auto")


@pytest.mark.parametrize("backend", ["tiled", "flex"])
@pytest.mark.parametrize("shape", [(19, 23), (6, 7, 9)], ids=["2d", "3d"])
def test_multidimensional_neighborhood_on_cuda(shape, backend):
    _check(registry.get("neighborhood"), shape, torch.float32, backend)


def test_empty_rows_on_cuda_are_zero_with_zero_gradients():
    cpu, gpu = _inputs((50,), torch.float32)
    pattern = al.Document(torch.arange(50) // 10, kv_ids=torch.full((50,), 99))
    out = al.attention(*gpu, pattern, backend="tiled")
    out.sum().backward()
    assert out.abs().max() == 0 and all(x.grad.abs().max() == 0 for x in gpu)


@pytest.mark.parametrize("name", ["sliding_window", "neighborhood", "alibi"])
def test_sequences_shorter_than_two_flex_blocks_on_cuda(name):
    q = torch.randn(1, 2, 75, 64, device="cuda")
    pattern, score_mod = registry.get(name).example((75,), 2)
    assert "flex" not in al.explain(q, q, q, pattern, score_mod).backend
    _check(registry.get(name), (75,), torch.float32, "auto")
