"""The backends attnlab knows, in automatic-selection priority order."""

from __future__ import annotations

import torch

from ..patterns.base import Causal, Full
from .base import Backend, Problem
from .reference import DEFAULT_MAX_ELEMENTS, compute_dtype_for, reference_attention
from .block_flash import block_flash_attention, cpu_flash_ops, native_kernel_for
from .native import unavailable_reason
from .split_plan import DEFAULT_GATHER_ELEMENTS, SplitPlan, cached_split_plan
from .tiled import plan_work, tiled_attention
from .tiled_plan import DEFAULT_CHUNK_ELEMENTS, cached_plan, default_tiles, tile_count_guard
from ..patterns.layout import Tiling


class ReferenceBackend(Backend):
    """Materialised logits; exact ground truth, small problems only."""

    name = "reference"
    options = ("compute_dtype", "max_elements")

    def not_supported_reasons(self, problem: Problem) -> list[str]:
        g = problem.geometry
        n = g.batch * g.q_heads * g.q_len * g.kv_len
        limit = problem.options.get("max_elements", DEFAULT_MAX_ELEMENTS)
        if n > limit:
            return [f"reference: B*Hq*L*S = {n} logits exceeds its guard max_elements={limit}"]
        return []

    def run(self, problem: Problem):
        out = reference_attention(
            problem.q,
            problem.k,
            problem.v,
            pattern=problem.pattern,
            score_mod=problem.score_mod,
            scale=problem.scale,
            return_lse=True,
            compute_dtype=problem.options.get("compute_dtype"),
            max_elements=problem.options.get("max_elements", DEFAULT_MAX_ELEMENTS),
        )
        return out


class TiledBackend(Backend):
    """Block-sparse online softmax over the pattern's tile layout (CPU and CUDA)."""

    name = "tiled"
    options = ("q_tile", "kv_tile", "chunk_elements", "compute_dtype")

    def tiling(self, problem: Problem) -> Tiling:
        g = problem.geometry
        q_tile, kv_tile = default_tiles(problem.pattern, g)
        q_tile = _as_tile(problem.options.get("q_tile", q_tile), g.ndim, "q_tile")
        kv_tile = _as_tile(problem.options.get("kv_tile", kv_tile), g.ndim, "kv_tile")
        return Tiling(g, q_tile, kv_tile)

    def not_supported_reasons(self, problem: Problem) -> list[str]:
        try:
            tile_count_guard(self.tiling(problem))
        except ValueError as e:
            return [f"tiled: {e}"]
        return []

    def run(self, problem: Problem):
        tiling = self.tiling(problem)
        tile_count_guard(tiling)
        cdt = compute_dtype_for(problem.dtype, problem.options.get("compute_dtype"))
        chunk = problem.options.get("chunk_elements", DEFAULT_CHUNK_ELEMENTS)
        plan, work = cached_plan(problem.pattern, tiling, chunk, cdt, plan_work)
        return tiled_attention(
            problem.q, problem.k, problem.v, plan, problem.scale, problem.score_mod, cdt, work
        )


class BlockFlashBackend(TiledBackend):
    """Block-sparse flash attention on the CPU: attnlab's native kernel over every tile (partial
    tiles masked) when it builds, else PyTorch's fused CPU flash kernel on the whole tiles and
    the tiled backend on the partial ones."""

    name = "block_flash"
    options = ("q_tile", "kv_tile", "chunk_elements", "gather_elements", "compute_dtype")
    min_whole_share = 0.9  # without the native kernel: below it the separate tiled pass costs more than it saves

    def not_supported_reasons(self, problem: Problem) -> list[str]:
        why = []
        if problem.device.type != "cpu":
            why.append(f"block_flash: runs on CPU tensors (got {problem.device}); CUDA block sparsity runs on flex")
        if cpu_flash_ops() is None:
            why.append(f"block_flash: torch {torch.__version__} has no aten::_scaled_dot_product_flash_attention_for_cpu")
        if problem.score_mod is not None:
            why.append("block_flash: the flash kernel takes no score_mod")
        if problem.return_lse:
            why.append("block_flash: returns no differentiable log-sum-exp (return_lse=True)")
        if why:
            return why
        return [w.replace("tiled:", "block_flash:", 1) for w in super().not_supported_reasons(problem)]

    def declines(self, problem: Problem) -> list[str]:
        plan = self.plan(problem)
        cdt = compute_dtype_for(problem.dtype, problem.options.get("compute_dtype"))
        if plan.aligned and native_kernel_for(cdt) is not None:
            return []  # the native kernel masks partial tiles itself: faster than tiled on every catalog pattern
        total = plan.whole_pairs + plan.partial_pairs
        if total and plan.whole_pairs < self.min_whole_share * total:
            return [
                f"block_flash: only {plan.whole_pairs} of the {total} touched tile pairs are whole "
                f"(auto needs {self.min_whole_share:.0%} where the partial tiles run on tiled GEMMs); "
                f"the tiled backend does the rest better"
            ]
        return []

    def kernel_summary(self, problem: Problem) -> str:
        """Which kernel runs the whole (and, when it can, the partial) tiles, for explain()."""
        plan = self.plan(problem)
        cdt = compute_dtype_for(problem.dtype, problem.options.get("compute_dtype"))
        if native_kernel_for(cdt) is not None:
            partial = "masked in the same kernel" if plan.aligned else "on the tiled backend, merged by lse"
            return f"kernel: attnlab native (C++), {cdt}; partial tiles {partial}"
        why = unavailable_reason() or (f"it serves float32 and float64, not {cdt}"
                                       if cdt not in (torch.float32, torch.float64) else "not in use")
        return f"kernel: PyTorch's CPU flash kernel (attnlab native unavailable: {why}); partial tiles on tiled"

    def plan(self, problem: Problem) -> SplitPlan:
        if "split_plan" not in problem.memo:
            tiling = self.tiling(problem)
            chunk = problem.options.get("chunk_elements", DEFAULT_CHUNK_ELEMENTS)
            gather = problem.options.get("gather_elements", DEFAULT_GATHER_ELEMENTS)
            problem.memo["split_plan"] = cached_split_plan(problem.pattern, tiling, chunk, gather)
        return problem.memo["split_plan"]

    def run(self, problem: Problem):
        cdt = compute_dtype_for(problem.dtype, problem.options.get("compute_dtype"))
        return block_flash_attention(problem.q, problem.k, problem.v, self.plan(problem), problem.scale, cdt)


