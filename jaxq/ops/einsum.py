"""``jaxq.ops.einsum``: a two-operand einsum through :func:`jaxq.ops.dot_general`.

The subscripts are parsed into ``dot_general`` dimension numbers: labels in both operands
and in the output are batch axes, labels in both operands only are contracted, the others
are free. A label that appears in one operand only and not in the output is summed out
before the product. ``...`` is supported; repeated labels within one operand (diagonals)
are not.
"""

from __future__ import annotations

import functools
import string

import jax
import jax.numpy as jnp

from jaxq.ops.dot_general import dot_general
from jaxq.ops.spec import OpState, Recipe

__all__ = ["einsum", "einsum_with"]


def _expand_ellipsis(terms: list[str], ndims: list[int], out: str | None, spec: str):
    used = set("".join(terms) + (out or ""))
    free = [c for c in string.ascii_letters if c not in used]
    n_ell = 0
    for t, nd in zip(terms, ndims, strict=True):
        if "..." in t:
            n_ell = max(n_ell, nd - (len(t) - 3))
    ell = "".join(free[:n_ell])
    new_terms = []
    for t, nd in zip(terms, ndims, strict=True):
        if "..." in t:
            k = nd - (len(t) - 3)
            t = t.replace("...", ell[n_ell - k :])
        new_terms.append(t)
    if out is not None:
        out = out.replace("...", ell)
    return new_terms, out, ell


def _parse(spec: str, lhs_ndim: int, rhs_ndim: int):
    spec = spec.replace(" ", "")
    if "->" in spec:
        ins, out = spec.split("->")
    else:
        ins, out = spec, None
    terms = ins.split(",")
    if len(terms) != 2:
        raise ValueError(f"jaxq.ops.einsum takes exactly two operands, got subscripts {spec!r}")
    terms, out, ell = _expand_ellipsis(terms, [lhs_ndim, rhs_ndim], out, spec)
    a, b = terms
    for name, t, nd in (("lhs", a, lhs_ndim), ("rhs", b, rhs_ndim)):
        if len(t) != nd:
            raise ValueError(
                f"jaxq.ops.einsum {spec!r}: {name} subscripts {t!r} name {len(t)} axes, "
                f"but the operand has {nd}"
            )
        if len(set(t)) != len(t):
            raise ValueError(f"jaxq.ops.einsum {spec!r}: repeated labels in {t!r} (diagonals) "
                             "are not supported")  # fmt: skip
    if out is None:  # implicit output: labels appearing once, sorted, after the ellipsis
        counts = {c: (a + b).count(c) for c in a + b}
        out = ell + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell))
    return a, b, out


def einsum(
    subscripts: str,
    lhs: jax.Array,
    rhs: jax.Array,
    *,
    recipe: Recipe | None,
    state: OpState | None = None,
    steps: dict | None = None,
    precision=None,
    preferred_element_type=None,
    **unused,
) -> jax.Array:
    """``jnp.einsum(subscripts, lhs, rhs)`` computed by :func:`jaxq.ops.dot_general`.

    ``functools.partial(jaxq.ops.einsum, recipe=r)`` fits ``nnx.Einsum``'s ``einsum_op``.

    Args:
        subscripts: two-operand einsum subscripts, with or without ``->``.
        lhs, rhs: the operands (``rhs`` is the weight in a Flax layer).
        recipe, state, steps: as for :func:`jaxq.ops.dot_general`.
        precision, preferred_element_type: as for ``jnp.einsum``.
        **unused: ``jnp.einsum``'s remaining keywords (``optimize``, ``out_sharding``...),
            which do not change a two-operand product.

    Example:
        >>> import jax, jax.numpy as jnp, jaxq
        >>> x = jax.random.normal(jax.random.key(0), (2, 16, 64))
        >>> w = jax.random.normal(jax.random.key(1), (64, 4, 8))
        >>> y = jaxq.ops.einsum("btd,dhk->bthk", x, w, recipe=jaxq.recipes.FP8Current())
        >>> y.shape
        (2, 16, 4, 8)
    """
    dot = functools.partial(dot_general, recipe=recipe, state=state, steps=steps)
    return einsum_with(dot, subscripts, lhs, rhs, precision=precision,
                       preferred_element_type=preferred_element_type)  # fmt: skip


def einsum_with(dot, subscripts: str, lhs, rhs, *, precision=None, preferred_element_type=None):
    """``jnp.einsum(subscripts, lhs, rhs)`` computed by ``dot``, any function with
    :func:`jax.lax.dot_general`'s signature (the lowering :func:`einsum` uses)."""
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    a, b, out = _parse(subscripts, lhs.ndim, rhs.ndim)
    for name, t in (("output", out),):
        if len(set(t)) != len(t) or any(c not in a + b for c in t):
            raise ValueError(f"jaxq.ops.einsum {subscripts!r}: bad {name} subscripts {t!r}")
    # Sum out labels that appear in one operand only and not in the output.
    lone_a = [i for i, c in enumerate(a) if c not in b and c not in out]
    if lone_a:
        lhs = jnp.sum(lhs, axis=tuple(lone_a))
        a = "".join(c for i, c in enumerate(a) if i not in lone_a)
    lone_b = [i for i, c in enumerate(b) if c not in a and c not in out]
    if lone_b:
        rhs = jnp.sum(rhs, axis=tuple(lone_b))
        b = "".join(c for i, c in enumerate(b) if i not in lone_b)
    batch = [c for c in a if c in b and c in out]
    contract = [c for c in a if c in b and c not in out]
    dn = (
        (tuple(a.index(c) for c in contract), tuple(b.index(c) for c in contract)),
        (tuple(a.index(c) for c in batch), tuple(b.index(c) for c in batch)),
    )
    y = dot(lhs, rhs, dn, precision, preferred_element_type)
    produced = batch + [c for c in a if c not in b] + [c for c in b if c not in a]
    return jnp.transpose(y, tuple(produced.index(c) for c in out))
