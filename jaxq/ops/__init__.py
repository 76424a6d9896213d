"""Quantized matmuls with their own VJP: ``dot_general``, ``einsum``, ``conv_general_dilated``
and ``ragged_dot``, each taking a keyword-only ``recipe=`` (and ``state=``, ``steps=``).

``functools.partial(jaxq.ops.dot_general, recipe=r)`` drops into any Flax layer's
``dot_general`` slot; :func:`einsum` fits ``nnx.Einsum``'s ``einsum_op``;
:func:`conv_general_dilated` fits a conv layer's ``conv_general_dilated``. Recipes and
their state are in :mod:`jaxq.recipes`; :func:`hadamard` is the fast Walsh–Hadamard
transform.

Example:
    >>> import functools, jax, jax.numpy as jnp, jaxq
    >>> from flax import nnx
    >>> dot = functools.partial(jaxq.ops.dot_general, recipe=jaxq.recipes.MXFP8())
    >>> layer = nnx.Linear(64, 32, dot_general=dot, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((4, 64))).shape
    (4, 32)
"""

from jaxq.ops.bilinear import conv_general_dilated, ragged_dot
from jaxq.ops.dot_general import check_state, dot_general, residual_nbytes
from jaxq.ops.einsum import einsum
from jaxq.ops.hadamard import hadamard
from jaxq.ops.operand import compute_path
from jaxq.ops.spec import OpState, Quantizer, Recipe

__all__ = [
    "dot_general", "einsum", "conv_general_dilated", "ragged_dot", "hadamard",
    "Recipe", "Quantizer", "OpState", "residual_nbytes", "check_state", "compute_path",
]  # fmt: skip
