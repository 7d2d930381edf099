"""Exact merge of partial attentions computed over disjoint key/value ranges.

If ``o_i, lse_i`` are softmax attention outputs and log-sum-exps over key sets ``S_i``
that partition the keys, attention over all keys is::

    lse = log(sum_i exp(lse_i))
    out = sum_i exp(lse_i - lse) * o_i

This is how split-KV decoding ("Lean Attention: Hardware-Aware Scalable Attention
Mechanism for the Decode-Phase of Transformers", 2024), ring attention and the tiled
backend's long rows combine partial results. A part whose rows saw no key carries
``lse = -inf`` and weight 0; a row that saw no key in any part returns 0 and ``-inf``.
"""

from __future__ import annotations

from typing import Sequence

import torch


def merge_attentions(
    outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attention outputs ``(B, H, *L, Dv)`` by their log-sum-exps ``(B, H, *L)``.

    Differentiable in both outputs and lses. Computed in float32 (float64 if any input is
    float64); the output keeps the dtype of ``outputs[0]``, the lse is float32/float64.
    """
    if len(outputs) != len(lses) or len(outputs) == 0:
        raise ValueError(
            f"merge_attentions needs as many outputs as lses, at least one: got "
            f"len(outputs)={len(outputs)}, len(lses)={len(lses)}"
        )
    for i, (o, l) in enumerate(zip(outputs, lses)):
        if not isinstance(o, torch.Tensor) or not isinstance(l, torch.Tensor):
            raise TypeError(f"outputs[{i}] and lses[{i}] must be tensors")
        if o.shape[:-1] != l.shape or o.shape != outputs[0].shape:
            raise ValueError(
                f"outputs[{i}].shape={tuple(o.shape)} must equal outputs[0].shape="
                f"{tuple(outputs[0].shape)} and lses[{i}].shape={tuple(l.shape)} must be it "
                "without the last axis"
            )
    wide = any(t.dtype == torch.float64 for t in list(outputs) + list(lses))
    cdt = torch.float64 if wide else torch.float32
    stacked = torch.stack([l.to(cdt) for l in lses])
    m = stacked.detach().amax(0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(stacked - m)  # -inf parts -> 0
    total = w.sum(0)
    nonempty = total > 0
    total_safe = torch.where(nonempty, total, torch.ones_like(total))
    out = sum((w[i] / total_safe)[..., None] * o.to(cdt) for i, o in enumerate(outputs))
    lse = torch.where(nonempty, m + torch.log(total_safe), torch.full_like(total, float("-inf")))
    return out.to(outputs[0].dtype), lse
