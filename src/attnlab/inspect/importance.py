"""Head importance by masking and by gradient: "Are Sixteen Heads Really Better than One?"
(Michel, Levy and Neubig, 2019).

Every head ``h`` of layer ``l`` is gated by ``xi_lh`` (its probabilities, hence its output,
are multiplied by ``xi_lh``; :class:`attnlab.inspect.HeadMask` inside
:func:`attnlab.inspect.intervene`). With ``loss = loss_fn()`` run under the gates:

- by masking: ``I_lh = loss(xi_lh = 0, every other gate 1) - loss(all gates 1)``, one forward
  pass per head (the paper's ablation of one head at a time: positive means removing the
  head hurts);
- by gradient: ``I_lh = mean_n | d loss_n / d xi_lh |`` at ``xi = 1`` over the examples ``n``
  (the paper's proxy score, from one backward pass per example), optionally normalised per
  layer by its l2 norm as in the paper's pruning experiments.

``loss_fn`` is any callable that runs the model (whose attention goes through
:func:`attnlab.attention`: attnlab modules, or a Hugging Face model under
:func:`attnlab.inspect.use_attnlab`) and returns a scalar loss, or a 1-D tensor of
per-example losses. Layers are the ``layer`` numbers of the calls
(:func:`attnlab.inspect.layer_scope`: the module's ``layer_idx`` on the Hugging Face route,
else the call's index within the forward pass).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .interventions import HeadMask, intervene

__all__ = ["head_importance_by_masking", "head_importance_by_gradient"]

LossFn = Callable[[], torch.Tensor | float]


def _check_sizes(loss_fn: object, num_layers: object, num_heads: object) -> None:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn={loss_fn!r}, expected a callable () -> loss")
    for name, value in (("num_layers", num_layers), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}, expected an int >= 1")


def _loss_value(loss: object) -> float:
    if isinstance(loss, torch.Tensor):
        if loss.numel() == 0:
            raise ValueError("loss_fn() returned an empty tensor, expected a scalar or per-example losses")
        return float(loss.detach().double().mean())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    raise TypeError(f"loss_fn() returned {type(loss).__name__}, expected a tensor or a float")


def head_importance_by_masking(loss_fn: LossFn, num_layers: int, num_heads: int, *,
                               heads: Iterable[tuple[int, int]] | None = None) -> torch.Tensor:
    """``(num_layers, num_heads)`` float64: the increase of the loss when one head is removed
    (module docstring), ``loss(head off) - loss(all on)``, one forward pass per head plus one
    for the baseline, without gradients.

    Args:
        loss_fn: runs the model, returns the loss (the mean of a per-example vector is used).
        num_layers, num_heads: the size of the gate table (query heads per layer).
        heads: only these ``(layer, head)`` pairs (the others are NaN); None: every head.
    """
    _check_sizes(loss_fn, num_layers, num_heads)
    pairs = ([(l, h) for l in range(num_layers) for h in range(num_heads)] if heads is None else list(heads))
    for pair in pairs:
        ok = (isinstance(pair, tuple) and len(pair) == 2
              and all(isinstance(i, int) and not isinstance(i, bool) for i in pair)
              and 0 <= pair[0] < num_layers and 0 <= pair[1] < num_heads)
        if not ok:
            raise ValueError(f"heads contains {pair!r}, expected (layer, head) pairs with layer < {num_layers} and "
                             f"head < {num_heads}")
    out = torch.full((num_layers, num_heads), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        # the baseline runs under gates of 1, so it takes the same path as every ablation and
        # their difference is the head's alone (not a rounding difference between backends)
        with intervene(HeadMask(torch.ones(num_layers, num_heads))):
            base = _loss_value(loss_fn())
        for layer, head in pairs:
            gate = torch.ones(num_layers, num_heads)
            gate[layer, head] = 0.0
            with intervene(HeadMask(gate)):
                out[layer, head] = _loss_value(loss_fn()) - base
    return out


def head_importance_by_gradient(loss_fn: LossFn, num_layers: int, num_heads: int, *,
                                normalize_layers: bool = False) -> torch.Tensor:
    """``(num_layers, num_heads)`` float64: ``mean_n |d loss_n / d xi_lh|`` at ``xi = 1``
    (module docstring); ``loss_fn`` must return a differentiable tensor (a scalar, or a 1-D
    tensor of per-example losses, each back-propagated separately). With
    ``normalize_layers`` each layer's row is divided by its l2 norm (rows of zeros stay 0).
    Heads whose gate the loss does not depend on get 0."""
    _check_sizes(loss_fn, num_layers, num_heads)
    if not isinstance(normalize_layers, bool):
        raise TypeError(f"normalize_layers={normalize_layers!r}, expected a bool")
    gate = torch.ones(num_layers, num_heads, requires_grad=True)
    with torch.enable_grad(), intervene(HeadMask(gate)):
        loss = loss_fn()
    if not isinstance(loss, torch.Tensor) or loss.ndim > 1 or loss.numel() == 0:
        raise TypeError(f"loss_fn() returned {type(loss).__name__ if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}, "
                        "expected a scalar tensor or a 1-D tensor of per-example losses")
    if not loss.requires_grad:
        raise ValueError("loss_fn() returned a loss that does not require grad: run the model with gradients "
                         "enabled (not under torch.no_grad) so the head gates reach the loss")
    losses = loss.reshape(-1)
    total = torch.zeros(num_layers, num_heads, dtype=torch.float64)
    for n in range(losses.numel()):
        (g,) = torch.autograd.grad(losses[n], gate, retain_graph=n + 1 < losses.numel(), allow_unused=True)
        if g is not None:
            total += g.detach().double().abs()
    score = total / losses.numel()
    if normalize_layers:
        norm = score.norm(dim=-1, keepdim=True)
        score = torch.where(norm > 0, score / norm.clamp_min(1e-300), score)
    return score
