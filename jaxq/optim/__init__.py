"""Optimizers with 8-bit, 4-bit and FP8 blockwise-quantized state, as optax transforms.

Numerically compatible with bitsandbytes' 8-bit optimizers ('8-bit Optimizers via
Block-wise Quantization', Dettmers et al. 2022) and with the 4-bit states of Li et al.
2023. Every factory returns an ordinary ``optax.GradientTransformation`` with
``NamedTuple`` state.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxq import optim
    >>> params = {"w": jnp.ones((512, 512))}
    >>> tx = optim.adamw_8bit(1e-3)
    >>> state = tx.init(params)
    >>> optim.state_nbytes(state) / params["w"].size < 2.02
    True
"""

from jaxq.optim.adam import (
    QuantizedAdamState,
    adam_8bit,
    adamw_4bit,
    adamw_8bit,
    adamw_fp8,
    scale_by_adam_4bit,
    scale_by_adam_8bit,
    scale_by_adam_fp8,
)
from jaxq.optim.blockwise import dequantize_blockwise, quantize_blockwise
from jaxq.optim.codecs import QuantizedMoment, Rank1Moment
from jaxq.optim.common import STABLE_EMBEDDING_NAME, is_stable_embedding, state_nbytes
from jaxq.optim.maps import build_dynamic_map, dynamic_map, dynamic_map_4bit, linear_map_4bit
from jaxq.optim.momentum import (
    QuantizedMomentumState,
    lion_8bit,
    scale_by_lion_8bit,
    sgd_8bit,
    trace_8bit,
)
from jaxq.optim.stable_embed import StableEmbed

__all__ = [
    "QuantizedAdamState",
    "QuantizedMoment",
    "QuantizedMomentumState",
    "Rank1Moment",
    "STABLE_EMBEDDING_NAME",
    "StableEmbed",
    "adam_8bit",
    "adamw_4bit",
    "adamw_8bit",
    "adamw_fp8",
    "build_dynamic_map",
    "dequantize_blockwise",
    "dynamic_map",
    "dynamic_map_4bit",
    "is_stable_embedding",
    "linear_map_4bit",
    "lion_8bit",
    "quantize_blockwise",
    "scale_by_adam_4bit",
    "scale_by_adam_8bit",
    "scale_by_adam_fp8",
    "scale_by_lion_8bit",
    "sgd_8bit",
    "state_nbytes",
    "trace_8bit",
]
