"""Tiny transformers for the quality suite, with :func:`attnlab.attention` as their attention.

:class:`TinyTransformer` is the pre-norm ("pre-LN") variant of the Transformer of Vaswani et
al., "Attention Is All You Need" (2017): token embedding, optionally plus learned absolute
position embeddings, ``layers`` blocks ``x + Attn(LN(x))``, ``x + MLP(LN(x))``, a final
LayerNorm and a linear head. The attention of every block is ``attnlab.attention(q, k, v,
pattern, score_mod)``, so a sparsity pattern (``Causal()``, ``SlidingWindow(8)``,
``Neighborhood((3, 3))``, ...) or a score mod (``ALiBi``, ``RelativeBias``, or the learned
query-dependent relative embeddings of Huang et al., "Music Transformer: Generating Music
with Long-Term Structure" (2018), :class:`attnlab.scores.RelativeEmbedding`) is all that
distinguishes two models of the same size.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .._checks import check_int
from ..api import attention


class Block(nn.Module):
    """One pre-norm block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))`` (GELU, 4x wide).

    ``score_mod`` may be an ``nn.Module`` (``ALiBi``, ``RelativeEmbedding``, ...): assigned
    as an attribute, it is a registered submodule, so its parameters train with the block.
    ``grid`` (a token shape such as ``(8, 8)``) reshapes q/k/v to ``(B, H, *grid, D)`` before
    the attention call, for patterns defined on several token axes.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        pattern: Any = None,
        score_mod: Any = None,
        grid: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.pattern = pattern
        self.score_mod = score_mod
        self.grid = grid
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention of ``x`` ``(B, L, E)``; returns ``(B, L, E)``."""
        b, n, e = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        tokens = self.grid if self.grid is not None else (n,)
        q, k, v = (t.reshape(b, self.heads, *tokens, e // self.heads) for t in (q, k, v))
        out = attention(q, k, v, self.pattern, self.score_mod)
        return self.proj(out.reshape(b, self.heads, n, e // self.heads).transpose(1, 2).reshape(b, n, e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """A small pre-norm transformer ("Attention Is All You Need", 2017) on attnlab attention.

    No dropout; the MLP is 4x wide with GELU. The same class serves causal language models
    (pass ``pattern=Causal()`` or a causal window) and bidirectional classifiers.

    Args:
        vocab_size: number of input token ids.
        max_len: sequence length ``L`` (size of the absolute position table; with ``grid``
            it must equal the product of ``grid``).
        dim, heads, layers: width ``E`` (a multiple of ``heads``), heads, number of blocks.
        num_classes: ``None`` for per-position logits ``(B, L, vocab_size)`` (language
            modelling); an int for classification: the final states are mean-pooled over
            the tokens and the head gives ``(B, num_classes)``.
        pattern: the attention pattern of every block (patterns hold no parameters).
        make_score_mod: ``None``, or a zero-argument callable returning a score mod; it is
            called once per block, so a learned one (``RelativeEmbedding``, as in "Music
            Transformer: Generating Music with Long-Term Structure", 2018) has its own
            parameters in every layer, registered in this model.
        absolute_positions: add learned absolute position embeddings (``L x E``, drawn from
            ``N(0, 1)`` like the token embeddings).
        grid: token shape of the sequence, e.g. ``(8, 8)``: the ``L`` tokens are read in
            row-major order and attention sees q/k/v of shape ``(B, H, 8, 8, D)``.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        *,
        dim: int = 64,
        heads: int = 4,
        layers: int = 2,
        num_classes: int | None = None,
        pattern: Any = None,
        make_score_mod: Callable[[], Any] | None = None,
        absolute_positions: bool = True,
        grid: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        check_int("vocab_size", vocab_size, 1)
        check_int("max_len", max_len, 1)
        check_int("heads", heads, 1)
        check_int("layers", layers, 1)
        if check_int("dim", dim, 1) % heads:
            raise ValueError(f"dim must be a multiple of heads={heads}, got dim={dim}")
        if num_classes is not None:
            check_int("num_classes", num_classes, 2)
        if isinstance(make_score_mod, nn.Module) or not (make_score_mod is None or callable(make_score_mod)):
            raise TypeError(
                "make_score_mod must be None or a zero-argument factory such as "
                f"`lambda: ALiBi(heads)`, got make_score_mod={make_score_mod!r}"
            )
        if grid is not None:
            grid = tuple(grid)
            if math.prod(grid) != max_len:
                raise ValueError(f"grid={grid} has {math.prod(grid)} tokens, expected max_len={max_len}")
        self.max_len, self.num_classes, self.grid = max_len, num_classes, grid
        self.embed = nn.Embedding(vocab_size, dim)
        # Token embeddings keep torch's N(0, 1) init and positions are drawn on the same scale:
        # with GPT-style std 0.02 for both, the quality suite's small models stayed on MQAR's
        # plateau (accuracy ~1 / num_kv_pairs) for all the steps the quick preset can afford.
        self.pos = nn.Parameter(torch.randn(max_len, dim)) if absolute_positions else None
        self.blocks = nn.ModuleList(
            Block(dim, heads, pattern, make_score_mod() if make_score_mod else None, grid)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes if num_classes is not None else vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``(B, L)`` int64 -> ``(B, L, vocab_size)`` or ``(B, num_classes)``."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, L), got shape {tuple(tokens.shape)}")
        n = tokens.shape[1]
        if n > self.max_len or (self.grid is not None and n != self.max_len):
            raise ValueError(f"tokens have length {n}, the model was built for max_len={self.max_len}")
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos[:n]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.num_classes is not None:
            x = x.mean(dim=1)
        return self.head(x)
