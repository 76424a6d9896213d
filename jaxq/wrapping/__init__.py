"""Wrapping Flax models for low-precision training: rules matched on module paths.

``jaxq.quantize_model(model, rules)`` returns a copy of an NNX model whose selected layers
compute with :mod:`jaxq.ops` and a :mod:`jaxq.recipes` recipe; recipe state lives in
:class:`QuantState` variables. See :mod:`jaxq.wrapping.nnx`.

Example:
    >>> import jax.numpy as jnp, jaxq
    >>> from flax import nnx
    >>> model = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    >>> q = jaxq.quantize_model(model, [jaxq.Rule(".*", recipe=jaxq.recipes.MXFP8())])
    >>> q(jnp.ones((2, 64))).shape
    (2, 32)
"""

from jaxq.wrapping.nnx import (
    QuantState,
    layers,
    quantize_model,
    unused_rules,
    update_state,
    value_and_grad,
)
from jaxq.wrapping.rules import OPS, Rule, match, unused_among

__all__ = [
    "Rule", "OPS", "match", "unused_among", "unused_rules", "quantize_model", "QuantState",
    "layers", "update_state", "value_and_grad",
]  # fmt: skip
