"""Parameter tags for u-muP: every unit-scaled parameter is a :class:`UParam`.

``UParam`` is an ``nnx.Param`` subclass (so ``nnx.Param`` filters, ``nnx.split`` and
``nnx.Optimizer`` treat it as a parameter) carrying three metadata fields:

* ``role``: ``"weight"`` (hidden matmul weights and the embedding table), ``"bias"``,
  ``"norm"`` (normalisation gains) or ``"output"`` (the readout weight);
* ``fan_in``: the width the u-muP learning-rate rule divides by (for the embedding table
  it is the model width, as in u-muP);
* ``depth``: the number of transformer layers of the residual stack the parameter lives
  in, or ``None`` outside the stack.

:func:`param_tags` reads them back as ``{path: ParamTag}``, with ``path`` the tuple of
attribute names / list indices of the parameter (the same path in the model, in
``nnx.state(model)`` and in the gradient pytree), which is what
:func:`jaxq.unit_scaling.optim.adamw` consumes.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
from flax import nnx

__all__ = ["ROLES", "UParam", "ParamTag", "uparam", "param_tags", "path_key"]

Role = Literal["weight", "bias", "norm", "output"]
ROLES: tuple[str, ...] = ("weight", "bias", "norm", "output")


class UParam(nnx.Param):
    """An ``nnx.Param`` with u-muP metadata ``role``, ``fan_in`` and ``depth``.

    Create it with :func:`uparam` (which validates the tags).
    """


@dataclasses.dataclass(frozen=True)
class ParamTag:
    """The u-muP tags of one parameter (see the module docstring)."""

    role: Role
    fan_in: int
    depth: int | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if isinstance(self.fan_in, bool) or not isinstance(self.fan_in, int) or self.fan_in < 1:
            raise ValueError(f"fan_in must be a positive int, got {self.fan_in!r}")
        if self.depth is not None and (not isinstance(self.depth, int) or self.depth < 1):
            raise ValueError(f"depth must be None or a positive int, got {self.depth!r}")


def uparam(value: jax.Array, *, role: Role, fan_in: int, depth: int | None = None) -> UParam:
    """Creates a tagged parameter.

    Example:
        >>> import jax.numpy as jnp
        >>> p = uparam(jnp.ones((4, 8)), role="weight", fan_in=4, depth=2)
        >>> p.role, p.fan_in, p.depth
        ('weight', 4, 2)
    """
    tag = ParamTag(role, fan_in, depth)
    return UParam(value, role=tag.role, fan_in=tag.fan_in, depth=tag.depth)


def path_key(path) -> tuple:
    """Normalises a JAX key path to a tuple of names/indices (drops a trailing ``.value``)."""
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(k.idx)
        elif isinstance(k, jax.tree_util.GetAttrKey):
            out.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            out.append(k.key)
        else:
            out.append(str(k))
    if out and out[-1] == "value":
        out.pop()
    return tuple(out)


def param_tags(model_or_state) -> dict[tuple, ParamTag]:
    """``{path: ParamTag}`` for every :class:`UParam` of an ``nnx.Module`` or ``nnx.State``.

    Plain ``nnx.Param`` leaves (untagged) are not included.

    Example:
        >>> from flax import nnx
        >>> from jaxq.unit_scaling import Linear
        >>> param_tags(Linear(4, 8, rngs=nnx.Rngs(0)))
        {('weight',): ParamTag(role='weight', fan_in=4, depth=None)}
    """
    state = model_or_state
    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state, nnx.Param)
    leaves = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    tags = {}
    for path, leaf in leaves:
        if isinstance(leaf, UParam):
            md = leaf.get_metadata()
            tags[path_key(path)] = ParamTag(md["role"], md["fan_in"], md.get("depth"))
    return tags
