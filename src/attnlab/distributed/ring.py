"""Context-parallel (ring) attention: exact softmax attention over a sequence sharded across
the ranks of a ``torch.distributed`` process group.

Each rank holds a shard of the queries, keys and values. Key/value shards travel between
ranks with point-to-point operations posted before the compute they overlap with; each rank
computes its queries against every shard its pattern needs (the tiled backend on each
(query chunk, key chunk) pair, at global positions) and merges the partial results exactly by
log-sum-exp. Backward recomputes from the global output and log-sum-exp (``P = exp(S -
lse)``, ``delta = rowsum(dO * O)``), and the key/value gradient partials travel back to the
shards' owners.

Li et al., "Sequence Parallelism: Long Sequence Training from System Perspective"
(2021; ACL 2023), ring self-attention; Liu et al., "Ring Attention with Blockwise
Transformers for Near-Infinite Context" (2023), blockwise compute overlapped with the ring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..backends.reference import compute_dtype_for
from ..backends.tiled import flat_kv, from_tiles, plan_work, tiled_backward, tiled_forward, to_tiles
from ..backends.tiled_plan import DEFAULT_CHUNK_ELEMENTS, cached_plan, default_tiles, tile_count_guard
from ..geometry import _FLOAT_DTYPES, Geometry, check_qkv, check_scale
from ..merge import merge_attentions
from ..patterns.base import as_pattern
from ..patterns.content import has_content
from ..patterns.layout import Tiling
from ..scores.base import as_score_mod
from .._checks import check_bool
from ._group import GroupInfo, check_agree, resolve_group
from .comm import GRAD, KV, CommStats, Pending, Timer, post
from .local_pattern import ShardPattern, ShardScoreMod
from .schedule import RingSchedule, chunk_visibility
from .sharding import LAYOUTS, check_layout, chunk_ranges, rank_chunks


@dataclass
class _Call:
    """Everything one ``ring_attention`` call needs, identical in meaning on every rank."""

    info: GroupInfo
    sched: RingSchedule
    pattern: Any
    score_mod: Any
    geometry: Geometry  # the whole (unpadded) problem
    layout: str
    scale: float
    cdt: torch.dtype
    q_local: int
    kv_local: int
    stats: CommStats | None

    @property
    def per(self) -> int:
        return len(rank_chunks(0, self.info.world_size, self.layout))

    @property
    def q_chunk(self) -> int:
        return self.q_local // self.per

    @property
    def kv_chunk(self) -> int:
        return self.kv_local // self.per

    def q_start(self, ia: int) -> int:
        return chunk_ranges(self.info.rank, self.info.world_size, self.layout, self.q_local)[ia][0]

    def kv_start(self, owner: int, ib: int) -> int:
        return chunk_ranges(owner, self.info.world_size, self.layout, self.kv_local)[ib][0]


def _pair(call: _Call, ia: int, owner: int, ib: int):
    """Plan, work and shifted score mod of query chunk ``ia`` x key chunk ``ib`` of ``owner``."""
    g = call.geometry
    q0, k0 = call.q_start(ia), call.kv_start(owner, ib)
    pattern = ShardPattern(call.pattern, g, q0, k0)
    smod = None if call.score_mod is None else ShardScoreMod(call.score_mod, g, q0, k0)
    local = Geometry(g.batch, g.q_heads, g.kv_heads, (call.q_chunk,), (call.kv_chunk,),
                     g.head_dim, g.value_dim, g.device)
    tiling = Tiling(local, *default_tiles(pattern, local))
    tile_count_guard(tiling)
    plan, work = cached_plan(pattern, tiling, DEFAULT_CHUNK_ELEMENTS, call.cdt, plan_work)
    return plan, work, smod


def _kv_chunk(x: torch.Tensor, ib: int, n: int, cdt: torch.dtype) -> torch.Tensor:
    return flat_kv(x.narrow(2, ib * n, n).to(cdt))


def _post_kv(call: _Call, k, v, step: int) -> Pending:
    """Post this rank's transfers of ring step ``step``: own shard out, needed shard in."""
    if step == 0:
        return Pending([], [k, v], "own shard")
    r, sched = call.info.rank, call.sched
    dst, src = sched.destination(r, step), sched.source(r, step)
    sends = [([k, v], dst)] if dst is not None else []
    recvs = [([torch.empty_like(k), torch.empty_like(v)], src)] if src is not None else []
    return post(call.info, sends, recvs, KV, step, call.stats,
                f"the key/value shard of rank {src} (ring step {step})")


