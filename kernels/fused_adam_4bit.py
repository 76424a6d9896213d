"""Fused 4-bit Adam update: decode, step and re-encode packed 4-bit moments per block.

The state of :func:`jaxq.optim.adamw_4bit` packs two 4-bit codes per byte (the even
element in the low nibble). The first moment is a block codec on the 16-value signed
dynamic map (``maps.SIGNED4``) with one absmax per block of ``B`` values along a row;
the second moment is on the linear map without zero ``{1/16, ..., 1}`` (``maps.LINEAR4``),
normalized by one absmax per block (vectors) or, for a matrix view ``(..., r, c)``, per
element by ``N_ij = min(R_i, C_j)``, the row and column maxima of the new ``v`` (rank-1
normalization, Li et al. 2023). One optimizer step per element, in float32:

.. math::

    \\hat g &= \\begin{cases} \\mathrm{clip}(g, \\pm 2^{63}) & g \\text{ finite} \\\\
              0 & \\text{else} \\end{cases}, \\qquad
    m_0 = \\mathrm{map}_m[c_m]\\, a_m, \\qquad v_0 = \\mathrm{map}_v[c_v]\\, N^{old}, \\\\
    m &= \\beta_1 m_0 + (1 - \\beta_1)\\hat g, \\qquad
    v = \\beta_2 v_0 + (1 - \\beta_2)\\hat g^2, \\qquad
    u = \\frac{m / (1 - \\beta_1^t)}{\\sqrt{v} / \\sqrt{1 - \\beta_2^t} + \\epsilon},

with ``u = 0`` and the old (decoded) moments kept where ``g`` is not finite: they are
re-encoded with the new scales, as :mod:`jaxq.optim` does. Then per block the absmax
``a = max |m|`` (stored rounded up to the scale dtype; below float32's smallest normal:
0) and ``c_m = nearest(m / a)`` (a nonzero first moment never flips sign); for a block
``v`` likewise; for a rank-1 ``v``, ``R_i = max_j v_ij`` and ``C_j = max_i v_ij`` (below
the smallest normal: 0) and ``c_v = nearest(v / N)`` (``N = 0``: code 0). The padding of
the row layout (elements ``n .. n_pad - 1`` of a row) holds zero moments, as under XLA.

A rank-1 ``v`` needs the maxima of the whole matrix before any element is encoded, so
the step is two Pallas calls. Pass 1 recomputes ``v`` from ``g`` and the old codes and
writes per tile of ``T_r x T_c`` elements its row and column maxima; XLA reduces those
partial maxima (a ``1/T_c + 1/T_r`` fraction of the matrix). Pass 2 recomputes ``m`` and
``v``, encodes both and writes ``u``. Per parameter with float32 gradients, pass 1 reads
the gradient (4 bytes) and the ``v`` code (0.5) and pass 2 reads the gradient (4) and two
codes (1) and writes two codes (1) and the update (4): 14.5 bytes; the maxima add
``20 / T_r + 20 / T_c`` (old and new column maxima read by the passes, the partial ones
written and reduced; rows likewise) and the block scales ``8 / B`` (float32): 15.2
bytes with the tiles used here (``T_r = 32``, ``T_c = 512``, ``B = 128``). With block
scales only (vectors, and matrices without a cheap rank-1 view) one pass suffices: 10
bytes plus ``16 / B``. optax's float32 Adam moves 24 bytes. This is byte counting; the
GPU timings are still to be measured.

Decoding gathers from the 16-value map; encoding is the map's own search
(:meth:`jaxq.optim.maps.CodeBook.encode`: comparisons with the 15 cuts of ``SIGNED4``, the
closed form of ``LINEAR4``), elementwise. Loads and stores at the ragged edges (rows of
a tile past ``r``, columns past ``n``) are masked.

Operands are in the optimizer's *row layout*: ``(rows, n_pad)`` gradients, ``(rows,
n_pad / 2)`` packed codes, ``(rows, n_pad / B)`` block scales (see
:mod:`jaxq.optim.blockwise`); a rank-1 ``v`` has codes ``(rows, ceil(n / 2))``, row
maxima ``(rows,)`` and column maxima ``(batch, n)`` for ``rows = batch * r``. The
kernels and :func:`reference` run the same per-block functions.

Where float32 leaves a compiler no choice, every product with a ``β`` exact (tested with
``β = (1/2, 3/4)`` and gradients and old scales of 12 significant bits, and with ``β =
(1/2, 1/2)`` and 12-bit gradients over several ``adamw_4bit`` steps), the new codes,
scales and maxima in interpret mode equal :mod:`jaxq.optim`'s XLA path bit for bit, in
both of its strategies, including the non-finite-gradient rule, zero blocks, rows and
columns, and the padding. Otherwise a compiler contracts ``β m + (1 - β) g`` into a fused
multiply-add in one order or the other: with the default ``β`` XLA's own two CPU
strategies differ from each other by one ulp in some of ``adamw_4bit``'s block scales
and rank-1 maxima, and the kernel agrees with each of them to that ulp, a code moving by
one step only where that ulp crosses a midpoint (tested). The update ``u`` agrees to
``|Δu| <= 1e-6 max(1, |u|)``, as :mod:`jaxq.kernels.fused_adam` states. On a GPU,
Triton and XLA contract as they choose: a moment may move by one ulp, and so a code by
one step where that ulp crosses a midpoint.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxq.kernels import fused_adam, fused_adam_4bit as fa4
    >>> from jaxq.optim import maps
    >>> g = jax.random.normal(jax.random.key(0), (40, 256))
    >>> m_codes = jnp.full((40, 128), 0x77, jnp.uint8)     # SIGNED4's zero, twice
    >>> m_scale = jnp.zeros((40, 2), jnp.float32)
    >>> v_codes = jnp.zeros((40, 128), jnp.uint8)
    >>> v_max = (jnp.zeros((40,)), jnp.zeros((1, 256)))   # rank-1: row and column maxima
    >>> hyper = fused_adam.hyperparameters(0.9, 0.999, 1e-8, count=1)
    >>> args = (g, m_codes, m_scale, v_codes, v_max, hyper)
    >>> kw = dict(m_map=maps.SIGNED4, v_map=maps.LINEAR4)
    >>> u, *state = fa4.adam_update(*args, **kw, implementation="pallas", interpret=True)
    >>> ref = fa4.adam_update(*args, **kw, implementation="xla")
    >>> pairs = zip(jax.tree.leaves(state), jax.tree.leaves(ref[1:]))
    >>> all(bool((a == b).all()) for a, b in pairs)
    True
    >>> bool(jnp.allclose(u, jnp.sign(g), atol=1e-3))   # Adam's first step is sign(g)
    True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import registry as R
from .fused_adam import (
    _N_HYPER,
    _TINY,
    _decode,
    _encode,
    _hyper_tuple,
    _pow2,
    _sanitize,
    _tile_blocks,
    hyperparameters,
)

__all__ = ["adam_update", "reference", "hyperparameters", "why_not", "implementation_for"]

_NAME = "adam_update_4bit"


def _unpack(c):
    """int32 codes ``(rows, 2k)`` of packed bytes ``(rows, k)`` (even element low)."""
    c = c.astype(jnp.int32)
    return jax.lax.stack([c & 15, c >> 4], axis=2).reshape(c.shape[0], 2 * c.shape[1])


def _pack(idx):
    """Bytes ``(rows, k)`` of codes ``(rows, 2k)``: ``even | odd << 4``."""
    idx = idx.astype(jnp.int32)
    lo, hi = jax.lax.unstack(idx.reshape(idx.shape[0], -1, 2), axis=2)
    return (lo | (hi << 4)).astype(jnp.uint8)


def _flush(a):
    return jnp.where(a >= _TINY, a, 0.0)


def _second_moment(h, g32, finite, valid, vc, v_norm, v_map, lookups):
    """New float32 ``v`` of a block: old ``v`` where ``g`` is not finite, 0 off ``valid``."""
    b2, c2 = h[2], h[3]
    v0 = _decode(_unpack(vc), v_norm, v_map, lookups)
    return jnp.where(valid, jnp.where(finite, b2 * v0 + c2 * (g32 * g32), v0), 0.0)


def _block_maxima(h, g, valid, vc, v_norm, v_map, lookups):
    """Pass 1 on one block ``(rows, B)``: the new ``v``'s maxima over columns and rows."""
    g32, finite = _sanitize(g)
    v = _second_moment(h, g32, finite, valid, vc, v_norm, v_map, lookups)
    return jnp.max(v, axis=1, keepdims=True), jnp.max(v, axis=0, keepdims=True)


