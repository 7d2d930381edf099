"""Linear, recurrent and kernelized attention (section B of the mechanism list).

* :func:`linear_attention` / :func:`linear_attention_weights`: feature-map linear attention
  with decay (RetNet, TransNormerLLM) and data-dependent gates (GLA), in parallel, chunked and
  recurrent forms (:mod:`~attnlab.linear.forms`), exact to the recurrence of
  :func:`~attnlab.linear.reference.naive_recurrence`.
* Feature maps: :class:`Identity`, :class:`EluPlusOne`, :class:`ReLU`,
  :class:`PerformerRandomFeatures`, :class:`CosFormer`, :class:`TaylorExp`, :class:`Hedgehog`,
  :class:`T2R`; decays :func:`retnet_decay`, :func:`tnl_decay`.
* Other linear-complexity attentions, each with its ``*_reference``:
  :func:`efficient_attention`, :func:`agent_attention`, :func:`flow_attention`,
  :func:`norm_attention` / :func:`diag_attention` (TransNormer),
  :func:`toeplitz_kernelized_attention` (RPE through the FFT), :func:`aaren` (causal softmax
  by a prefix scan, with :func:`aaren_step`), and the selective SSM of Mamba with its implicit
  attention matrix (:func:`selective_scan`, :func:`mamba_implicit_attention`).
"""

from attnlab.linear.aaren import AarenState, aaren, aaren_reference, aaren_step
from attnlab.linear.agent import agent_attention, agent_attention_reference
from attnlab.linear.api import linear_attention, linear_attention_weights
from attnlab.linear.decays import retnet_decay, tnl_decay
from attnlab.linear.efficient import efficient_attention, efficient_attention_reference
from attnlab.linear.feature_maps import (
    CosFormer,
    EluPlusOne,
    Identity,
    PerformerRandomFeatures,
    ReLU,
    TaylorExp,
)
from attnlab.linear.flow import flow_attention, flow_attention_reference
from attnlab.linear.forms import (
    EPS,
    LinearAttentionState,
    chunked_form,
    parallel_form,
    recurrent_step,
)
from attnlab.linear.learned_maps import T2R, Hedgehog
from attnlab.linear.reference import naive_recurrence
from attnlab.linear.ssm import mamba_implicit_attention, selective_scan, selective_scan_reference
from attnlab.linear.toeplitz import toeplitz_kernelized_attention, toeplitz_kernelized_attention_reference
from attnlab.linear.transnormer import (
    diag_attention,
    diag_attention_reference,
    norm_attention,
    norm_attention_reference,
)

__all__ = [
    "EPS", "CosFormer", "EluPlusOne", "Hedgehog", "Identity", "LinearAttentionState",
    "PerformerRandomFeatures", "ReLU", "T2R", "TaylorExp", "chunked_form", "linear_attention",
    "linear_attention_weights", "naive_recurrence", "parallel_form", "recurrent_step",
    "retnet_decay", "tnl_decay", "AarenState", "aaren", "aaren_reference", "aaren_step",
    "agent_attention", "agent_attention_reference", "efficient_attention",
    "efficient_attention_reference", "flow_attention", "flow_attention_reference",
    "mamba_implicit_attention", "selective_scan", "selective_scan_reference",
    "toeplitz_kernelized_attention", "toeplitz_kernelized_attention_reference", "diag_attention",
    "diag_attention_reference", "norm_attention", "norm_attention_reference",
]