def _forward(call: _Call, q, k, v):
    r, sched = call.info.rank, call.sched
    steps = sched.steps
    cq, ck, cdt = call.q_chunk, call.kv_chunk, call.cdt
    q_parts = [q.narrow(2, i * cq, cq) for i in range(call.per)]
    acc: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * call.per
    pending = _post_kv(call, k, v, steps[0]) if steps else None
    for i, step in enumerate(steps):
        nxt = _post_kv(call, k, v, steps[i + 1]) if i + 1 < len(steps) else None
        received = pending.finish(call.info, call.stats)
        src = sched.source(r, step)
        kk, vv = received if src is not None else (None, None)
        if src is not None:
            with Timer(call.stats, q.device):
                for ia, ib in sched.needs[r][src]:
                    plan, work, smod = _pair(call, ia, src, ib)
                    if not plan.chunks:
                        continue
                    q_t = to_tiles(q_parts[ia].to(cdt), plan.tiling, plan.fold_heads)
                    o_t, l_t = tiled_forward(q_t, _kv_chunk(kk, ib, ck, cdt), _kv_chunk(vv, ib, ck, cdt),
                                             plan, call.scale, smod, work)
                    o = from_tiles(o_t, plan.tiling, plan.fold_heads)
                    lse = from_tiles(l_t, plan.tiling, plan.fold_heads)
                    acc[ia] = (o, lse) if acc[ia] is None else merge_attentions(
                        [acc[ia][0], o], [acc[ia][1], lse])
                    if call.stats is not None:
                        call.stats.pairs_computed += 1
        if call.stats is not None:
            call.stats.steps += 1
        pending = nxt
    g = call.geometry
    outs, lses = [], []
    for part in acc:
        if part is None:
            part = (q.new_zeros(g.batch, g.q_heads, cq, g.value_dim, dtype=cdt),
                    q.new_full((g.batch, g.q_heads, cq), float("-inf"), dtype=cdt))
        outs.append(part[0])
        lses.append(part[1])
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _backward(call: _Call, q, k, v, out, lse, dout, dlse, params):
    r, sched = call.info.rank, call.sched
    steps = sched.steps
    cq, ck, cdt = call.q_chunk, call.kv_chunk, call.cdt
    B, Hkv, D, Dv = k.shape[0], k.shape[1], k.shape[-1], v.shape[-1]
    rows = [slice(i * cq, (i + 1) * cq) for i in range(call.per)]
    q_c = q.to(cdt)
    dout_c = dout.to(cdt)
    dq = torch.zeros_like(q_c)
    dk = k.new_zeros(k.shape, dtype=cdt)
    dv = v.new_zeros(v.shape, dtype=cdt)
    dparams = [torch.zeros_like(p) for p in params]
    grads_in: Pending | None = None

    def drain():
        if grads_in is not None:
            bufs = grads_in.finish(call.info, call.stats)
            if bufs:
                dk.add_(bufs[0])
                dv.add_(bufs[1])

    pending = _post_kv(call, k, v, steps[0]) if steps else None
    for i, step in enumerate(steps):
        nxt = _post_kv(call, k, v, steps[i + 1]) if i + 1 < len(steps) else None
        received = pending.finish(call.info, call.stats)
        src = sched.source(r, step)
        kk, vv = received if src is not None else (None, None)
        dk_part = dv_part = None
        if src is not None:
            dk_part = dk if step == 0 else k.new_zeros(k.shape, dtype=cdt)
            dv_part = dv if step == 0 else v.new_zeros(v.shape, dtype=cdt)
            with Timer(call.stats, q.device):
                for ia, ib in sched.needs[r][src]:
                    plan, work, smod = _pair(call, ia, src, ib)
                    if not plan.chunks:
                        continue
                    t, fold = plan.tiling, plan.fold_heads
                    # rows are never whole here: P must come from the global lse, not a local softmax
                    partial_rows = [(ci, bias, first, False) for ci, bias, first, _ in work]
                    sl = rows[ia]
                    dlse_t = None if dlse is None else to_tiles(dlse[:, :, sl, None].to(cdt), t, fold)[..., 0]
                    dq_t, dk_f, dv_f, dps = tiled_backward(
                        to_tiles(q_c[:, :, sl], t, fold), _kv_chunk(kk, ib, ck, cdt),
                        _kv_chunk(vv, ib, ck, cdt), to_tiles(out[:, :, sl], t, fold),
                        to_tiles(lse[:, :, sl, None], t, fold)[..., 0], to_tiles(dout_c[:, :, sl], t, fold),
                        dlse_t, plan, call.scale, smod, params, partial_rows)
                    dq[:, :, sl] += from_tiles(dq_t, t, fold)
                    dk_part[:, :, ib * ck:(ib + 1) * ck] += dk_f.view(B, Hkv, ck, D)
                    dv_part[:, :, ib * ck:(ib + 1) * ck] += dv_f.view(B, Hkv, ck, Dv)
                    for acc, gp in zip(dparams, dps):
                        acc += gp
        if step:
            helper = sched.destination(r, step)  # the rank that worked on this rank's shard
            sends = [([dk_part, dv_part], src)] if src is not None else []
            recvs = [([torch.empty_like(dk), torch.empty_like(dv)], helper)] if helper is not None else []
            drain()
            grads_in = post(call.info, sends, recvs, GRAD, step, call.stats,
                            f"key/value gradients from rank {helper} (ring step {step})")
        if call.stats is not None:
            call.stats.steps += 1
        pending = nxt
    drain()
    return dq, dk, dv, dparams


