"""Rules that choose a recipe for each layer of a model, by its module path.

A module path is the names from the model's root to the layer joined by ``/`` (``"blocks/0/
attn/qkv"``; list indices are numbers). The first rule whose ``module_path`` regex matches
the *whole* path and whose ``op`` (if given) is the layer's op applies; ``recipe=None``
keeps the layer in high precision.
"""

from __future__ import annotations

import dataclasses
import re

from jaxq.ops.spec import Recipe

__all__ = ["Rule", "OPS", "match", "unused_among"]

OPS = ("dot_general", "einsum", "conv", "ragged_dot")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One wrapping rule.

    Attributes:
        module_path: a regular expression matched against the whole module path.
        op: ``None`` (any) or one of ``"dot_general"``, ``"einsum"``, ``"conv"``,
            ``"ragged_dot"``.
        recipe: a :class:`jaxq.ops.Recipe`, or ``None`` to keep matching layers in high
            precision.

    Raises:
        ValueError: a regex that does not compile, or an unknown op.
        TypeError: a recipe that is not a ``Recipe``.

    Example:
        >>> import jaxq
        >>> rules = [jaxq.Rule(r".*head.*", recipe=None),
        ...          jaxq.Rule(r".*", recipe=jaxq.recipes.FP8Current())]
        >>> rules[0].matches("decoder/head", "dot_general")
        True
    """

    module_path: str
    op: str | None = None
    recipe: Recipe | None = None

    def __post_init__(self):
        try:
            pattern = re.compile(self.module_path)
        except (re.error, TypeError) as e:
            raise ValueError(
                f"Rule module_path {self.module_path!r} is not a valid regular expression: {e}"
            ) from None
        object.__setattr__(self, "_pattern", pattern)
        if self.op is not None and self.op not in OPS:
            raise ValueError(f"Rule op must be None or one of {OPS}, got {self.op!r}")
        if self.recipe is not None and not isinstance(self.recipe, Recipe):
            raise TypeError(
                f"Rule recipe must be a jaxq.recipes recipe or None, got {self.recipe!r}"
            )

    def matches(self, path: str, op: str) -> bool:
        return (self.op is None or self.op == op) and self._pattern.fullmatch(path) is not None


def match(rules, path: str, op: str) -> tuple[int, Rule] | None:
    """The first rule matching ``path`` and ``op``, with its index, or ``None``."""
    for i, rule in enumerate(rules):
        if rule.matches(path, op):
            return i, rule
    return None


def unused_among(rules, paths_and_ops) -> list[Rule]:
    """The rules that matched no layer among ``(path, op)`` pairs (first match wins).

    Example:
        >>> rules = [Rule("mlp/.*"), Rule("nothing")]
        >>> unused_among(rules, [("mlp/up", "dot_general")])
        [Rule(module_path='nothing', op=None, recipe=None)]
    """
    hit = set()
    for path, op in paths_and_ops:
        m = match(rules, path, op)
        if m is not None:
            hit.add(m[0])
    return [r for i, r in enumerate(rules) if i not in hit]
