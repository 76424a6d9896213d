"""The scaled world: ``ScaledArray`` tensors and the ``scalify`` transform.

A ``ScaledArray`` stores a tensor as ``data * scale`` so that the data stays near unit
range whatever the value's magnitude; ``scalify(fn)`` runs ``fn`` on such tensors by
interpreting its jaxpr with one rule per primitive (the Scalify scheme of Graphcore,
extended with per-block scales and rules for everything a transformer training step
uses). Add or replace rules with :mod:`jaxq.scaled.rules`.

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