def _block_update(h, g, valid, mc, ma, vc, v_old, v_new, lookups, *, m_map, v_map,
                  sign_fix):  # fmt: skip
    """Pass 2 on one block ``(rows, B)``: ``g``, packed codes ``(rows, B / 2)``, ``ma``
    the ``(rows, 1)`` scales of ``m``; ``v_old`` the old normalizer of ``v`` (its block
    scales, or ``min(R, C)`` of a rank-1 ``v``), ``v_new`` the new ``min(R, C)`` (None
    for a block ``v``). Returns ``(u, m codes, m scale, v codes, v scale or None)``."""
    b1, c1, _, _, bc1, bc2_sqrt, eps = h
    g32, finite = _sanitize(g)
    m0 = _decode(_unpack(mc), ma, m_map, lookups[0])
    m = jnp.where(valid, jnp.where(finite, b1 * m0 + c1 * g32, m0), 0.0)
    v = _second_moment(h, g32, finite, valid, vc, v_old, v_map, lookups[1])
    u = jnp.where(finite, (m / bc1) / (jnp.sqrt(v) / bc2_sqrt + eps), 0.0)  # 0 off valid
    mq, ma = _encode(m, ma, m_map, lookups[0], first=True, sign_fix=sign_fix)
    if v_new is None:
        vq, va = _encode(v, v_old, v_map, lookups[1], first=False, sign_fix=False)
    else:  # Rank1Codec: x / N, N = 0 -> 1; the odd column's pad nibble is 0
        vq = jnp.where(valid, v_map.encode(v / jnp.where(v_new > 0, v_new, 1.0)), 0)
        va = None
    return u, _pack(mq), ma, _pack(vq), va


