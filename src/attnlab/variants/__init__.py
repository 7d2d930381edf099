"""Softmax variants that change the normalisation or the logits (section D of MECHANISMS.md):
selective attention, Cog attention (negative weights), Multi-Token Attention, talking heads,
Mixture-of-Head attention, Gaussian adaptive attention, sigmoid attention, softmax+1, context
broadcasting (uniform attention), DependencyViT's reversed attention and triple-wise tensor
attention. Each file holds one mechanism: its definition, its fast path and its exact dense
reference. Those that can be written through :func:`attnlab.attention` (softmax+1, Cog,
talking heads, MoH, reversed attention, uniform attention over a pattern) inherit every
pattern and backend; the others have their own chunked fast paths.
"""

from .catalog import variant_mechanisms
from .cog import SignedPart, cog_attention, cog_attention_reference
from .context_broadcast import (
    context_broadcasting, context_broadcasting_reference, uniform_attention, uniform_attention_reference,
)
from .gaussian import gaussian_adaptive_attention, gaussian_adaptive_attention_reference, gaussian_adaptive_weights
from .mixture_of_heads import (
    ActiveRows, mixture_of_heads_attention, mixture_of_heads_attention_reference, moh_balance_loss, moh_gates,
    moh_gates_reference,
)
from .modules import (
    CogAttention, ContextBroadcasting, GaussianAdaptiveAttention, MixtureOfHeadAttention, MultiTokenAttention,
    ReversedAttention, SelectiveAttention, SigmoidAttention, TalkingHeadsAttention,
)
from .multi_token import multi_token_attention, multi_token_attention_reference
from .reversed import KeyBias, Transposed, reversed_attention, reversed_attention_reference
from .selective import selective_attention, selective_attention_reference
from .sigmoid import sigmoid_attention, sigmoid_attention_reference
from .softmax_one import softmax1_attention, softmax1_attention_reference
from .talking_heads import talking_heads_attention, talking_heads_attention_reference
from .tensor import tensor_attention, tensor_attention_reference

__all__ = [
    # functions (fast path) and their dense references
    "selective_attention", "selective_attention_reference",
    "cog_attention", "cog_attention_reference",
    "multi_token_attention", "multi_token_attention_reference",
    "talking_heads_attention", "talking_heads_attention_reference",
    "mixture_of_heads_attention", "mixture_of_heads_attention_reference",
    "moh_gates", "moh_gates_reference", "moh_balance_loss",
    "gaussian_adaptive_attention", "gaussian_adaptive_attention_reference", "gaussian_adaptive_weights",
    "sigmoid_attention", "sigmoid_attention_reference",
    "softmax1_attention", "softmax1_attention_reference",
    "context_broadcasting", "context_broadcasting_reference", "uniform_attention", "uniform_attention_reference",
    "reversed_attention", "reversed_attention_reference",
    "tensor_attention", "tensor_attention_reference",
    # building blocks
    "SignedPart", "ActiveRows", "Transposed", "KeyBias",
    # modules
    "SelectiveAttention", "CogAttention", "MultiTokenAttention", "TalkingHeadsAttention",
    "MixtureOfHeadAttention", "GaussianAdaptiveAttention", "SigmoidAttention", "ContextBroadcasting",
    "ReversedAttention",
    # catalog
    "variant_mechanisms",
]
