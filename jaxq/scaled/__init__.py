"""The scaled world: ``ScaledArray`` tensors and the ``scalify`` transform.

A ``ScaledArray`` stores a tensor as ``data * scale`` so that the data stays near unit
range whatever the value's magnitude; ``scalify(fn)`` runs ``fn`` on such tensors by
interpreting its jaxpr with one rule per primitive (the Scalify scheme of Graphcore,
extended with per-block scales and rules for everything a transformer training step
uses). Add or replace rules with :mod:`jaxq.scaled.rules`.

Renormalization. The rules propagate scales statically, assuming unit-range data; where
that assumption fails (a matmul multiplies both operands' deviations, sums of correlated
terms and cancellations move the data but not the scale) the errors compound through a
backward pass. scalify therefore renormalizes automatically wherever data enters a
narrow-range dtype (float16, FP8; see :func:`jaxq.scaled.scales.narrow_range`): the
result is computed in float32 and :func:`jaxq.scaled.scales.renormalize` moves
``r(rms(data))`` into the scale *before* the narrowing cast, exactly and without changing
the value. The points are

* ``dot_general`` with a float16/FP8 result and ``reduce_sum`` of float16/FP8 data,
* ``cast_on_forward``/``cast_on_backward`` and conversions from float32/bfloat16 into
  float16/FP8,

and a plain floating array meeting a scaled one in ``mul``/``div``/``add`` brings
``r(max|c|)`` into the scale (how the loss's cotangent, a plain ``-1/N`` array after the
mean's transpose, enters the scaled world). Between two such points a transformer has a
handful of elementwise ops, whose drift stays far inside float16's normal range.
bfloat16 and float32 data share float32's exponent range and are never renormalized.
Users insert :func:`dynamic_rescale_l2` and friends (``*_grad`` for the backward pass)
where they want another norm than the RMS (e.g. ``dynamic_rescale_max`` before an E4M3
cast of a tensor with large outliers) or unit-range float32/bfloat16 data.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxq.scaled import as_scaled_array, asarray, scalify
    >>> w = as_scaled_array(jnp.full((4, 4), 2.0**-30))
    >>> loss, g = scalify(jax.value_and_grad(lambda w: jnp.sum(jnp.tanh(w))))(w)
    >>> float(asarray(loss)) == 16 * 2.0**-30
    True
"""

from jaxq.scaled import control as _control  # noqa: F401  (registers rules)
from jaxq.scaled import rules
from jaxq.scaled import rules_elementwise as _rules_elementwise  # noqa: F401
from jaxq.scaled import rules_structural as _rules_structural  # noqa: F401
from jaxq.scaled.array import (
    ScaledArray,
    as_scaled_array,
    asarray,
    block_shape,
    expand_scale,
    is_scaled,
    to_scalar_scale,
)
from jaxq.scaled.interpreter import scalify
from jaxq.scaled.ops import (
    cast_on_backward,
    cast_on_forward,
    dynamic_rescale_l1,
    dynamic_rescale_l1_grad,
    dynamic_rescale_l2,
    dynamic_rescale_l2_grad,
    dynamic_rescale_max,
    dynamic_rescale_max_grad,
    set_scaling,
    stop_scaling,
)
from jaxq.scaled.rules import ScalifyRuleError
from jaxq.scaled.scales import pow2_round

__all__ = [
    "ScaledArray", "as_scaled_array", "asarray", "is_scaled", "scalify", "rules",
    "ScalifyRuleError", "block_shape", "expand_scale", "to_scalar_scale", "pow2_round",
    "set_scaling", "stop_scaling",
    "dynamic_rescale_l1", "dynamic_rescale_l2", "dynamic_rescale_max",
    "dynamic_rescale_l1_grad", "dynamic_rescale_l2_grad", "dynamic_rescale_max_grad",
    "cast_on_forward", "cast_on_backward",
]  # fmt: skip
