"""The scalify rule registry, ``jaxq.scaled.rules``: one rule per JAX primitive.

A rule is called as ``rule(*args, **params)`` where ``args`` are the primitive's operands
(``ScaledArray`` where scaled, ordinary arrays otherwise; at least one is scaled) and
``params`` the equation's parameters. It returns what the primitive returns, with
``ScaledArray`` in place of arrays wherever it chooses: one value, or a list for
primitives with multiple results. The interpreter checks that every output's data has the
shape and dtype the primitive would produce and raises :class:`ScalifyRuleError` otherwise.

Example:
    >>> from jax import lax
    >>> from jaxq.scaled import ScaledArray
    >>> def my_neg(x):
    ...     return ScaledArray(-x.data, x.scale)
    >>> register(lax.neg_p, my_neg, override=True)  # replaces the built-in rule
    >>> restore(lax.neg_p)  # back to the built-in rule
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = [
    "Rule", "register", "get_rule", "unregister", "registered", "restore", "ScalifyRuleError",
]  # fmt: skip


class ScalifyRuleError(ValueError, TypeError):
    """A scalify rule returned outputs of the wrong shape, dtype or number."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """A registered rule.

    Attributes:
        fn: the rule, ``fn(*args, **params)``.
        block_scales: whether ``fn`` accepts ``ScaledArray`` operands with per-block
            scales. When False the interpreter first re-expresses such operands with a
            scalar scale (:func:`jaxq.scaled.array.to_scalar_scale`).
        out_avals: whether ``fn`` also receives ``out_avals=``, the tuple of the
            equation's output abstract values (shape and dtype of each result), for
            rules that must tell a primitive's operand groups apart from shapes alone.
    """

    fn: Callable[..., Any]
    block_scales: bool = False
    out_avals: bool = False


_RULES: dict[str, Rule] = {}
_BUILTIN: dict[str, Rule] = {}


def _name(primitive: Any) -> str:
    if isinstance(primitive, str):
        return primitive
    name = getattr(primitive, "name", None)
    if not isinstance(name, str):
        raise TypeError(
            f"primitive must be a jax Primitive or its name, got {type(primitive).__name__}"
        )
    return name


def register(
    primitive: Any,
    rule: Callable[..., Any],
    *,
    override: bool = False,
    block_scales: bool = False,
) -> None:
    """Registers ``rule`` as the scalify rule of ``primitive``.

    Args:
        primitive: a ``jax.extend.core.Primitive`` (e.g. ``jax.lax.exp_p``) or its name.
        rule: ``rule(*args, **params)``, see the module docstring.
        override: replace an existing rule; without it a duplicate raises.
        block_scales: the rule handles per-block scales itself.

    Raises:
        ValueError: ``primitive`` already has a rule and ``override`` is False.
        TypeError: ``rule`` is not callable or ``primitive`` is neither a primitive nor a
            string.

    Example:
        >>> import jax
        >>> register("my_op", lambda x, **p: x, override=True)
    """
    name = _name(primitive)
    if not callable(rule):
        raise TypeError(f"rule for primitive {name!r} must be callable, got {type(rule).__name__}")
    if name in _RULES and not override:
        raise ValueError(
            f"primitive {name!r} already has a scalify rule; pass override=True to replace it"
        )
    _RULES[name] = Rule(rule, block_scales)


def _register_builtin(
    primitive: Any, rule: Callable[..., Any], *, block_scales: bool = False, out_avals=False
):
    name = _name(primitive)
    _RULES[name] = _BUILTIN[name] = Rule(rule, block_scales, out_avals)


def restore(primitive: Any) -> None:
    """Reinstates the built-in rule of ``primitive`` after an override.

    Raises:
        KeyError: ``primitive`` has no built-in rule.
    """
    name = _name(primitive)
    if name not in _BUILTIN:
        raise KeyError(f"primitive {name!r} has no built-in scalify rule")
    _RULES[name] = _BUILTIN[name]


def unregister(primitive: Any) -> None:
    """Removes the rule of ``primitive`` (no error if there is none)."""
    _RULES.pop(_name(primitive), None)


def get_rule(primitive: Any) -> Rule | None:
    """The rule registered for ``primitive`` (object or name), or None."""
    return _RULES.get(_name(primitive))


def registered() -> tuple[str, ...]:
    """Names of all primitives with a rule, sorted."""
    return tuple(sorted(_RULES))