class _RingAttention(torch.autograd.Function):
    """Saves q, k, v, the merged output and lse; backward runs the ring again."""

    @staticmethod
    def forward(ctx, call: _Call, q, k, v, *params):
        out, lse = _forward(call, q, k, v)
        ctx.call = call
        ctx.save_for_backward(q, k, v, out, lse, *params)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *params = ctx.saved_tensors
        dq, dk, dv, dparams = _backward(ctx.call, q, k, v, out, lse, dout, dlse, params)
        return (None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *dparams)


def _check_length(name: str, value: object, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise ValueError(
            f"{name}={value!r}, expected an int in [1, {most}] (the true length of the sharded "
            "sequence, at most world_size * local length)"
        )
    return value


def _setup(q, k, v, pattern, score_mod, group, layout, scale, seq_len, kv_seq_len, timeout,
           check_ranks, stats) -> _Call:
    who = "ring_attention"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if isinstance(x, torch.Tensor) and x.ndim != 4:
            raise ValueError(
                f"{who} shards one token axis: {name} must be (B, H, L, D), got "
                f"{name}.shape={tuple(x.shape)}; flatten several token axes into one first"
            )
    g = check_qkv(q, k, v)
    info = resolve_group(group, timeout, who)
    layout = check_layout(layout)
    check_bool("check_ranks", check_ranks)
    if stats is not None and not isinstance(stats, CommStats):
        raise TypeError(f"stats must be a CommStats or None, got {type(stats).__name__}")
    if info.backend == "nccl" and g.device.type != "cuda":
        raise ValueError(f"the NCCL process group needs CUDA tensors, got q.device={g.device}")
    W = info.world_size
    per = len(rank_chunks(0, W, layout))
    for name, n in (("q.shape[2]", g.q_len), ("k.shape[2]", g.kv_len)):
        if n % per:
            raise ValueError(
                f"layout={layout!r} holds {per} equal chunks per rank, so {name} must be divisible "
                f"by {per}, got {name}={n}; shard with attnlab.distributed.shard(..., pad=True)"
            )
    L = W * g.q_len if seq_len is None else _check_length("seq_len", seq_len, W * g.q_len)
    if kv_seq_len is None:
        S = L if g.kv_len == g.q_len else W * g.kv_len
    else:
        S = _check_length("kv_seq_len", kv_seq_len, W * g.kv_len)
    pattern = as_pattern(pattern)
    if has_content(pattern):
        raise ValueError(
            f"{who} needs a static pattern (known from positions alone); {pattern!r} selects keys "
            "from the contents of q and k across the whole sequence"
        )
    geometry = Geometry(g.batch, g.q_heads, g.kv_heads, (L,), (S,), g.head_dim, g.value_dim, g.device)
    pattern.validate(geometry)
    score_mod = as_score_mod(score_mod)
    if score_mod is not None:
        score_mod.validate(geometry)
    sched = RingSchedule(chunk_visibility(pattern, geometry, W, layout, g.q_len // per, g.kv_len // per),
                         W, layout)
    if check_ranks:
        check_agree({
            "batch size q.shape[0]": g.batch, "query heads q.shape[1]": g.q_heads,
            "key/value heads k.shape[1]": g.kv_heads, "local query length q.shape[2]": g.q_len,
            "local key length k.shape[2]": g.kv_len, "head dim q.shape[3]": g.head_dim,
            "value dim v.shape[3]": g.value_dim, "dtype (index in float16, bfloat16, float32, "
            "float64)": _FLOAT_DTYPES.index(q.dtype), "layout (index in contiguous, zigzag)":
            LAYOUTS.index(layout), "seq_len": L, "kv_seq_len": S,
            "the pattern's chunk visibility (fingerprint)": sched.fingerprint(),
            "score_mod given (0/1)": int(score_mod is not None),
        }, info, g.device, who)
    return _Call(info, sched, pattern, score_mod, geometry, layout, check_scale(scale, g.head_dim),
                 compute_dtype_for(q.dtype), g.q_len, g.kv_len, stats)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pattern: Any = None,
    score_mod: Any = None,
    group: Any = None,
    layout: str = "contiguous",
    scale: float | None = None,
    seq_len: int | None = None,
    kv_seq_len: int | None = None,
    return_lse: bool = False,
    timeout: Any = None,
    check_ranks: bool = True,
    stats: CommStats | None = None,
):
    """Exact attention of this rank's query shard over the whole sharded sequence.

    Equal (outputs and gradients) to :func:`attnlab.attention` on the gathered sequence, with
    the pattern and score mod on global token positions. Every rank of ``group`` must call it
    with its own shards and the same other arguments, and, when training, must run backward
    too (the backward pass is another ring).

    Args:
        q, k, v: this rank's shards ``(B, Hq, L_r, D)``, ``(B, Hkv, S_r, D)``,
            ``(B, Hkv, S_r, Dv)`` of the whole ``(B, H, W * L_r, D)`` tensors, cut as
            ``layout`` says (:func:`attnlab.distributed.shard`); ``Hq`` a multiple of ``Hkv``.
        pattern: which pairs interact, on global flat indices (``Causal()``,
            ``SlidingWindow(...)``, ``Document(ids)`` with the ids of the whole sequence, ...).
            Key/value shards in which none of a rank's queries sees a key are neither sent to
            it nor waited for. Content-based patterns are refused.
        score_mod: a score mod on global positions, e.g. ``ALiBi``.
        group: the process group (None: the default group).
        layout: ``"contiguous"`` or ``"zigzag"`` (load-balanced causal sharding).

    Other Parameters:
        scale: logit scale, ``1/sqrt(D)`` when None.
        seq_len, kv_seq_len: the true global lengths when the shards were padded at the end
            (``shard(..., pad=True)``); padded keys are invisible and padded queries return 0.
        return_lse: also return this rank's log-sum-exp ``(B, Hq, L_r)`` (differentiable).
        timeout: seconds (or a ``timedelta``) any single wait on another rank may take before
            :class:`PeerFailure` is raised; None uses the process group's timeout.
        check_ranks: first check (one small all-gather) that every rank passed the same
            shapes, dtype, layout, lengths and pattern visibility; ``ValueError`` naming the
            first difference. Turn off to save that collective once a setup is known good.
        stats: a :class:`CommStats` to which this rank's bytes, messages, wait and compute
            times are added (forward, and backward when it runs).

    Returns:
        ``out (B, Hq, L_r, Dv)`` in the dtype of ``q``, or ``(out, lse)``.

    Score-mod parameters get this rank's part of their gradient; sum it over the group (as
    for the other parameters of a context-parallel model).
    """
    check_bool("return_lse", return_lse)
    call = _setup(q, k, v, pattern, score_mod, group, layout, scale, seq_len, kv_seq_len, timeout,
                  check_ranks, stats)
    if stats is not None:
        stats.calls += 1
    params = call.score_mod.differentiable_tensors() if call.score_mod is not None else []
    out, lse = _RingAttention.apply(call, q, k.contiguous(), v.contiguous(), *params)
    return (out, lse) if return_lse else out


__all__ = ["ring_attention"]