class SDPABackend(Backend):
    """``torch.nn.functional.scaled_dot_product_attention`` for dense and causal problems."""

    name = "sdpa"
    options = ()

    def not_supported_reasons(self, problem: Problem) -> list[str]:
        g = problem.geometry
        why = []
        if not isinstance(problem.pattern, (Full, Causal)):
            why.append(f"sdpa: runs only Full and Causal patterns, got {problem.pattern!r}")
        if isinstance(problem.pattern, Causal) and g.q_len != g.kv_len:
            why.append(
                f"sdpa: its is_causal is top-left aligned; attnlab's causal is bottom-right and "
                f"differs when L != S (L={g.q_len}, S={g.kv_len})"
            )
        if problem.score_mod is not None:
            why.append("sdpa: cannot apply a score_mod without materialising an L x S bias")
        if problem.return_lse:
            why.append("sdpa: does not return the log-sum-exp (return_lse=True)")
        return why

    def run(self, problem: Problem):
        g = problem.geometry
        q = problem.q.reshape(g.batch, g.q_heads, g.q_len, g.head_dim)
        k = problem.k.reshape(g.batch, g.kv_heads, g.kv_len, g.head_dim)
        v = problem.v.reshape(g.batch, g.kv_heads, g.kv_len, g.value_dim)
        if g.q_heads != g.kv_heads:
            k = k.repeat_interleave(g.group_size, 1) if not _HAS_GQA else k
            v = v.repeat_interleave(g.group_size, 1) if not _HAS_GQA else v
        kwargs = {"enable_gqa": True} if (_HAS_GQA and g.q_heads != g.kv_heads) else {}
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=isinstance(problem.pattern, Causal), scale=problem.scale, **kwargs
        )
        return out.reshape(g.batch, g.q_heads, *g.q_shape, g.value_dim), None


def _sdpa_has_gqa() -> bool:
    import inspect

    try:
        return "enable_gqa" in inspect.signature(torch.nn.functional.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return "enable_gqa" in (torch.nn.functional.scaled_dot_product_attention.__doc__ or "")


_HAS_GQA = _sdpa_has_gqa()


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _as_tile(value: object, ndim: int, name: str) -> tuple[int, ...]:
    if _positive_int(value):
        return (value,) * ndim
    if isinstance(value, (tuple, list)) and len(value) == ndim and all(map(_positive_int, value)):
        return tuple(value)
    raise ValueError(f"options[{name!r}] must be a positive int or {ndim} positive ints, got {value!r}")


def check_option_values(options: dict) -> None:
    """Raise ValueError naming the option for values of the wrong type or range."""
    for name in ("chunk_elements", "gather_elements", "max_elements"):
        if name in options and not _positive_int(options[name]):
            raise ValueError(f"options[{name!r}] must be a positive int, got {options[name]!r}")
    for name in ("allow_cpu", "compile"):
        if name in options and not isinstance(options[name], bool):
            raise ValueError(f"options[{name!r}] must be a bool, got {options[name]!r}")
    if "compute_dtype" in options and options["compute_dtype"] not in (None, torch.float32, torch.float64):
        raise ValueError(
            f"options['compute_dtype'] must be torch.float32 or torch.float64, got {options['compute_dtype']!r}"
        )


def all_backends() -> dict[str, Backend]:
    """Name -> backend, in automatic-selection priority order."""
    from .flex import FlexBackend

    return {
        b.name: b
        for b in (SDPABackend(), FlexBackend(), BlockFlashBackend(), TiledBackend(), ReferenceBackend())
    }


__all__ = ["all_backends", "check_option_values", "ReferenceBackend", "TiledBackend", "BlockFlashBackend", "SDPABackend", "Backend", "Problem"]
