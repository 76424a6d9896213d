"""Optimizers with 8-bit, 4-bit and FP8 blockwise-quantized state, as optax transforms.

Numerically compatible with bitsandbytes' 8-bit optimizers ('8-bit Optimizers via
Block-wise Quantization', Dettmers et al. 2022: same dynamic maps, bit for bit, same
nearest-code rule and sign-preserving re-quantization of first moments) and with the 4-bit
states of Li et al. 2023. Every factory returns an ordinary ``optax.GradientTransformation``
with ``NamedTuple`` state.

Decisions, in one place:

* **Block layout**: blocks run along the parameter's *last axis*, zero-padded to a multiple
  of ``block_size``; a short last axis that would need more than 1/64 padding is merged
  with the axes before it (``(d, heads, 64)`` -> rows of ``heads * 64``; see
  :func:`jaxq.optim.blockwise.row_axes`), so padding stays under 1/64 of a row. Codes and
  block scales keep the leading axes, so they take the parameter's ``PartitionSpec`` and a
  sharded update needs no all-gather (when the row axis is sharded, each shard must hold
  whole blocks: ``n / devices % block_size == 0``; sharding a merged minor axis is not
  local). Under explicit sharding a layout that would split blocks is a ``ValueError``,
  and ``jax.jit(opt.init)`` places the state like the parameters.
* **Block scales**: 8-bit and FP8 store them in bfloat16 rounded *up* (2.016 bytes/param
  for 8-bit AdamW); ``scale_dtype=jnp.float32`` gives bitsandbytes' float32 absmax
  (2.031 bytes/param). 4-bit stores float32 scales (1.03 bytes/param).
* **Non-finite gradients**: a NaN/inf element contributes no update and leaves its moments
  as they were; finite gradients are clipped to ``|g| <= 2**63`` (so ``g**2`` stays finite);
  block maxima below the smallest normal float32 are stored as 0. No NaN or inf ever
  reaches a stored moment or scale. ``optax.apply_if_finite`` composes for skip-the-step.
* **32-bit state**: parameters with fewer than ``min_quantized_size`` (4096) elements,
  scalars, :class:`StableEmbed` tables, and those chosen by ``keep_fp32``.
* **inject_hyperparams**: numeric hyperparameters are injectable; pass
  ``static_args=('block_size', 'min_quantized_size')`` if you set those, and add
  ``'mask', 'keep_fp32'`` when they are callables.

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
