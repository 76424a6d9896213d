"""Public registry of scalify rules: ``jaxq.scaled_rules.register(primitive, rule)``.

A rule is ``rule(*args, **params)``: the primitive's operands (``ScaledArray`` where
scaled) and the equation's parameters; it returns the primitive's result(s), as
``ScaledArray`` where it chooses. See :mod:`jaxq.scaled.registry` for the contract.

Example:
    >>> import jax.numpy as jnp
    >>> from jax import lax
    >>> from jaxq.scaled import ScaledArray, as_scaled_array, scalify
    >>> register(lax.cbrt_p, lambda x: ScaledArray(lax.cbrt(x.data), x.scale ** (1 / 3)),
    ...          override=True)
    >>> y = scalify(lax.cbrt)(as_scaled_array(jnp.full(2, 8.0)))
    >>> restore(lax.cbrt_p)
"""

from jaxq.scaled.registry import (
    Rule,
    ScalifyRuleError,
    get_rule,
    register,
    registered,
    restore,
    unregister,
)

__all__ = [
    "register",
    "get_rule",
    "unregister",
    "registered",
    "restore",
    "Rule",
    "ScalifyRuleError",
]
