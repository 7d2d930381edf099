"""Talking-heads attention: the lifted single-attention fast path against the dense mixing."""

from __future__ import annotations

import pytest
import torch

import attnlab as al
from attnlab.testing import MaxNumel
from attnlab.variants import talking_heads_attention, talking_heads_attention_reference
from variant_checks import check_close, qkv


def _mix(Hq, Hl, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(Hq, Hl, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(Hl, Hq, generator=g, dtype=torch.float64).requires_grad_()
    return a, b


@pytest.mark.parametrize("backend", ["tiled", "reference", "auto"])
@pytest.mark.parametrize("pattern", [None, al.Causal(), al.SlidingWindow(left=2, right=2) | al.Sinks(1)], ids=repr)
@pytest.mark.parametrize("Hl", [4, 3, 6])
def test_matches_reference(pattern, backend, Hl):
    q, k, v = qkv()  # GQA, L != S, causal empty rows
    a, b = _mix(4, Hl)
    out = talking_heads_attention(q, k, v, a, b, pattern, backend=backend)
    ref = talking_heads_attention_reference(q, k, v, a, b, pattern)
    check_close(out, ref, (q, k, v, a, b), msg=f"{pattern} {backend} Hl={Hl}")


def test_identity_mixing_is_plain_attention_and_permutations_permute():
    q, k, v = qkv(L=17, S=17, Hkv=4)
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(talking_heads_attention(q, k, v, eye, eye, al.Causal()),
                               al.attention(q, k, v, al.Causal()))
    perm = torch.tensor([2, 0, 3, 1])
    P = eye[:, perm]  # logit head h' reads query head perm[h']
    out = talking_heads_attention(q, k, v, P, eye, al.Causal())
    # head h' attends with q[perm[h']] . k[perm[h']] but sends its weights to value head h'
    w = al.attention_weights(q[:, perm], k[:, perm], v, al.Causal())
    torch.testing.assert_close(out, w @ v)


def test_two_dimensional_tokens():
    q, k, v = qkv(Hq=2, Hkv=1, tokens=(4, 5))
    a, b = _mix(2, 2)
    p = al.Neighborhood(kernel_size=(3, 3))
    check_close(talking_heads_attention(q, k, v, a, b, p), talking_heads_attention_reference(q, k, v, a, b, p),
                (q, k, v, a, b), msg="2-D")


def test_tiled_path_never_forms_an_l_by_s_tensor():
    q, k, v = (torch.randn(1, 2, 1024, 8) for _ in range(3))
    a, b = torch.randn(2, 2), torch.randn(2, 2)
    with MaxNumel() as probe:
        talking_heads_attention(q, k, v, a, b, al.SlidingWindow(left=32, right=0), backend="tiled")
    assert probe.max_numel < 1024 * 1024 // 4


def test_bad_inputs():
    q, k, v = qkv()
    a, b = _mix(4, 3)
    with pytest.raises(ValueError, match=r"weights_mix must have shape \(3, 4\)"):
        talking_heads_attention(q, k, v, a, a)
    with pytest.raises(ValueError, match=r"logits_mix must have shape \(4, 3\)"):
        talking_heads_attention(q, k, v, a[:2], b)
    with pytest.raises(ValueError, match="logits_mix must be a tensor of shape"):
        talking_heads_attention(q, k, v, a[0], b)
    with pytest.raises(TypeError, match="weights_mix must be a torch.Tensor"):
        talking_heads_attention(q, k, v, a, [[1.0]])
