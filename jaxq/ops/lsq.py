"""Learned-step-size (LSQ) products: the fake-quantized path of ``learned_step`` recipes.

A recipe with ``learned_step=True`` multiplies the LSQ fake-quantized operands in float32
(:func:`jaxq.quantization.fake_quant.lsq_quant`, per tensor, row or block of the canonical
``(B, R, K)`` view), ``y = Σ_k q(x; s_x)_{bmk} q(w; s_w)_{bnk}``, so that the steps
``s_x, s_w`` receive LSQ's gradients alongside the operands'.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxq.ops import Quantizer
    >>> x3 = jnp.array([[[0.4, -1.3, 2.0, 0.1]]])
    >>> lsq_operand(x3, Quantizer("int4"), jnp.float32(0.25)).tolist()
    [[[0.5, -1.25, 1.75, 0.0]]]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxq.ops import operand as O
from jaxq.ops.dims import Canonical
from jaxq.ops.spec import Recipe
from jaxq.quantization.fake_quant import lsq_quant

__all__ = ["lsq_operand", "lsq_product"]


def lsq_operand(x3, q, step):
    """The LSQ fake-quantized values of a canonical operand (float32; ``q=None``: as is)."""
    if q is None:
        return x3.astype(jnp.float32)
    x3 = x3.astype(jnp.float32)
    if q.granularity == "block":
        b, r, k = x3.shape
        bs = q.block_size
        y = lsq_quant(x3.reshape(b, r, k // bs, bs), step, q.fmt)
        return y.reshape(b, r, k)
    return lsq_quant(x3, step, q.fmt)


@functools.partial(jax.jit, static_argnums=(4, 5))
@functools.partial(jax.checkpoint, static_argnums=(4, 5))
def lsq_product(lhs, rhs, lhs_step, rhs_step, canon: Canonical, recipe: Recipe):
    """The fake-quantized product of learned-step recipes. Rematerialized: the backward
    pass keeps the operands and steps only and recomputes the quantized values."""
    xv = lsq_operand(canon.lhs(lhs), recipe.lhs, lhs_step)
    wv = lsq_operand(canon.rhs(rhs), recipe.rhs, rhs_step)
    y3 = jax.lax.dot_general(
        xv, wv, O._CANON, precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )  # fmt: skip
    return canon.out(y3)
