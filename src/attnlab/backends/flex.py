"""The flex backend: PyTorch FlexAttention with a BlockMask built from attnlab's layout.

Tokens are put in tile order (box tiles of 128 tokens, so a 2-D neighbourhood's tiles are
compact), the pattern's analytic block layout becomes the ``BlockMask`` (partial and full
blocks, no L x S evaluation), and the pattern's ``mask`` and the score mod are wrapped as
``mask_mod`` / ``score_mod`` that map tile-order indices back to flat token indices.

Runs compiled by default. On CPU it runs only on request (``options={'allow_cpu': True}``)
because it compiles per shape and has no backward there.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..patterns.layout import Tiling
from .base import Backend, Problem
from .tiled import from_tiles, to_tiles

FLEX_BLOCK = 128
_COMPILED = {}


def flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_tile(ndim: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A box of exactly FLEX_BLOCK tokens with power-of-two sides (the compiled kernels need
    block sizes divisible by their BLOCK_M/BLOCK_N), shaped to the grid: the side with the most
    room left doubles first; sides may exceed a short axis (the tile is padded)."""
    room = [1 << max(0, (n - 1).bit_length()) for n in shape]  # next power of two per axis
    tile = [1] * ndim
    while math.prod(tile) < FLEX_BLOCK:
        open_axes = [ax for ax in range(ndim) if tile[ax] < room[ax]]
        ax = max(open_axes, key=lambda a: (room[a] // tile[a], a)) if open_axes else ndim - 1
        tile[ax] *= 2
    return tuple(tile)


RECOMPILE_LIMIT = 256


def _recompile_limit():
    """A context raising Dynamo's per-function recompile limit (default 8) while attnlab calls
    its compiled ``flex_attention``: every pattern, score mod and shape is one more compiled
    entry of that one function, and past the limit Dynamo silently runs it eagerly (dense
    scores, L x S memory)."""
    import contextlib

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if not hasattr(config, name) or getattr(config, name) >= RECOMPILE_LIMIT:
        return contextlib.nullcontext()
    return config.patch({name: RECOMPILE_LIMIT})


def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["fn"]


class FlexBackend(Backend):
    """FlexAttention (compiled) over the pattern's block layout."""

    name = "flex"
    options = ("allow_cpu", "compile")

    def not_supported_reasons(self, problem: Problem) -> list[str]:
        why = []
        if not flex_available():
            why.append(f"flex: torch {torch.__version__} has no torch.nn.attention.flex_attention")
            return why
        if problem.device.type == "cpu":
            if not problem.options.get("allow_cpu", False):
                why.append(
                    "flex: on CPU only on request (options={'allow_cpu': True}): it compiles per shape"
                )
            if problem.requires_grad:
                why.append("flex: FlexAttention has no backward on CPU")
            if problem.return_lse and problem.options.get("compile", True):
                why.append("flex: compiled FlexAttention on CPU cannot return the log-sum-exp")
        elif problem.device.type == "cuda" and min(problem.geometry.q_len, problem.geometry.kv_len) < 2 * FLEX_BLOCK:
            why.append(
                f"flex: on CUDA, sequences shorter than {2 * FLEX_BLOCK} tokens go elsewhere (the compiled "
                "kernels found no configuration for a single block: torch 2.11, H100)"
            )
        elif problem.device.type != "cuda":
            why.append(f"flex: runs on CUDA (and CPU on request), not {problem.device.type}")
        if problem.score_mod is not None and problem.score_mod.needs_query:
            why.append(
                f"flex: {type(problem.score_mod).__name__} needs the query vectors, which a "
                "FlexAttention score_mod cannot see"
            )
        if problem.dtype == torch.float64 and problem.device.type == "cuda":
            why.append("flex: float64 is not supported by the compiled kernels")
        return why

    def run(self, problem: Problem):
        g = problem.geometry
        plan = _cached_flex_plan(problem.pattern, g)
        score_fn = None
        if problem.score_mod is not None:
            inner = problem.score_mod.as_score_mod(g)
            if plan.in_place:
                score_fn = inner
            else:
                q_index, kv_index = plan.q_index, plan.kv_index

                def score_fn(score, b, h, q_idx, kv_idx):
                    return inner(score, b, h, q_index[q_idx].clamp(min=0), kv_index[kv_idx].clamp(min=0))

        tiling = plan.tiling
        if plan.in_place:
            q, k, v = problem.q, problem.k, problem.v
        else:
            q = to_tiles(problem.q, tiling, fold_heads=False).flatten(2, 3)
            k = _kv_tile_order(problem.k, tiling)
            v = _kv_tile_order(problem.v, tiling)
        fn = _flex_fn(problem.options.get("compile", True))
        kwargs = {"enable_gqa": True} if g.q_heads != g.kv_heads else {}
        if problem.return_lse:
            kwargs["return_lse"] = True
        with _recompile_limit():
            res = fn(q, k, v, score_mod=score_fn, block_mask=plan.block_mask, scale=problem.scale, **kwargs)
        out, lse = res if problem.return_lse else (res, None)
        if not plan.in_place:
            nq = tiling.num_q_tiles
            out = from_tiles(out.reshape(g.batch, g.q_heads, nq, tiling.q_tile_size, -1), tiling, False)
            if lse is not None:
                lse = from_tiles(lse.reshape(g.batch, g.q_heads, nq, tiling.q_tile_size), tiling, False)
        if lse is not None:
            lse = lse.to(torch.float64 if problem.dtype == torch.float64 else torch.float32)
        return out.to(problem.dtype), lse


@dataclass
class FlexPlan:
    """The BlockMask of one (pattern, geometry). ``in_place``: tokens stay in their own order
    (1-D: tiles are consecutive tokens and FlexAttention pads the last one itself); otherwise
    inputs are gathered into tile order and ``q_index``/``kv_index`` map back."""

    tiling: Tiling
    block_mask: object
    in_place: bool
    q_index: torch.Tensor
    kv_index: torch.Tensor


_FLEX_PLANS: "OrderedDict[tuple, FlexPlan]" = OrderedDict()
FLEX_PLAN_CACHE_SIZE = 8


def _cached_flex_plan(pattern, g) -> FlexPlan:
    """:func:`_flex_plan`, reused across calls for patterns with a ``cache_key`` (LRU)."""
    key = pattern.cache_key()
    if key is None:
        return _flex_plan(pattern, g)
    key = (key, g)
    plan = _FLEX_PLANS.get(key)
    if plan is None:
        plan = _FLEX_PLANS[key] = _flex_plan(pattern, g)
        while len(_FLEX_PLANS) > FLEX_PLAN_CACHE_SIZE:
            _FLEX_PLANS.popitem(last=False)
    _FLEX_PLANS.move_to_end(key)
    return plan


def _flex_plan(pattern, g) -> FlexPlan:
    from torch.nn.attention.flex_attention import BlockMask

    tiling = Tiling(g, flex_tile(g.ndim, g.q_shape), flex_tile(g.ndim, g.kv_shape))
    q_index = tiling.q_token_index.reshape(-1)
    kv_index = tiling.kv_token_index.reshape(-1)
    # in place when 1-D; not for a sequence shorter than one block (the compiled CUDA kernel
    # finds no configuration for it), which is padded to a whole tile instead
    in_place = (g.ndim == 1 and min(g.q_len, g.kv_len) >= FLEX_BLOCK
                and _takes_seq_lengths(BlockMask))
    if in_place:
        def mask_mod(b, h, q_idx, kv_idx):
            return pattern.mask(b, h, q_idx, kv_idx, g)
        seq = (g.q_len, g.kv_len)
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            qi, ki = q_index[q_idx], kv_index[kv_idx]
            ok = (qi >= 0) & (ki >= 0)
            return ok & pattern.mask(b, h, qi.clamp(min=0), ki.clamp(min=0), g)
        seq = (tiling.num_q_tiles * tiling.q_tile_size, tiling.num_kv_tiles * tiling.kv_tile_size)
    return FlexPlan(tiling, _block_mask(BlockMask, pattern, tiling, mask_mod, seq), in_place, q_index, kv_index)


def clear_flex_plan_cache() -> None:
    """Drop every cached BlockMask."""
    _FLEX_PLANS.clear()


def _kv_tile_order(x: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """Keys/values in key-tile order, padding positions zero: (B, Hkv, nKt * Tk, E)."""
    B, H, E = x.shape[0], x.shape[1], x.shape[-1]
    flat = x.reshape(B, H, -1, E)
    idx = tiling.kv_token_index.reshape(-1)
    out = flat[:, :, idx.clamp(min=0)]
    return out * (idx >= 0).view(1, 1, -1, 1).to(out.dtype)


def _takes_seq_lengths(BlockMask) -> bool:
    """Whether this torch's ``BlockMask.from_kv_blocks`` accepts ``seq_lengths`` (newer ones)."""
    return "seq_lengths" in BlockMask.from_kv_blocks.__code__.co_varnames


def _block_mask(BlockMask, pattern, tiling: Tiling, mask_mod, seq_lengths: tuple[int, int]):
    layout = pattern.block_layout(tiling)
    any_ = layout.any
    full = layout.full & tiling.kv_tile_complete & any_
    partial = any_ & ~full

    def to_lists(m: torch.Tensor):
        m = m.to(torch.int32)
        num = m.sum(-1).to(torch.int32)
        idx = torch.argsort(m, dim=-1, descending=True, stable=True).to(torch.int32)
        return num, idx

    kv_num, kv_idx = to_lists(partial)
    full_num, full_idx = to_lists(full)
    kwargs = dict(BLOCK_SIZE=(tiling.q_tile_size, tiling.kv_tile_size), mask_mod=mask_mod)
    if _takes_seq_lengths(BlockMask):
        kwargs["seq_lengths"] = seq_lengths
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, **kwargs)


__all__ = ["FlexBackend", "clear_flex_plan_cache", "flex_available", "flex_tile"]
