"""Unit scaling and u-muP for JAX and Flax NNX.

Unit scaling (Blake et al., 2023) gives every op separate forward and backward scale
factors, so that for unit-variance inputs each op's output and its gradients have unit
variance; low-precision formats centred on 1 (FP8, FP16) then work with *static*
scales. u-muP (Blake et al., 2024) adds muP's width/depth rules on top, so the best
learning rate transfers across model width.

Example:
    >>> import jax
    >>> from flax import nnx
    >>> from jaxq import unit_scaling as us
    >>> model = us.TransformerDecoder(features=32, layers=2, heads=2, rngs=nnx.Rngs(0))
    >>> tx = us.optim.adamw(2.0 ** -3, tags=model)
"""

from jaxq.unit_scaling import optim, training
from jaxq.unit_scaling.activations import (
    dropout,
    gelu,
    scaled_dot_product_attention,
    silu,
    silu_glu,
    softmax,
)
from jaxq.unit_scaling.dense import (
    add,
    linear,
    linear_readout,
    matmul,
    residual_add,
    residual_split,
    residual_taus,
)
from jaxq.unit_scaling.fp8 import Fp8DotGeneral, fp8_dot_general
from jaxq.unit_scaling.losses import cross_entropy, mse_loss
from jaxq.unit_scaling.modules import (
    MHSA,
    MLP,
    Embedding,
    Linear,
    LinearReadout,
    Norm,
    TransformerDecoder,
    TransformerLayer,
    rotary,
)
from jaxq.unit_scaling.norms import embedding, layer_norm, rms_norm
from jaxq.unit_scaling.params import ROLES, ParamTag, UParam, param_tags, uparam
from jaxq.unit_scaling.scale import CONSTRAINTS, Constraint, apply_constraint, scale_bwd, scale_fwd

__all__ = [
    # primitives
    "scale_fwd",
    "scale_bwd",
    "apply_constraint",
    "Constraint",
    "CONSTRAINTS",
    # ops
    "linear",
    "linear_readout",
    "matmul",
    "add",
    "residual_split",
    "residual_add",
    "residual_taus",
    "gelu",
    "silu",
    "silu_glu",
    "softmax",
    "dropout",
    "scaled_dot_product_attention",
    "layer_norm",
    "rms_norm",
    "embedding",
    "cross_entropy",
    "mse_loss",
    # FP8
    "Fp8DotGeneral",
    "fp8_dot_general",
    # modules and tags
    "Linear",
    "LinearReadout",
    "Embedding",
    "Norm",
    "MLP",
    "MHSA",
    "TransformerLayer",
    "TransformerDecoder",
    "rotary",
    "UParam",
    "ParamTag",
    "ROLES",
    "uparam",
    "param_tags",
    # u-muP optimiser
    "optim",
    "training",
]
