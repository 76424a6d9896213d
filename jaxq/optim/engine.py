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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.optim import codecs as cd
from jaxq.optim.common import quantize_mask, sanitize

Codecs = Callable[[tuple], Sequence[Any]]  # parameter shape -> one codec per moment


def init_moments(params, codecs: Codecs, n: int, *, keep_fp32, min_quantized_size: int):
    """One pytree per moment: codec state where quantized, float32 zeros elsewhere."""
    qmask = quantize_mask(params, keep_fp32, min_quantized_size)

    def leaf(p, q, k):
        if not q:
            return jnp.zeros_like(p, dtype=jnp.float32)
        codec = codecs(np.shape(p))[k]
        return cd.place_like(p, codec.init(p.shape), codec.dims(p.shape))

    return tuple(jax.tree.map(lambda p, q, k=k: leaf(p, q, k), params, qmask) for k in range(n))


def _is_quantized(s) -> bool:
    return isinstance(s, (cd.QuantizedMoment, cd.Rank1Moment))


def _as_moment(s):
    """A quantized moment from its fields when a container turned it into a mapping.

    ``flax.nnx.Optimizer`` stores the new state through ``nnx.state``, which turns each
    :class:`~jaxq.optim.codecs.QuantizedMoment` into a ``State`` mapping of its fields.
    """
    if isinstance(s, Mapping) and not _is_quantized(s):
        for kind in (cd.QuantizedMoment, cd.Rank1Moment):
            if set(s.keys()) == set(kind._fields):
                return kind(**{f: s[f] for f in kind._fields})
    return s


def step_moments(updates, moments: Sequence[Any], codecs: Codecs, step: Callable, *,
                 strategy: str = "auto", fused: Callable | None = None):
    """Applies ``step`` leaf by leaf; returns ``(updates, new_moments)`` (same structures).

    Two compilation strategies compute the same function:

    * ``"recompute"`` (chosen on CPU): the float32 moments are never stored. The step is
      traced once per consumer -- the update, one variadic block reduction for all codecs
      with ``block_parts`` of one block shape, each other reduction, and one variadic
      OR-reduction encoding all codecs with ``code_parts`` -- with its own private copy
      of the decoding tables (:func:`jaxq.optim.maps.table_lookup`), so XLA's CPU backend
      fuses decode, step and consumer into one loop each instead of writing float32
      moments to memory.
    * ``"plain"`` (chosen elsewhere, e.g. on GPU): decode -> step -> block statistics ->
      encode, traced once; XLA's GPU backend fuses this into one reduction kernel and two
      elementwise kernels, whereas the OR-reduction of the CPU strategy is slow there.

    ``"auto"`` picks per platform at lowering (:func:`jax.lax.platform_dependent`).
    ``fused(g, states, codecs)``, where given, is tried first on each leaf whose moments
    are all quantized: it returns ``(update, *new_states)`` from a fused kernel (see
    :mod:`jaxq.kernels.fused_adam`), or ``None`` to leave the leaf to the strategies.
    The numerics are those of a single decode -> step -> encode either way; XLA may
    contract multiply-adds differently in the two programs, so results can differ in the
    last bit of float32 (and a code where that bit moves a value across a midpoint).
    """
    if strategy not in ("auto", "recompute", "plain"):
        raise ValueError(
            f"strategy: expected 'auto', 'recompute' or 'plain', got {strategy!r}"
        )
    n = len(moments)

    def leaf(g, *states):
        g = jnp.asarray(g)  # also Python scalars, as optax accepts
        states = tuple(_as_moment(s) for s in states)
        cs = [c if _is_quantized(s) else None for c, s in zip(codecs(g.shape), states, strict=True)]
        for c in cs:
            if c is not None:
                _check_row_sharding(g, c)
        if fused is not None and all(c is not None for c in cs):
            out = fused(g, states, cs)
            if out is not None:
                return out
        if all(c is None for c in cs) or strategy == "plain":
            return _plain_leaf(g, states, cs, step)
        if strategy == "recompute":
            return _recompute_leaf(g, states, cs, step)
        return jax.lax.platform_dependent(
            g, states,
            cpu=lambda g, states: _recompute_leaf(g, states, cs, step),
            default=lambda g, states: _plain_leaf(g, states, cs, step),
        )

    out = jax.tree.map(leaf, updates, *moments)
    pick = lambda i: jax.tree.map(lambda _, t: t[i], updates, out)
    return pick(0), tuple(pick(i + 1) for i in range(n))