def _take(table):
    return lambda i: table[i]


def _layout(g, m_scale, v_scale, n):
    """``(rows, n_pad, nb, bs, batch, r, n, rank1)`` of checked operands."""
    rows, n_pad = g.shape
    nb = m_scale.shape[1]
    rank1 = isinstance(v_scale, tuple)
    batch = v_scale[1].shape[0] if rank1 else 1
    n = v_scale[1].shape[1] if rank1 else (n_pad if n is None else n)
    return rows, n_pad, nb, n_pad // nb, batch, rows // batch, n, rank1


def reference(g, m_codes, m_scale, v_codes, v_scale, hyper, *, m_map, v_map, n=None,
              sign_fix=True):  # fmt: skip
    """The update under XLA (whole arrays): ``(u, m_codes, m_scale, v_codes, v_scale)``."""
    rows, n_pad, nb, bs, batch, r, n, rank1 = _layout(g, m_scale, v_scale, n)
    h = _hyper_tuple(lambda k: hyper[0, k])
    lookups = [[_take(jnp.asarray(s.values))] for s in (m_map, v_map)]
    blocks = lambda x: x.reshape(rows * nb, -1)  # noqa: E731
    valid = blocks(jnp.broadcast_to(jnp.arange(n_pad) < n, (rows, n_pad)))
    vc = v_codes
    if rank1:
        vc = jnp.pad(v_codes, ((0, 0), (0, n_pad // 2 - v_codes.shape[1])))

        def norm(row, col):  # min(R_i, C_j) as blocks; the padding's C_j is 0
            col = jnp.pad(col.astype(jnp.float32), ((0, 0), (0, n_pad - n)))
            return blocks(jnp.minimum(row.reshape(batch, r, 1), col[:, None, :]))

        v_old = norm(*v_scale)
        g32, finite = _sanitize(blocks(g))
        v = _second_moment(h, g32, finite, valid, blocks(vc), v_old, v_map, lookups[1])
        v = v.reshape(batch, r, n_pad)
        row, col = _flush(jnp.max(v, axis=2)).reshape(rows), _flush(jnp.max(v, axis=1))[:, :n]
        v_new = norm(row, col)
    else:
        v_old, v_new = v_scale.reshape(rows * nb, 1), None
    u, mc, ma, vq, va = _block_update(
        h, blocks(g), valid, blocks(m_codes), m_scale.reshape(rows * nb, 1), blocks(vc),
        v_old, v_new, lookups, m_map=m_map, v_map=v_map, sign_fix=sign_fix,
    )  # fmt: skip
    u, mc, vq = u.reshape(rows, n_pad), mc.reshape(rows, -1), vq.reshape(rows, -1)
    if rank1:
        return u, mc, ma.reshape(rows, nb), vq[:, : v_codes.shape[1]], (row, col)
    return u, mc, ma.reshape(rows, nb), vq, va.reshape(rows, nb)


# ------------------------------------------------------------------------ Pallas kernels


def _rows_ok(br, r):
    """This program's rows ``(br, 1)`` that lie inside the matrix's ``r``."""
    return pl.program_id(1) * br + jax.lax.broadcasted_iota(jnp.int32, (br, 1), 0) < r


def _cols_ok(nb, bs, j, n):
    """Block ``j`` of this program's tile: columns ``(1, bs)`` inside ``n``, bytes
    ``(1, bs / 2)`` inside ``ceil(n / 2)``."""
    start = (pl.program_id(2) * nb + j) * bs
    col = start + jax.lax.broadcasted_iota(jnp.int32, (1, bs), 1)
    byte = start // 2 + jax.lax.broadcasted_iota(jnp.int32, (1, bs // 2), 1)
    return col < n, byte < (n + 1) // 2


def _load(ref, idx, mask):
    from jax.experimental.pallas import triton as plt

    return plt.load(ref.at[idx], mask=mask, other=jnp.zeros((), ref.dtype))


def _store(ref, idx, val, mask):
    from jax.experimental.pallas import triton as plt

    plt.store(ref.at[idx], val.astype(ref.dtype), mask=mask)


_ALL = (slice(None), slice(None))


def _slices(j, bs):
    """Block ``j`` of a tile: its elements, its code bytes, its scale."""
    cols = lambda start, size: (slice(None), pl.ds(start, size))  # noqa: E731
    return cols(j * bs, bs), cols(j * bs // 2, bs // 2), cols(j, 1)


def _maxima_kernel(h_ref, g_ref, vc_ref, row_ref, col_ref, table, row_out, col_out, *,
                   br, r, nb, bs, n, v_map):  # fmt: skip
    """Pass 1: the tile's row maxima ``(br, 1)`` and column maxima ``(1, nb * bs)`` of the
    new ``v`` (rows past ``r`` and columns past ``n`` count as 0)."""
    h = _hyper_tuple(lambda k: h_ref[:, pl.ds(k, 1)])
    rows_ok = _rows_ok(br, r)
    row_old, best = _load(row_ref, _ALL, rows_ok), None
    for j in range(nb):
        cols_ok, bytes_ok = _cols_ok(nb, bs, j, n)
        cols, half, _ = _slices(j, bs)
        norm = jnp.minimum(row_old, _load(col_ref, cols, cols_ok))
        g = _load(g_ref, cols, rows_ok)
        vc = _load(vc_ref, half, rows_ok & bytes_ok)
        rmax, cmax = _block_maxima(h, g, rows_ok & cols_ok, vc, norm, v_map, [_take(table)])
        best = rmax if best is None else jnp.maximum(best, rmax)
        col_out[cols] = cmax
    _store(row_out, _ALL, best, rows_ok)


def _update_kernel(h_ref, g_ref, mc_ref, ma_ref, vc_ref, *refs, br, r, nb, bs, n, m_map,
                   v_map, sign_fix, rank1):  # fmt: skip
    """Pass 2 (the only one for a block ``v``): the tile's update and new state."""
    n_in = 4 if rank1 else 1
    v_refs, (tm, tv), outs = refs[:n_in], refs[n_in : n_in + 2], refs[n_in + 2 :]
    u_ref, mc_out, ma_out, vc_out = outs[:4]
    h = _hyper_tuple(lambda k: h_ref[:, pl.ds(k, 1)])
    lookups = [[_take(tm)], [_take(tv)]]
    rows_ok = _rows_ok(br, r)
    if rank1:
        old_r, old_c, new_r, new_c = v_refs
        old_row, new_row = _load(old_r, _ALL, rows_ok), _load(new_r, _ALL, rows_ok)
    for j in range(nb):  # the tile's blocks, one column of blocks per step
        cols_ok, bytes_ok = _cols_ok(nb, bs, j, n)
        cols, half, col = _slices(j, bs)
        if rank1:
            v_old = jnp.minimum(old_row, _load(old_c, cols, cols_ok))
            v_new = jnp.minimum(new_row, _load(new_c, cols, cols_ok))
            v_bytes = rows_ok & bytes_ok
        else:
            v_old, v_new, v_bytes = _load(v_refs[0], col, rows_ok), None, rows_ok
        u, mc, ma, vc, va = _block_update(
            h, _load(g_ref, cols, rows_ok), cols_ok, _load(mc_ref, half, rows_ok),
            _load(ma_ref, col, rows_ok), _load(vc_ref, half, v_bytes), v_old, v_new,
            lookups, m_map=m_map, v_map=v_map, sign_fix=sign_fix,
        )  # fmt: skip
        _store(u_ref, cols, u, rows_ok)
        _store(mc_out, half, mc, rows_ok)
        _store(ma_out, col, ma, rows_ok)
        _store(vc_out, half, vc, v_bytes)
        if not rank1:
            _store(outs[4], col, va, rows_ok)


def _triton(g, m_codes, m_scale, v_codes, v_scale, hyper, *, m_map, v_map, n=None,
            sign_fix=True, interpret=False, block_rows=None):  # fmt: skip
    from jax.experimental.pallas import triton as plt

    rows, n_pad, nb_all, bs, batch, r, n, rank1 = _layout(g, m_scale, v_scale, n)
    nb = _tile_blocks(nb_all)
    w = nb * bs
    br = block_rows or (32 if rank1 else 8)
    grid = (batch, pl.cdiv(r, br), nb_all // nb)
    kw = dict(br=br, r=r, nb=nb, bs=bs, n=n)
    as3 = lambda x: x.reshape(batch, r, x.shape[-1])  # noqa: E731
    tile = lambda width: pl.BlockSpec((None, br, width), lambda b, i, j: (b, i, j))  # noqa: E731
    per_row = pl.BlockSpec((None, br, 1), lambda b, i, j: (b, i, 0))
    per_col = pl.BlockSpec((None, 1, w), lambda b, i, j: (b, 0, j))
    hyper_spec = pl.BlockSpec((1, _N_HYPER), lambda b, i, j: (0, 0))
    tm, tv = jnp.asarray(m_map.values), jnp.asarray(v_map.values)
    whole = [pl.BlockSpec(t.shape, lambda b, i, j: (0,)) for t in (tm, tv)]
    params = plt.CompilerParams(num_warps=8 if br >= 32 else 4, num_stages=1)
    f32 = jnp.float32
    sds = jax.ShapeDtypeStruct
    if rank1:
        rows3 = lambda x: x.astype(f32).reshape(batch, r, 1)  # noqa: E731
        cols3 = lambda x: x.astype(f32).reshape(batch, 1, n)  # noqa: E731
        row_old, col_old = rows3(v_scale[0]), cols3(v_scale[1])
        row_part, col_part = pl.pallas_call(
            lambda *refs: _maxima_kernel(*refs, **kw, v_map=v_map),
            out_shape=[sds((batch, r, grid[2]), f32), sds((batch, grid[1], n_pad), f32)],
            grid=grid,
            in_specs=[hyper_spec, tile(w), tile(w // 2), per_row, per_col, whole[1]],
            out_specs=[pl.BlockSpec((None, br, 1), lambda b, i, j: (b, i, j)),
                       pl.BlockSpec((None, 1, w), lambda b, i, j: (b, i, j))],  # fmt: skip
            compiler_params=params, interpret=interpret, name="jaxq_adam4_maxima",
        )(hyper, as3(g), as3(v_codes), row_old, col_old, tv)  # fmt: skip
        row = _flush(jnp.max(row_part, axis=2))
        col = _flush(jnp.max(col_part, axis=1))[:, :n]
        v_in, v_specs = [row_old, col_old, rows3(row), cols3(col)], [per_row, per_col] * 2
        v_out = []
    else:
        v_in, v_specs = [as3(v_scale)], [tile(nb)]
        v_out = [(sds((batch, r, nb_all), v_scale.dtype), tile(nb))]
    outs = pl.pallas_call(
        lambda *refs: _update_kernel(*refs, **kw, m_map=m_map, v_map=v_map,
                                     sign_fix=sign_fix, rank1=rank1),  # fmt: skip
        out_shape=[sds((batch, r, n_pad), jnp.promote_types(g.dtype, f32)),
                   sds((batch, r, n_pad // 2), jnp.uint8),
                   sds((batch, r, nb_all), m_scale.dtype),
                   sds((batch, r, v_codes.shape[1]), jnp.uint8)] + [s for s, _ in v_out],
        grid=grid,
        in_specs=[hyper_spec, tile(w), tile(w // 2), tile(nb), tile(w // 2), *v_specs, *whole],
        out_specs=[tile(w), tile(w // 2), tile(nb), tile(w // 2)] + [b for _, b in v_out],
        compiler_params=params, interpret=interpret, name="jaxq_adam4_update",
    )(hyper, as3(g), as3(m_codes), as3(m_scale), as3(v_codes), *v_in, tm, tv)  # fmt: skip
    u, mc, ma, vc = (x.reshape(rows, -1) for x in outs[:4])
    v_state = (row.reshape(rows), col) if rank1 else outs[4].reshape(rows, nb_all)
    return u, mc, ma, vc, v_state


# ------------------------------------------------------------------------------ dispatch


def _is_map16(spec) -> bool:
    return getattr(spec, "values", None) is not None and len(spec.values) == 16 and \
        getattr(spec, "search", None) is None  # fmt: skip


def why_not(impl: R.Implementation, g, m_scale, m_map, v_map, *, interpret=False) -> str | None:
    """Why ``impl`` cannot run this update here (``None``: it can)."""
    reason = R.check_triton(impl, 8.0, interpret)
    if reason:
        return reason
    bs = g.shape[1] // max(m_scale.shape[1], 1)
    if not _pow2(bs) or bs < 32:
        return f"the block size ({bs}) is not a power of two >= 32"
    for name, spec in (("m_map", m_map), ("v_map", v_map)):
        if not _is_map16(spec):
            return f"{name} is not a 16-value map"
    return None


def implementation_for(g, m_scale, m_map, v_map, implementation=None, interpret=False) -> str:
    """The implementation :func:`adam_update` runs for these operands (registry rule)."""
    return R.choose(_NAME, implementation,
                    lambda i: why_not(i, g, m_scale, m_map, v_map, interpret=interpret))


def _shape(x) -> str:
    return f"{x.dtype}{list(x.shape)}"


def _check(g, m_codes, m_scale, v_codes, v_scale, hyper, m_map, v_map, n):
    err = lambda msg: ValueError(f"{_NAME}: {msg}")  # noqa: E731
    for name, spec in (("m_map", m_map), ("v_map", v_map)):
        if not _is_map16(spec):
            raise err(f"{name} must be a 16-value jaxq.optim.maps.CodeBook (SIGNED4, "
                      f"LINEAR4), got {spec!r}")  # fmt: skip
    if g.ndim != 2 or not jnp.issubdtype(g.dtype, jnp.floating):
        raise err(f"g must be a 2-D float array (rows, n_pad), got {_shape(g)}")
    rows, n_pad = g.shape
    scale_ok = lambda s: s.ndim == 2 and s.shape[0] == rows and s.shape[1] and \
        n_pad % (2 * s.shape[1]) == 0 and s.dtype in (jnp.float32, jnp.bfloat16)  # noqa: E731
    if not scale_ok(m_scale):
        raise err(f"m_scale must be float32/bfloat16 (rows, n_pad / block) with an even "
                  f"block dividing {n_pad}, got {_shape(m_scale)} for g {list(g.shape)}")
    bs = n_pad // m_scale.shape[1]
    packed = (rows, n_pad // 2)
    if m_codes.shape != packed or m_codes.dtype != jnp.uint8:
        raise err(f"m_codes must be packed uint8{list(packed)}, got {_shape(m_codes)}")
    if isinstance(v_scale, tuple):
        if len(v_scale) != 2 or any(getattr(a, "dtype", None) != jnp.float32 for a in v_scale):
            raise err("v_scale of a rank-1 second moment must be (row_max, col_max), "
                      "float32")
        row, col = v_scale
        if row.shape != (rows,) or col.ndim != 2 or not col.shape[0] or rows % col.shape[0]:
            raise err(f"v_scale must be row maxima ({rows},) and column maxima (batch, n) "
                      f"with batch dividing {rows}, got {list(row.shape)}, "
                      f"{list(col.shape)}")  # fmt: skip
        if n is not None and n != col.shape[1]:
            raise err(f"n ({n}) must equal the column maxima's length {col.shape[1]}")
        n = col.shape[1]
        packed = (rows, (n + 1) // 2)
    elif not scale_ok(v_scale) or v_scale.shape != m_scale.shape:
        raise err(f"v_scale must be like m_scale {list(m_scale.shape)} (float32/bfloat16), "
                  f"or a (row_max, col_max) pair, got {_shape(v_scale)}")
    n = n_pad if n is None else n
    if not n_pad - bs < n <= n_pad:
        raise err(f"n ({n}) must be in ({n_pad - bs}, {n_pad}]: the row length before "
                  f"padding to blocks of {bs}")
    if v_codes.shape != packed or v_codes.dtype != jnp.uint8:
        raise err(f"v_codes must be packed uint8{list(packed)}, got {_shape(v_codes)}")
    if tuple(hyper.shape) != (1, _N_HYPER):
        raise err(f"hyper must come from hyperparameters() (shape (1, {_N_HYPER})), got "
                  f"{list(hyper.shape)}")  # fmt: skip


def adam_update(g, m_codes, m_scale, v_codes, v_scale, hyper, *, m_map, v_map, n=None,
                sign_fix=True, implementation=None, interpret=False):  # fmt: skip
    """One Adam step on packed 4-bit moments (``adamw_4bit``'s state), fused.

    Args:
        g: gradients ``(rows, n_pad)`` in the row layout (zero padding).
        m_codes, m_scale: first moment: packed uint8 codes ``(rows, n_pad / 2)`` and block
            absmax ``(rows, n_pad / B)`` (float32 or bfloat16).
        v_codes, v_scale: second moment: codes and scales like the first moment's (a
            block codec), or rank-1: codes ``(rows, ceil(n / 2))`` of the matrix view and
            ``v_scale = (row_max, col_max)``, float32 ``(rows,)`` and ``(batch, n)``
            (``rows = batch * r``; see :class:`jaxq.optim.codecs.Rank1Codec`).
        hyper: :func:`hyperparameters` of this step.
        m_map, v_map: the moments' 16-value :class:`jaxq.optim.maps.CodeBook`.
        n: the row length before padding (default: ``col_max``'s length, else ``n_pad``);
            the padding holds zero moments.
        sign_fix: the first moment never flips sign on re-encoding.
        implementation: ``None``, ``"pallas"``, ``"triton"`` or ``"xla"``.
        interpret: run the Pallas kernels in interpret mode.

    Returns:
        ``(u, m_codes, m_scale, v_codes, v_scale)``: the update (float32, before the
        learning rate) and the new state, ``v_scale`` in its given form.

    Raises:
        ValueError: shapes or dtypes that do not form one row layout (the message names
            the argument), or an ``implementation`` that cannot run.
    """
    _check(g, m_codes, m_scale, v_codes, v_scale, hyper, m_map, v_map, n)
    impl = implementation_for(g, m_scale, m_map, v_map, implementation, interpret)
    kw = dict(m_map=m_map, v_map=v_map, n=n, sign_fix=sign_fix)
    if impl == "xla":
        return reference(g, m_codes, m_scale, v_codes, v_scale, hyper, **kw)
    return _triton(g, m_codes, m_scale, v_codes, v_scale, hyper, interpret=interpret, **kw)


_REQ = ("NVIDIA GPU, compute capability >= 8.0; 16-value maps, power-of-two blocks >= 32; "
        "two passes for a rank-1 second moment")
R.register(R.Kernel(
    name=_NAME, module=__name__, reference=reference,
    implementations=(R.Implementation("triton", ("gpu",), _REQ), R.XLA),
    tolerance="codes, scales and maxima bit-identical in interpret mode where no "
              "contracted multiply-add can move a moment (exact products with the betas), "
              "else within the ulp by which XLA's own strategies differ (a code by one step "
              "at a midpoint); |du| <= 1e-6 max(1, |u|)",
))  # fmt: skip
