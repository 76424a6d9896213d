"""Bringing any ``dot_general`` to the canonical ``(B, M, K) × (B, N, K) → (B, M, N)``.

For ``lhs`` with batch axes ``lb``, contracting axes ``lc`` and free axes ``lf`` (in
order), the canonical view is ``lhs.transpose(lb + lf + lc).reshape(B, M, K)``; likewise
``rhs`` becomes ``(B, N, K)``. ``lax.dot_general``'s output ``batch + lhs free + rhs free``
is then exactly ``(B, M, N)`` reshaped, and the gradients map back by the inverse
permutation.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

__all__ = ["Canonical", "canonicalize", "normalize_dimension_numbers"]


def normalize_dimension_numbers(dimension_numbers, op: str = "dot_general"):
    """``((lc, rc), (lb, rb))`` as nested tuples of Python ints."""
    try:
        (lc, rc), (lb, rb) = dimension_numbers
        contract = (tuple(map(int, lc)), tuple(map(int, rc)))
        return contract, (tuple(map(int, lb)), tuple(map(int, rb)))
    except (TypeError, ValueError):
        raise ValueError(
            f"{op}: dimension_numbers must be ((lhs_contract, rhs_contract), "
            f"(lhs_batch, rhs_batch)), got {dimension_numbers!r}"
        ) from None


@dataclasses.dataclass(frozen=True)
class Canonical:
    """Static description of one ``dot_general``'s canonical view (hashable)."""

    lhs_shape: tuple[int, ...]
    rhs_shape: tuple[int, ...]
    lhs_perm: tuple[int, ...]
    rhs_perm: tuple[int, ...]
    b: int
    m: int
    n: int
    k: int
    out_shape: tuple[int, ...]

    def lhs(self, x: jax.Array) -> jax.Array:
        return x.transpose(self.lhs_perm).reshape(self.b, self.m, self.k)

    def rhs(self, x: jax.Array) -> jax.Array:
        return x.transpose(self.rhs_perm).reshape(self.b, self.n, self.k)

    def out(self, y3: jax.Array) -> jax.Array:
        return y3.reshape(self.out_shape)

    def out3(self, g: jax.Array) -> jax.Array:
        return g.reshape(self.b, self.m, self.n)

    def lhs_back(self, dx3: jax.Array) -> jax.Array:
        shape = tuple(self.lhs_shape[i] for i in self.lhs_perm)
        return dx3.reshape(shape).transpose(np.argsort(self.lhs_perm))

    def rhs_back(self, dw3: jax.Array) -> jax.Array:
        shape = tuple(self.rhs_shape[i] for i in self.rhs_perm)
        return dw3.reshape(shape).transpose(np.argsort(self.rhs_perm))


def canonicalize(lhs_shape, rhs_shape, dimension_numbers, op: str = "dot_general") -> Canonical:
    """The canonical view of ``dot_general(lhs, rhs, dimension_numbers)``.

    Raises:
        ValueError: axes out of range, repeated, or of mismatched sizes, naming the op and
            both shapes.
    """
    (lc, rc), (lb, rb) = normalize_dimension_numbers(dimension_numbers, op)
    lhs_shape, rhs_shape = tuple(lhs_shape), tuple(rhs_shape)
    where = f"{op}: lhs {lhs_shape} x rhs {rhs_shape} with dimension_numbers {((lc, rc), (lb, rb))}"
    for name, axes, nd in (("lhs", lc + lb, len(lhs_shape)), ("rhs", rc + rb, len(rhs_shape))):
        if any(not 0 <= a < nd for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"{where}: {name} axes must be distinct and in [0, {nd})")
    if len(lc) != len(rc) or len(lb) != len(rb):
        raise ValueError(f"{where}: lhs and rhs need as many contracting and batch axes")
    for kind, la, ra in (("contracting", lc, rc), ("batch", lb, rb)):
        ls, rs = [lhs_shape[a] for a in la], [rhs_shape[a] for a in ra]
        if ls != rs:
            raise ValueError(f"{where}: {kind} sizes differ, lhs {ls} vs rhs {rs}")
    lf = tuple(i for i in range(len(lhs_shape)) if i not in lc and i not in lb)
    rf = tuple(i for i in range(len(rhs_shape)) if i not in rc and i not in rb)

    def size(shape, axes):
        return math.prod(shape[a] for a in axes)

    return Canonical(
        lhs_shape=lhs_shape,
        rhs_shape=rhs_shape,
        lhs_perm=lb + lf + lc,
        rhs_perm=rb + rf + rc,
        b=size(lhs_shape, lb),
        m=size(lhs_shape, lf),
        n=size(rhs_shape, rf),
        k=size(lhs_shape, lc),
        out_shape=tuple(lhs_shape[a] for a in lb + lf) + tuple(rhs_shape[a] for a in rf),
    )