def _check_row_sharding(g, codec) -> None:
    """ValueError when an explicit sharding would cut the codec's blocks across devices.

    Under automatic sharding the partitioner moves data instead (correct, but not local);
    under explicit sharding (``jax.sharding.AxisType.Explicit``) the block reshape would
    fail with a less helpful error.
    """
    sharding = cd.explicit_sharding(g)
    if sharding is None:
        return
    axis = g.ndim - codec.row_axes(g.shape)
    spec = tuple(sharding.spec) + (None,) * g.ndim
    shards = cd.shard_count(sharding.mesh, spec[axis])
    row = int(np.prod(g.shape[axis:]))
    if shards > 1 and (row % shards or (row // shards) % codec.block_size):
        raise ValueError(
            f"parameter of shape {g.shape} sharded along axis {axis} into {shards} shards: "
            f"each shard holds {row / shards:g} elements of a row, not whole blocks of "
            f"{codec.block_size}; choose a block_size that divides it, or shard another axis"
        )


def _fresh(g, states, cs, step, copy: int):
    """Decode (table copy ``copy``), guard, step: ``(update, new float32 moments)``."""
    g32, finite = sanitize(g)
    old = [s if c is None else c.decode(s, g.shape, copy=copy)
           for s, c in zip(states, cs, strict=True)]
    u, new = step(g32, old)
    new = [jnp.where(finite, m, o) for m, o in zip(new, old, strict=True)]
    # float32 (the moments' precision) for lower-precision gradients, as optax's update
    # follows its float32 moments.
    return jnp.where(finite, u, 0.0).astype(jnp.promote_types(g.dtype, jnp.float32)), new


def _plain_leaf(g, states, cs, step):
    """One decode -> step; each codec encodes its new moment with fresh statistics."""
    u, new = _fresh(g, states, cs, step, 0)
    enc = [m if c is None else c.encode(m) for m, c in zip(new, cs, strict=True)]
    return (u, *enc)


def _recompute_leaf(g, states, cs, step):
    """The CPU strategy of :func:`step_moments`: one fused recomputation per consumer."""
    copies = itertools.count(1)
    fresh = lambda: _fresh(g, states, cs, step, next(copies))[1]
    u, new = _fresh(g, states, cs, step, 0)
    stats = _block_stats(cs, fresh, g.shape)
    stats = [
        st if c is None or st is not None else tuple(r(fresh()[k]) for r in c.reductions)
        for k, (c, st) in enumerate(zip(cs, stats, strict=True))
    ]
    enc = _merged_encode(cs, stats, fresh)
    enc = [
        e if c is None or e is not None else c.encode(fresh()[k], stats[k])
        for k, (c, e) in enumerate(zip(cs, enc, strict=True))
    ]
    enc = [new[k] if c is None else e for k, (c, e) in enumerate(zip(cs, enc, strict=True))]
    return (u, *enc)


def _block_stats(cs, fresh, shape) -> list:
    """Stats of all codecs with ``block_parts`` of one block shape from one reduction each.

    The moments' block reductions (max and min per block) become a single variadic
    reduction over the blocks, so the step is recomputed once per block shape instead of
    once per moment. Max and min are exact, so the stats are those of separate reductions.
    A codec's ``extra_reductions`` (other axes) follow, each with its own recomputation.
    Codecs without ``block_parts`` get ``None``.
    """
    stats: list = [None] * len(cs)
    groups: dict[tuple, list[int]] = {}
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    for k, c in enumerate(cs):
        if c is not None and hasattr(c, "block_parts"):
            groups.setdefault(jax.eval_shape(c.blocks, x).shape, []).append(k)
    for ks in groups.values():
        new = fresh()
        parts = [cs[k].block_parts(cs[k].blocks(new[k])) for k in ks]
        flat = [p for ps in parts for p in ps]
        ops = tuple(x.astype(jnp.float32) for x, _ in flat)
        kinds = tuple(kind for _, kind in flat)
        inits = tuple(np.float32(-np.inf if kind == "max" else np.inf) for kind in kinds)

        def combine(a, b, kinds=kinds):
            return tuple(
                jnp.maximum(x, y) if kind == "max" else jnp.minimum(x, y)
                for x, y, kind in zip(a, b, kinds, strict=True)
            )

        out = jax.lax.reduce(ops, inits, combine, (ops[0].ndim - 1,))
        start = 0
        for k, ps in zip(ks, parts, strict=True):
            extra = getattr(cs[k], "extra_reductions", ())
            stats[k] = cs[k].block_stats(out[start : start + len(ps)]) + tuple(
                r(fresh()[k]) for r in extra
            )
            start += len(ps)
    return stats


def _merged_encode(cs, stats, fresh) -> list:
    """Encodes all codecs with ``code_parts`` of equal code shape in one pass.

    Each codec gives its code bytes as parts to OR together (one part per byte for 8-bit
    codes, two nibbles for 4-bit); one variadic OR-reduction over the parts produces every
    codec's bytes, so XLA computes the step once for all encoders (and never recomputes a
    reduction inside its consumers). The bytes are exactly those of the codecs' ``encode``.
    Codecs not merged get ``None``.
    """
    out: list = [None] * len(cs)
    ks = [k for k, c in enumerate(cs) if c is not None and hasattr(c, "code_parts")]
    if len(ks) < 2:
        return out
    new = fresh()
    parts = [cs[k].code_parts(new[k], stats[k]) for k in ks]
    if len({p.shape[:-1] for p, _ in parts}) != 1:
        return out
    width = max(2, *(p.shape[-1] for p, _ in parts))
    ops = []
    for p, shifts in parts:
        p = p << jnp.array(shifts, jnp.uint8)
        if p.shape[-1] < width:  # a zero part keeps the reduced axis from being folded away
            p = jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, width - p.shape[-1])])
        ops.append(p)
    zeros = tuple(np.uint8(0) for _ in ops)
    words = jax.lax.reduce(
        tuple(ops),
        zeros,
        lambda a, b: tuple(jax.lax.bitwise_or(x, y) for x, y in zip(a, b, strict=True)),
        (ops[0].ndim - 1,),
    )
    for k, codes in zip(ks, words, strict=True):
        out[k] = cs[k].from_bytes(codes, stats[k])
    return out
