"""Wrapping Flax models for low-precision training: rules matched on module paths.

``jaxq.quantize_model(model, rules)`` wraps an NNX model (:mod:`jaxq.wrapping.nnx`: a copy
whose selected layers compute with :mod:`jaxq.ops`, recipe state in :class:`QuantState`
variables) or a Linen module (:mod:`jaxq.wrapping.linen`: same ``init``/``apply``, recipe
state in the ``"jaxq"`` collection). Layers are chosen by :class:`Rule` regexes on their
module paths, first match wins, as in qwix.

Example:
    >>> import jax.numpy as jnp, jaxq
    >>> from flax import nnx
    >>> model = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    >>> q = jaxq.quantize_model(model, [jaxq.Rule(".*", recipe=jaxq.recipes.MXFP8())])
    >>> q(jnp.ones((2, 64))).shape
    (2, 32)
"""

import flax.linen as nn
from flax import nnx as _nnx

from jaxq.wrapping.checkpoint import check_signature, restore, save, signature
from jaxq.wrapping.linen import COLLECTION, quantize_linen
from jaxq.wrapping.nnx import (
    QuantState,
    layers,
    learned_steps_of,
    quantize_nnx,
    unused_rules,
    update_state,
    value_and_grad,
)
from jaxq.wrapping.rules import OPS, Rule, match, unused_among


def quantize_model(model, rules, *, key=None):
    """Wraps a Flax NNX module (:func:`quantize_nnx`) or Linen module (:func:`quantize_linen`).

    Raises:
        TypeError: ``model`` is neither.
    """
    if isinstance(model, _nnx.Module):
        return quantize_nnx(model, rules, key=key)
    if isinstance(model, nn.Module):
        return quantize_linen(model, rules, key=key)
    raise TypeError(f"quantize_model: model must be a Flax NNX or Linen module, got {model!r}")


__all__ = [
    "Rule", "OPS", "match", "unused_among", "unused_rules", "quantize_model", "quantize_nnx",
    "quantize_linen", "COLLECTION", "QuantState", "layers", "learned_steps_of", "update_state",
    "value_and_grad", "signature", "check_signature", "save", "restore",
]  # fmt: skip
