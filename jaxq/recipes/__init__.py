"""Low-precision training recipes as explicit functional state.

A recipe (:class:`jaxq.ops.Recipe`) says how each operand of a matmul is quantized; the
named constructors below are the published recipes. State (amax histories, PRNG keys)
is a pytree made by ``recipe.init(key)`` and advanced by :func:`update` from what the op
observed (its gradient with respect to the state); learned step sizes are parameters made
by :func:`init_steps`.

Example:
    >>> import jax, jax.numpy as jnp, jaxq
    >>> r = jaxq.recipes.FP8Delayed(history_length=16)
    >>> state = r.init()
    >>> dn = (((1,), (0,)), ((), ()))
    >>> def loss(w, state, x):
    ...     return jaxq.ops.dot_general(x, w, dn, recipe=r, state=state).sum()
    >>> x, w = jnp.ones((4, 32)), jnp.ones((32, 8))
    >>> value, grads, state = jaxq.recipes.value_and_grad(loss)(w, state, x)
    >>> float(state.lhs_history[0]), float(state.grad_history[0])
    (1.0, 1.0)
"""

from jaxq.ops.spec import OpState, Quantizer, Recipe
from jaxq.recipes.named import (
    MXFP4,
    MXFP8,
    NAMED,
    NVFP4,
    FP8Blockwise,
    FP8Current,
    FP8Delayed,
    FP8Static,
    Int4,
    Int8,
    Ternary,
    WeightOnly,
)
from jaxq.recipes.state import init_steps, merge, update, value_and_grad

__all__ = [
    "Recipe", "Quantizer", "OpState",
    "FP8Current", "FP8Delayed", "FP8Static", "FP8Blockwise", "MXFP8", "MXFP4", "NVFP4",
    "Int8", "Int4", "Ternary", "WeightOnly", "NAMED",
    "update", "merge", "value_and_grad", "init_steps",
]  # fmt: skip
