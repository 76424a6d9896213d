"""Scalify rules for shape, indexing, reduction and contraction primitives.

Shape and indexing ops move data and keep the scale (``transpose``, ``squeeze``,
``broadcast_in_dim``, ``rev`` and block-aligned ``slice`` move a per-block scale along
with the data; the others first fall back to a scalar scale). Ops that combine several
operands (``concatenate``, ``pad``, ``dynamic_update_slice``, ``scatter``) use the common
scale ``max(s_i)``; ``scatter-add`` uses the ``add`` scale ``r(sqrt(sa^2 + sb^2))``.

Sums grow the scale by ``r(sqrt(N))`` (``N`` elements summed) and divide the data by it
*before* summing, so narrow data does not overflow: ``reduce_sum`` (``N`` = product of
the reduced axes) and ``cumsum`` (``N`` = axis length). ``reduce_max``/``reduce_min``/
``cummax``/``cummin`` keep the scale; ``argmax``/``argmin`` return plain indices.

``dot_general`` and ``conv_general_dilated``: ``s = sa * sb * r(sqrt(K))`` with ``K``
the contracted size (for a convolution: input features per group times the kernel's
spatial size), data ``(da . db) / r(sqrt(K))`` accumulated in float32 when the output
dtype is narrower. A per-block scale that varies only along free (non-contracted,
non-batch) axes carries through to the output (MX-style per-row/per-column scaling);
variation along contracted or batch axes is first folded into the data.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import primitives as P

from jaxq.scaled.array import ScaledArray, expand_scale, is_scaled, scaled, to_scalar_scale
from jaxq.scaled.rules import _register_builtin
from jaxq.scaled.rules_elementwise import _wide, common_scale, rescale
from jaxq.scaled.scales import add_scale, narrow_range, poison_product, renormalize

__all__ = ["sqrt_n_scale"]


def sqrt_n_scale(n: int) -> float:
    """``r(sqrt(n))`` as a Python float (a power of two), e.g. ``sqrt_n_scale(64) == 8``."""
    m, e = np.frexp(np.float32(math.sqrt(max(n, 1))))  # static: computed with numpy
    return float(2.0 ** (int(e) - 1 + int(2 * m >= np.float32(math.sqrt(2)))))


def _scale_shape(x) -> tuple[int, ...]:
    return tuple(jnp.shape(x.scale))


def _is_blocked(x) -> bool:
    return is_scaled(x) and jnp.ndim(x.scale) > 0 and int(np.prod(_scale_shape(x))) > 1


def _scalar_if_trivial(x):
    """A block scale with a single element becomes a scalar scale."""
    if is_scaled(x) and jnp.ndim(x.scale) > 0 and int(np.prod(_scale_shape(x))) == 1:
        return ScaledArray.tree_unflatten(None, (x.data, jnp.reshape(x.scale, ())))
    return x


def _bind_keep(prim):
    """Rule for ops that only move data: same op on the data, same (scalar) scale."""

    def rule(x, *rest, **params):
        out = prim.bind(x.data, *rest, **params)
        if prim.multiple_results:
            return [scaled(o, x.scale) for o in out]
        return scaled(out, x.scale)

    return rule


def _transpose(x, *, permutation):
    s = x.scale if jnp.ndim(x.scale) == 0 else jnp.transpose(x.scale, permutation)
    return scaled(lax.transpose(x.data, permutation), s)


def _squeeze(x, *, dimensions):
    s = x.scale if jnp.ndim(x.scale) == 0 else lax.squeeze(x.scale, dimensions)
    return scaled(lax.squeeze(x.data, dimensions), s)


def _rev(x, *, dimensions):
    s = x.scale if jnp.ndim(x.scale) == 0 else lax.rev(x.scale, dimensions)
    return scaled(lax.rev(x.data, dimensions), s)


def _broadcast_in_dim(x, *dyn, shape, broadcast_dimensions, **params):
    d = P.broadcast_in_dim_p.bind(
        x.data, *dyn, shape=shape, broadcast_dimensions=broadcast_dimensions, **params
    )
    s = x.scale
    if jnp.ndim(s) > 0:
        new = [1] * len(shape)
        for i, j in enumerate(broadcast_dimensions):
            new[j] = s.shape[i] if x.shape[i] == shape[j] else 1
        s = jnp.reshape(s, new)
    return scaled(d, s)


def _slice(x, *, start_indices, limit_indices, strides):
    d = lax.slice(x.data, start_indices, limit_indices, strides)
    if jnp.ndim(x.scale) == 0:
        return scaled(d, x.scale)
    blocks = x.block_shape
    starts, limits = [], []
    for ax, (a, b, n) in enumerate(zip(start_indices, limit_indices, blocks, strict=True)):
        ns = _scale_shape(x)[ax]
        step = 1 if strides is None else strides[ax]
        if ns == 1:
            starts.append(0), limits.append(1)
        elif n == 1 and step == 1:
            starts.append(a), limits.append(b)
        elif step == 1 and a % n == 0 and b % n == 0:
            starts.append(a // n), limits.append(b // n)
        else:
            return _slice(
                to_scalar_scale(x),
                start_indices=start_indices,
                limit_indices=limit_indices,
                strides=strides,
            )
    return scaled(d, lax.slice(x.scale, starts, limits))


# -- per-block scales through reshape, gather and concatenate ----------------------------
def _segments(old: tuple[int, ...], new: tuple[int, ...]):
    """Pairs of axis ranges ``(old[i:j], new[k:l])`` with equal products, in order."""
    i = k = 0
    while i < len(old) or k < len(new):
        j, m, po, pn = i, k, 1, 1
        while True:
            if po == pn and (j > i or m > k) and (po != 1 or j == len(old) or m == len(new)):
                break
            if (po <= pn and j < len(old)) or m == len(new):
                po, j = po * old[j], j + 1
            else:
                pn, m = pn * new[m], m + 1
        yield range(i, j), range(k, m)
        i, k = j, m


def _segment_scale(n, sc, m):
    """Scale dims for new axes ``m`` of one reshape segment with old axes ``n``, scale ``sc``;
    None when the segment's blocks are not contiguous in the new axes."""
    var = [a for a in range(len(n)) if sc[a] != 1]
    if not var:
        return [1] * len(m)
    i = var[-1]
    if any(sc[a] != n[a] for a in range(i)):  # axes before i: one block per element
        return None
    f = (n[i] // sc[i]) * int(np.prod(n[i + 1 :]))  # flattened block length
    for t in range(len(m) - 1, -1, -1):
        tail = int(np.prod(m[t + 1 :]))
        if f % tail == 0 and m[t] % (f // tail) == 0:
            return [*m[:t], m[t] // (f // tail), *[1] * (len(m) - t - 1)]
        if tail > f:
            break
    return None


def _reshape(x, *dyn, new_sizes, dimensions, **params):
    def plain(x):
        return scaled(P.reshape_p.bind(x.data, *dyn, new_sizes=new_sizes,
                                       dimensions=dimensions, **params), x.scale)  # fmt: skip

    if not _is_blocked(x) or dimensions is not None or dyn or x.size == 0:
        return plain(to_scalar_scale(_scalar_if_trivial(x)))
    old, sc, new = x.shape, _scale_shape(x), tuple(new_sizes)
    shape = []
    for a, b in _segments(old, new):
        seg = _segment_scale([old[i] for i in a], [sc[i] for i in a], [new[i] for i in b])
        if seg is None:
            return plain(to_scalar_scale(x))
        shape += seg
    out = plain(x)
    return scaled(out.data, jnp.reshape(x.scale, shape))


def _gather(x, indices, *, dimension_numbers, slice_sizes, mode, fill_value, **params):
    def bind(operand, sizes, fill):
        return P.gather_p.bind(operand, indices, dimension_numbers=dimension_numbers,
                               slice_sizes=sizes, mode=mode, fill_value=fill, **params)  # fmt: skip

    x = _scalar_if_trivial(x)
    if not _is_blocked(x):
        return scaled(bind(x.data, slice_sizes, fill_value), x.scale)
    sc, sizes = _scale_shape(x), []
    for n, s, k in zip(x.shape, sc, slice_sizes, strict=True):
        if k == n:  # taken whole: its blocks come along
            sizes.append(s)
        elif s in (1, n):  # sliced: one scale per element there (broadcast a trivial one)
            sizes.append(k)
        else:
            x = to_scalar_scale(x)
            return scaled(bind(x.data, slice_sizes, fill_value), x.scale)
    trip = zip(x.shape, sc, slice_sizes, strict=True)
    full = [n if (k != n and s == 1) else s for n, s, k in trip]
    scale = jnp.broadcast_to(x.scale, full)
    fill = None if fill_value is None else 1.0
    return scaled(bind(x.data, tuple(slice_sizes), fill_value), bind(scale, tuple(sizes), fill))


def _concatenate(*ops, dimension):
    blocked = [o for o in ops if _is_blocked(o)]
    blocks = {o.block_shape for o in blocked}
    shapes = [o.shape if is_scaled(o) else np.shape(o) for o in ops]
    if len(blocks) == 1:
        (b,) = blocks
        if all(d % n == 0 for sh in shapes for d, n in zip(sh, b, strict=True)):
            dtype = blocked[0].dtype
            datas, scales = [], []
            for o, sh in zip(ops, shapes, strict=True):
                o = o if is_scaled(o) else scaled(jnp.asarray(o, dtype), np.float32(1.0))
                datas.append(o.data.astype(dtype))
                grid = [d // n for d, n in zip(sh, b, strict=True)]
                scales.append(jnp.broadcast_to(o.scale, grid))
            return scaled(
                lax.concatenate(datas, dimension), lax.concatenate(scales, dimension)
            )
    ops = [to_scalar_scale(o) if is_scaled(o) else o for o in ops]
    return _common(P.concatenate_p)(*ops, dimension=dimension)


def _common(prim, n_scaled_first: int | None = None):
    """Rule for ops combining operands in a common scale; operands after
    ``n_scaled_first`` (indices) pass through unchanged."""

    def rule(*args, **params):
        ops = args if n_scaled_first is None else args[:n_scaled_first]
        rest = () if n_scaled_first is None else args[n_scaled_first:]
        s = common_scale(*ops)
        dtype = next(o.dtype for o in ops if is_scaled(o))
        return scaled(prim.bind(*[rescale(o, s, dtype) for o in ops], *rest, **params), s)

    return rule


def _pad(x, padding_value, **params):
    s = common_scale(x, padding_value)
    dtype = x.dtype if is_scaled(x) else padding_value.dtype
    return scaled(
        P.pad_p.bind(rescale(x, s, dtype), rescale(padding_value, s, dtype), **params), s
    )


def _scatter_common(prim):
    def rule(operand, indices, updates, **params):
        s = common_scale(operand, updates)
        dtype = operand.dtype if is_scaled(operand) else updates.dtype
        return scaled(
            prim.bind(rescale(operand, s, dtype), indices, rescale(updates, s, dtype), **params),
            s,
        )

    return rule


def _scatter_add(operand, indices, updates, **params):
    if is_scaled(operand) and is_scaled(updates):
        s = add_scale(operand.scale, updates.scale)
    else:
        s = operand.scale if is_scaled(operand) else updates.scale
    dtype = operand.dtype if is_scaled(operand) else updates.dtype
    d = P.scatter_add_p.bind(
        rescale(operand, s, dtype), indices, rescale(updates, s, dtype), **params
    )
    return scaled(d, s)


def _dynamic_update_slice(operand, update, *indices, **params):
    s = common_scale(operand, update)
    dtype = operand.dtype if is_scaled(operand) else update.dtype
    d = P.dynamic_update_slice_p.bind(
        rescale(operand, s, dtype), rescale(update, s, dtype), *indices, **params
    )
    return scaled(d, s)


# -- reductions ------------------------------------------------------------------------
def _reduce_scale(x, axes):
    """Scale after removing ``axes``; falls back to a scalar scale when it varies there."""
    if jnp.ndim(x.scale) == 0:
        return x, x.scale
    if any(_scale_shape(x)[a] != 1 for a in axes):
        x = to_scalar_scale(x)
        return x, x.scale
    return x, jnp.squeeze(x.scale, axis=tuple(axes))


def _reduce_sum(x, *, axes, **params):
    x, s = _reduce_scale(x, axes)
    k = sqrt_n_scale(int(np.prod([x.shape[a] for a in axes])))
    if narrow_range(x.dtype):  # sum in float32, then renormalize before narrowing
        d = P.reduce_sum_p.bind(x.data.astype(jnp.float32) * (1.0 / k), axes=axes, **params)
        return scaled(*renormalize(d, s * k, x.dtype))
    d = rescale(ScaledArray.tree_unflatten(None, (x.data, np.float32(1.0 / k))), np.float32(1.0))
    return scaled(P.reduce_sum_p.bind(d, axes=axes, **params), s * k)


def _reduce_keep(prim):
    def rule(x, *, axes, **params):
        x, s = _reduce_scale(x, axes)
        return scaled(prim.bind(x.data, axes=axes, **params), s)

    return rule


def _arg_reduce(prim):
    def rule(x, **params):
        return prim.bind(x.data, **params)  # scalar scale > 0: order is unchanged

    return rule


def _cumsum(x, *, axis, reverse):
    k = sqrt_n_scale(x.shape[axis])
    d = rescale(ScaledArray.tree_unflatten(None, (x.data, np.float32(1.0 / k))), np.float32(1.0))
    return scaled(P.cumsum_p.bind(d, axis=axis, reverse=reverse), x.scale * k)


# -- contractions ----------------------------------------------------------------------
def _fold_except(x, keep_axes):
    """Folds the variation of a block scale along axes not in ``keep_axes`` into data."""
    if not _is_blocked(x):
        return _scalar_if_trivial(x)
    fold = [a for a in range(x.ndim) if a not in keep_axes and _scale_shape(x)[a] != 1]
    if not fold:
        return x
    smax = jnp.max(x.scale, axis=tuple(fold), keepdims=True)
    w = _wide(x.dtype)
    d = (x.data.astype(w) * expand_scale(x.scale / smax, x.shape).astype(w)).astype(x.dtype)
    return ScaledArray.tree_unflatten(None, (d, smax))


def _narrow_out(dtype) -> bool:
    """Accumulate in float32 (and renormalize) only for narrow-range outputs: float16 and
    FP8 data. bfloat16 keeps JAX's default, which backends accumulate in float32 anyway
    (and XLA's CPU runtime has no bfloat16 x bfloat16 -> float32 kernel)."""
    return dtype is not None and narrow_range(dtype)


def _dot_general(lhs, rhs, *, dimension_numbers, preferred_element_type=None, **params):
    (lc, rc), (lb, rb) = dimension_numbers
    lfree = [a for a in range(np.ndim(lhs.data if is_scaled(lhs) else lhs)) if a not in (*lc, *lb)]
    rfree = [a for a in range(np.ndim(rhs.data if is_scaled(rhs) else rhs)) if a not in (*rc, *rb)]
    lhs = _fold_except(lhs, lfree) if is_scaled(lhs) else lhs
    rhs = _fold_except(rhs, rfree) if is_scaled(rhs) else rhs
    shape_l = lhs.shape if is_scaled(lhs) else np.shape(lhs)
    k = sqrt_n_scale(int(np.prod([shape_l[a] for a in lc])))
    dl = lhs.data if is_scaled(lhs) else lhs
    dr = rhs.data if is_scaled(rhs) else rhs
    out_dtype = preferred_element_type
    acc = jnp.float32 if _narrow_out(out_dtype or dl.dtype) else out_dtype
    final = out_dtype or jnp.result_type(dl.dtype, dr.dtype)
    d = P.dot_general_p.bind(
        dl, dr, dimension_numbers=dimension_numbers, preferred_element_type=acc, **params
    )
    # divide by r(sqrt K) after the product (exact: k is a power of two), where it fuses
    # into the product's consumers; a division of an operand first would be a pass and a
    # kernel of its own (XLA does not fuse producers into a dot's operands)
    if k > 1:
        d = d * jnp.asarray(1.0 / k, d.dtype)
    if narrow_range(final):  # the accumulator is float32: renormalize before narrowing
        return _dot_scale(lhs, rhs, lfree, rfree, len(lb), k, d, final)
    d = d.astype(final)
    return _dot_scale(lhs, rhs, lfree, rfree, len(lb), k, d, None)


def _dot_scale(lhs, rhs, lfree, rfree, nb, k, d, narrow):
    """Output of ``dot_general``: scale ``sa * sb * k``, per free-axis blocks kept."""
    nlf, nrf = len(lfree), len(rfree)
    scale = np.float32(k)
    for x, free, pre, post in ((lhs, lfree, nb, nrf), (rhs, rfree, nb + nlf, 0)):
        if is_scaled(x):
            s = x.scale
            if jnp.ndim(s) > 0:
                s = jnp.reshape(s, [1] * pre + [s.shape[a] for a in free] + [1] * post)
            scale = scale * s
    if narrow is not None:
        d, scale = renormalize(d, scale, narrow)
    return scaled(d, poison_product(scale))


def _conv(lhs, rhs, *, dimension_numbers, preferred_element_type=None, **params):
    rhs_shape = rhs.shape if is_scaled(rhs) else np.shape(rhs)
    out_feat_dim = dimension_numbers.rhs_spec[0]
    k = sqrt_n_scale(int(np.prod(rhs_shape)) // rhs_shape[out_feat_dim])
    dl = lhs.data if is_scaled(lhs) else lhs
    dr = rhs.data if is_scaled(rhs) else rhs
    acc = jnp.float32 if _narrow_out(preferred_element_type or dl.dtype) else preferred_element_type
    d = P.conv_general_dilated_p.bind(
        dl, dr, dimension_numbers=dimension_numbers, preferred_element_type=acc, **params
    )
    final = preferred_element_type or jnp.result_type(dl.dtype, dr.dtype)
    d = (d * jnp.asarray(1.0 / k, d.dtype)).astype(final)
    scale = np.float32(k)
    for x in (lhs, rhs):
        if is_scaled(x):
            scale = scale * x.scale
    return scaled(d, poison_product(scale))


def _top_k(x, **params):
    vals, idx = P.top_k_p.bind(x.data, **params)
    return [scaled(vals, x.scale), idx]


def _register() -> None:
    for p in (P.dynamic_slice_p, lax.split_p, P.sharding_constraint_p):
        _register_builtin(p, _bind_keep(p))
    _register_builtin(P.reshape_p, _reshape, block_scales=True)
    _register_builtin(P.gather_p, _gather, block_scales=True)
    _register_builtin(P.transpose_p, _transpose, block_scales=True)
    _register_builtin(P.squeeze_p, _squeeze, block_scales=True)
    _register_builtin(P.rev_p, _rev, block_scales=True)
    _register_builtin(P.broadcast_in_dim_p, _broadcast_in_dim, block_scales=True)
    _register_builtin(P.slice_p, _slice, block_scales=True)
    _register_builtin(P.concatenate_p, _concatenate, block_scales=True)
    _register_builtin(P.pad_p, _pad)
    _register_builtin(P.scatter_p, _scatter_common(P.scatter_p))
    _register_builtin(P.scatter_add_p, _scatter_add)
    _register_builtin(P.dynamic_update_slice_p, _dynamic_update_slice)
    _register_builtin(P.reduce_sum_p, _reduce_sum, block_scales=True)
    for p in (P.reduce_max_p, P.reduce_min_p):
        _register_builtin(p, _reduce_keep(p), block_scales=True)
    for p in (P.argmax_p, P.argmin_p):
        _register_builtin(p, _arg_reduce(p))
    _register_builtin(P.cumsum_p, _cumsum)
    for p in (P.cummax_p, P.cummin_p):
        _register_builtin(p, _bind_keep(p))
    _register_builtin(P.dot_general_p, _dot_general, block_scales=True)
    _register_builtin(P.conv_general_dilated_p, _conv)
    _register_builtin(P.top_k_p, _top_k)


_register()
