"""The two unit-scaling primitives and the scale-constraint rules.

Unit scaling (Blake et al., 2023) multiplies each op's output by a constant chosen so
that, for unit-variance inputs, the output has unit variance, and multiplies each input's
gradient by a (generally different) constant chosen so that, for a unit-variance
incoming gradient, the input gradient has unit variance. Two primitives make the forward
and backward factors independent:

* ``scale_fwd(x, s)``: forward ``y = s * x``; backward passes the gradient unchanged.
* ``scale_bwd(x, s)``: forward ``y = x``; backward multiplies the gradient by ``s``.

When forward and backward factors differ, the computed gradient is no longer the exact
gradient of the computed forward. A *constraint* ties the factors of an op together so
that the gradient stays exact (up to a global constant) where that matters:

==========================  ================================================================
``"to_output_scale"``       every factor := the output factor (the default)
``"to_grad_input_scale"``   every factor := the geometric mean of the input-gradient factors
``"gmean"``                 every factor := the geometric mean of all factors
``None``                    unconstrained: each factor keeps its own unit-scaling value
==========================  ================================================================

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxq.unit_scaling import scale_fwd, scale_bwd
    >>> float(scale_fwd(jnp.float32(3.0), 2.0))
    6.0
    >>> float(jax.grad(lambda x: scale_bwd(x, 0.5) * 4.0)(1.0))
    2.0
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

__all__ = ["scale_fwd", "scale_bwd", "Constraint", "CONSTRAINTS", "apply_constraint"]

Constraint = Literal["to_output_scale", "to_grad_input_scale", "gmean"] | None
CONSTRAINTS: tuple[Constraint, ...] = ("to_output_scale", "to_grad_input_scale", "gmean", None)


def _check_scale(s, name: str):
    if isinstance(s, bool) or not isinstance(s, (int, float, jax.Array)):
        raise TypeError(f"{name}: scale must be a Python number or a scalar array, got {type(s)}")
    if isinstance(s, jax.Array) and s.ndim != 0:
        raise ValueError(f"{name}: scale must be a scalar, got shape {s.shape}")
    if isinstance(s, (int, float)) and not (math.isfinite(s) and s > 0):
        raise ValueError(f"{name}: scale must be finite and positive, got {s}")


@jax.custom_vjp
def _scale_fwd(x, s):
    return x * jnp.asarray(s, x.dtype)


def _scale_fwd_fwd(x, s):
    return _scale_fwd(x, s), s


def _scale_fwd_bwd(s, g):
    return g, jnp.zeros_like(s)


_scale_fwd.defvjp(_scale_fwd_fwd, _scale_fwd_bwd)


@jax.custom_vjp
def _scale_bwd(x, s):
    return x


def _scale_bwd_fwd(x, s):
    return x, s


def _scale_bwd_bwd(s, g):
    return g * jnp.asarray(s, g.dtype), jnp.zeros_like(s)


_scale_bwd.defvjp(_scale_bwd_fwd, _scale_bwd_bwd)


def scale_fwd(x: jax.Array, s: float | jax.Array) -> jax.Array:
    """Scales ``x`` by ``s`` in the forward pass only.

    .. math:: y = s\\,x, \\qquad \\partial L/\\partial x := \\partial L/\\partial y

    Args:
        x: any floating array.
        s: a positive Python number (checked) or a float scalar array (traced, not checked).
            No gradient flows to ``s``.

    Returns:
        ``s * x`` in ``x``'s dtype.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> float(jax.grad(lambda x: scale_fwd(x, 8.0))(1.0))
        1.0
    """
    _check_scale(s, "scale_fwd")
    return _scale_fwd(jnp.asarray(x), jnp.asarray(s, jnp.float32))


def scale_bwd(x: jax.Array, s: float | jax.Array) -> jax.Array:
    """Identity in the forward pass; scales the gradient by ``s`` in the backward pass.

    .. math:: y = x, \\qquad \\partial L/\\partial x := s\\,\\partial L/\\partial y

    Args:
        x: any floating array.
        s: a positive Python number (checked) or a float scalar array (traced, not checked).

    Returns:
        ``x`` unchanged.

    Example:
        >>> import jax
        >>> float(jax.grad(lambda x: scale_bwd(x, 8.0))(1.0))
        8.0
    """
    _check_scale(s, "scale_bwd")
    return _scale_bwd(jnp.asarray(x), jnp.asarray(s, jnp.float32))


def _gmean(scales) -> float:
    return math.exp(sum(math.log(s) for s in scales) / len(scales))


def apply_constraint(
    constraint: Constraint, output_scale: float, *grad_input_scales: float
) -> tuple[float, ...]:
    """Ties an op's forward and backward scale factors together.

    Args:
        constraint: one of :data:`CONSTRAINTS` (see the module docstring).
        output_scale: the unit-scaling factor of the op's output.
        *grad_input_scales: the unit-scaling factors of the gradients of the op's inputs
            that lie on the propagation path (weight gradients are never constrained).

    Returns:
        ``(output_scale, *grad_input_scales)`` after the constraint.

    Raises:
        ValueError: if ``constraint`` is not one of :data:`CONSTRAINTS`.

    Example:
        >>> apply_constraint("gmean", 4.0, 1.0)
        (2.0, 2.0)
        >>> apply_constraint(None, 4.0, 1.0)
        (4.0, 1.0)
    """
    scales = (output_scale, *grad_input_scales)
    if constraint is None:
        return tuple(float(s) for s in scales)
    if constraint == "to_output_scale":
        s = output_scale
    elif constraint == "to_grad_input_scale":
        s = _gmean(grad_input_scales)
    elif constraint == "gmean":
        s = _gmean(scales)
    else:
        raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {constraint!r}")
    return (float(s),) * len(scales)
