"""Public registry of scalify rules: ``jaxq.scaled_rules.register(primitive, rule)``.

A rule is ``rule(*args, **params)``: the primitive's operands (``ScaledArray`` where
scaled) and the equation's parameters; it returns the primitive's result(s), as
``ScaledArray`` where it chooses. See :mod:`jaxq.scaled.registry` for the contract.

Example:
    >>> import jax.numpy as jnp
    >>> from jax import lax
    >>> from jaxq.scaled import ScaledArray, as_scaled_array, scalify
    >>> def cbrt_rule(x, **params):  # cbrt(d * s) = cbrt(d) * cbrt(s)
    ...     return ScaledArray(lax.cbrt(x.data, **params), x.scale ** (1 / 3))
    >>> register(lax.cbrt_p, cbrt_rule, override=True)  # replaces the built-in rule
    >>> y = scalify(lax.cbrt)(as_scaled_array(jnp.full(2, 8.0)))
    >>> round(float(y.data[0] * y.scale), 4)
    2.0
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
