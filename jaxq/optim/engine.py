"""The per-leaf machinery shared by every quantized-state optimizer.

An optimizer is a function ``step(g, moments) -> (update, new_moments)`` on float32 arrays
of one parameter's shape, plus one codec per moment. The engine

* at ``init`` chooses, per parameter, quantized or float32 state (see
  :func:`jaxq.optim.common.quantize_mask`) and places quantized state on the parameter's
  mesh with the parameter's partitioning;
* at ``update`` decodes each moment to float32, runs ``step``, and encodes the new float32
  moments with fresh block scales (the update itself comes from the float32 moments);
* guards non-finite gradients: a non-finite element contributes no update (0) and leaves
  its moments at their previous values, so no NaN/inf ever reaches stored state; finite
  gradients are clipped to ``|g| <= 2**63`` so squared gradients cannot overflow.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxq.optim import codecs as cd
from jaxq.optim.common import quantize_mask, sanitize

Codecs = Callable[[int], Sequence[Any]]  # ndim -> one codec per moment


def init_moments(params, codecs: Codecs, n: int, *, keep_fp32, min_quantized_size: int):
    """One pytree per moment: codec state where quantized, float32 zeros elsewhere."""
    qmask = quantize_mask(params, keep_fp32, min_quantized_size)

    def leaf(p, q, k):
        if not q:
            return jnp.zeros_like(p, dtype=jnp.float32)
        codec = codecs(p.ndim)[k]
        return cd.place_like(p, codec.init(p.shape), codec.dims(p.ndim))

    return tuple(jax.tree.map(lambda p, q, k=k: leaf(p, q, k), params, qmask) for k in range(n))


def _is_quantized(s) -> bool:
    return isinstance(s, (cd.QuantizedMoment, cd.Rank1Moment))


def step_moments(updates, moments: Sequence[Any], codecs: Codecs, step: Callable):
    """Applies ``step`` leaf by leaf; returns ``(updates, new_moments)`` (same structures).

    For a leaf with quantized state the float32 moments are never stored: the step is
    traced once per consumer -- each scale reduction of each codec, each encoder and the
    update -- with its own private copy of the decoding tables
    (:func:`jaxq.optim.maps.table_lookup`), so XLA fuses decode, step and consumer into
    one loop each. Every copy computes the same float32 values, so the numerics are those
    of a single decode -> step -> encode.
    """
    n = len(moments)

    def leaf(g, *states):
        shape = g.shape
        cs = [codecs(g.ndim)[k] if _is_quantized(s) else None for k, s in enumerate(states)]

        def fresh(copy: int):
            g32, finite = sanitize(g)
            old = [
                s if c is None else c.decode(s, shape, copy=copy)
                for s, c in zip(states, cs, strict=True)
            ]
            u, new = step(g32, old)
            new = [jnp.where(finite, m, o) for m, o in zip(new, old, strict=True)]
            return jnp.where(finite, u, 0.0).astype(g.dtype), new

        u, new = fresh(0)
        copies = itertools.count(1)
        stats = [
            None if c is None else tuple(r(fresh(next(copies))[1][k]) for r in c.reductions)
            for k, c in enumerate(cs)
        ]
        enc = [
            new[k] if c is None else c.encode(fresh(next(copies))[1][k], stats[k])
            for k, c in enumerate(cs)
        ]
        return (u, *enc)

    out = jax.tree.map(leaf, updates, *moments)
    pick = lambda i: jax.tree.map(lambda _, t: t[i], updates, out)
    return pick(0), tuple(pick(i + 1) for i in range(n))
