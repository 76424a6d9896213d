"""Fused 8-bit Adam update: decode, step and re-encode each block of moments in one pass.

The state of :func:`jaxq.optim.adamw_8bit` keeps both moments as 8-bit codes on a
256-value map (bitsandbytes' dynamic maps) with one absmax per block of ``B`` values along
a row; :func:`jaxq.optim.adamw_fp8` keeps them as E4M3 codes with one scale
``absmax / 448`` per block. One optimizer step per element, in float32:

.. math::

    \\hat g &= \\begin{cases} \\mathrm{clip}(g, \\pm 2^{63}) & g \\text{ finite} \\\\
              0 & \\text{else} \\end{cases}, \\qquad
    m_0 = \\mathrm{map}_m[c_m]\\, a_m, \\qquad v_0 = \\mathrm{map}_v[c_v]\\, a_v, \\\\
    m &= \\beta_1 m_0 + (1 - \\beta_1)\\hat g, \\qquad
    v = \\beta_2 v_0 + (1 - \\beta_2)\\hat g^2, \\qquad
    u = \\frac{m / (1 - \\beta_1^t)}{\\sqrt{v} / \\sqrt{1 - \\beta_2^t} + \\epsilon},

with ``u = 0`` and the old moments kept where ``g`` is not finite; then per block the new
absmax ``a = max |m|`` (stored rounded up to the scale dtype; below float32's smallest
normal: 0) and the codes ``c = nearest(m / a)`` (the first moment never flips sign); for
E4M3 the scale is ``a / 448``, the codes ``E4M3(m / s)`` rounded to nearest even, and a
positive second moment that would round to 0 is stored as the smallest subnormal. This
is :mod:`jaxq.optim`'s update; under XLA it reads and writes the moments several times
(decode, block statistics, encode); the kernel reads each byte of state once and writes
it once. Per parameter it reads the gradient (4 bytes) and two codes (2) and writes two
codes (2) and the update (4): 12 bytes, plus ``8 / B`` of block scales; optax's float32
Adam reads the gradient and two moments (12) and writes two moments and the update (12):
24. This is byte counting; no GPU has timed it.

The nearest-code search is one lookup in the map's bucket table
(:class:`jaxq.optim.maps.CodeBook`'s ``search``, indexed by the high bits of the float32
pattern), so the kernel gathers from two small tables per map moment and needs no loop;
E4M3 codes are integer arithmetic on the float32 pattern (:mod:`jaxq.quantization.cast`).

Operands are in the optimizer's *row layout*: ``(rows, n_pad)`` gradients and codes,
``(rows, n_pad / B)`` scales (see :mod:`jaxq.optim.blockwise`). The Triton kernel and
:func:`reference` run the same per-block function (:func:`_block_update`); the Mosaic GPU
kernel (:mod:`jaxq.kernels.fused_adam_mosaic`, E4M3 moments) the same operations in the
same order, chunk by chunk. In interpret
mode the new codes and scales equal :mod:`jaxq.optim`'s XLA path bit for bit, including
the non-finite-gradient rule (tested); the update ``u`` agrees to float32 rounding of the
multiply-adds, ``|Δu| <= 1e-6 max(1, |u|)``: compilers contract ``β m + (1 - β) g`` into
one fused multiply-add or not, and XLA's own CPU strategies differ from each other by as
much. On a GPU the same can move a moment by one float32 ulp, and so a code by one step
where that ulp crosses a midpoint.

Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jaxq.kernels import fused_adam
    >>> from jaxq.optim import maps
    >>> g = jax.random.normal(jax.random.key(0), (4, 512))
    >>> codes = jnp.full((4, 512), 127, jnp.uint8)     # the map's zero
    >>> scale = jnp.zeros((4, 2), jnp.bfloat16)
    >>> hyper = fused_adam.hyperparameters(0.9, 0.999, 1e-8, count=1)
    >>> args = (g, codes, scale, jnp.zeros_like(codes), scale, hyper)
    >>> kw = dict(m_map=maps.SIGNED8, v_map=maps.UNSIGNED8)
    >>> u, *state = fused_adam.adam_update(*args, **kw, implementation="pallas",
    ...                                         interpret=True)
    >>> ref = fused_adam.adam_update(*args, **kw, implementation="xla")
    >>> all(bool((a == b).all()) for a, b in zip(state, ref[1:]))
    True
    >>> bool(jnp.allclose(u, jnp.sign(g), atol=1e-3))   # Adam's first step is sign(g)
    True
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxq import formats as F
from jaxq.quantization.cast import e4m3_bits, e4m3_values

from . import registry as R

__all__ = ["adam_update", "reference", "hyperparameters", "why_not", "implementation_for"]

_GRAD_LIMIT = np.float32(2.0**63)
_TINY = np.float32(np.finfo(np.float32).tiny)
_N_HYPER = 8  # b1, 1 - b1, b2, 1 - b2, 1 - b1^t, sqrt(1 - b2^t), eps, (unused)


def hyperparameters(b1, b2, eps, count) -> jax.Array:
    """The step's scalars as the kernel reads them (float32, computed as :mod:`jaxq.optim`).

    ``count`` is the step number ``t`` after incrementing (1 on the first step).
    """
    t = jnp.asarray(count).astype(jnp.float32)
    b1, b2 = jnp.asarray(b1, jnp.float32), jnp.asarray(b2, jnp.float32)
    bc1, bc2_sqrt = 1.0 - b1**t, jnp.sqrt(1.0 - b2**t)
    h = [b1, 1.0 - b1, b2, 1.0 - b2, bc1, bc2_sqrt, jnp.asarray(eps, jnp.float32), 0.0]
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in h]).reshape(1, _N_HYPER)


def _round_up(a, scale_dtype):
    """Non-negative float32 ``a`` stored in ``scale_dtype`` without rounding below ``a``."""
    if jnp.dtype(scale_dtype) == jnp.float32:
        return a
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
    up = (bits + jnp.uint32(0xFFFF)) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(up, jnp.float32).astype(scale_dtype)


def _map_encode(x, book, search):
    """Nearest-code index of float32 ``x``: ``CodeBook.encode``'s merged bucket table
    (``search``, its gather) for 256-value maps; a small map without a table (16 values)
    encodes by its own comparisons or closed form, which are elementwise."""
    if book.search is None:
        return book.encode(x)
    shift = np.uint32(book.shift)
    mask = np.uint32((1 << book.shift) - 1)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    flip = (bits & mask) ^ ((bits >> np.uint32(31)) * mask)
    entry = search((bits >> shift).astype(jnp.int32))
    return ((entry + flip) >> shift).astype(jnp.int32)


def _is_map(spec) -> bool:
    return not isinstance(spec, str)


def _decode(codes, scale, spec, lookups):
    """float32 values of one moment's codes (``lookups``: its value and search gathers)."""
    if _is_map(spec):
        vals = lookups[0](codes.astype(jnp.int32))
    else:
        vals = e4m3_values(codes)
    return vals * scale.astype(jnp.float32)


def _encode(x, old_scale, spec, lookups, *, first: bool, sign_fix: bool):
    """New codes (uint8) and block scale of one moment, as :mod:`jaxq.optim`'s codecs."""
    a = jnp.maximum(jnp.max(x, axis=1, keepdims=True), -jnp.min(x, axis=1, keepdims=True))
    a = jnp.where(a >= _TINY, a, 0.0)
    if not _is_map(spec):  # FP8Codec: scale = absmax / 448
        a = a / np.float32(F.E4M3.max)
        a = jnp.where(a >= _TINY, a, 0.0)
    a = _round_up(a, old_scale.dtype)
    safe = jnp.where(a > 0, a.astype(jnp.float32), 1.0)
    y = x * (1.0 / safe)
    if not _is_map(spec):
        y = jnp.clip(y, -F.E4M3.max, F.E4M3.max)
        bits = e4m3_bits(y)
        if not first:  # the second moment never rounds a positive value to 0
            bits = jnp.where((bits == 0) & (y > 0), np.uint8(1), bits)
        return bits, a
    idx = _map_encode(y, spec, lookups[1] if len(lookups) > 1 else None)
    if first and sign_fix:  # a nonzero first moment never flips sign or becomes 0
        neg = spec.negatives
        down = ((x < 0) & (idx >= neg)).astype(jnp.int32)
        idx = idx - down + ((x > 0) & (idx < neg)).astype(jnp.int32)
    return idx.astype(jnp.uint8), a


def _sanitize(g):
    """float32 ``g`` with non-finite elements 0 and ``|g| <= 2**63``, and the finite mask."""
    g32 = g.astype(jnp.float32)
    finite = jnp.isfinite(g32)
    return jnp.where(finite, jnp.clip(g32, -_GRAD_LIMIT, _GRAD_LIMIT), 0.0), finite


def _block_update(h, g, mc, ma, vc, va, lookups, *, m_map, v_map, sign_fix):
    """One block column ``(rows, B)`` of the update; ``h`` the scalars, ``ma``/``va``
    ``(rows, 1)`` scales, ``lookups`` per moment its table gathers. Returns
    ``(u, m codes, m scale, v codes, v scale)`` (scales in their stored dtype)."""
    b1, c1, b2, c2, bc1, bc2_sqrt, eps = h
    g32, finite = _sanitize(g)
    m0 = _decode(mc, ma, m_map, lookups[0])
    v0 = _decode(vc, va, v_map, lookups[1])
    m = b1 * m0 + c1 * g32
    v = b2 * v0 + c2 * (g32 * g32)
    u = (m / bc1) / (jnp.sqrt(v) / bc2_sqrt + eps)
    u = jnp.where(finite, u, 0.0)
    m, v = jnp.where(finite, m, m0), jnp.where(finite, v, v0)
    m_out = _encode(m, ma, m_map, lookups[0], first=True, sign_fix=sign_fix)
    v_out = _encode(v, va, v_map, lookups[1], first=False, sign_fix=False)
    return (u, *m_out, *v_out)


def _tables(m_map, v_map):
    """The gather tables, two per map moment (values, bucket search), none for E4M3."""
    return [[jnp.asarray(spec.values), jnp.asarray(spec.search)] if _is_map(spec) else []
            for spec in (m_map, v_map)]  # fmt: skip


def _hyper_tuple(h_at):
    return tuple(h_at(k) for k in range(_N_HYPER - 1))


def reference(g, m_codes, m_scale, v_codes, v_scale, hyper, *, m_map, v_map, sign_fix=True):
    """The update under XLA (whole arrays): ``(u, m_codes, m_scale, v_codes, v_scale)``."""
    bs = g.shape[1] // m_scale.shape[1]
    rows, nb = m_scale.shape
    blocks = lambda x: x.reshape(rows * nb, bs)  # noqa: E731
    cols = lambda s: s.reshape(rows * nb, 1)  # noqa: E731
    gather = lambda t: functools.partial(lambda t, i: t[i], t)  # noqa: E731
    lookups = [[gather(t) for t in ts] for ts in _tables(m_map, v_map)]
    res = _block_update(_hyper_tuple(lambda k: hyper[0, k]), blocks(g), blocks(m_codes),
                        cols(m_scale), blocks(v_codes), cols(v_scale), lookups, m_map=m_map,
                        v_map=v_map, sign_fix=sign_fix)  # fmt: skip
    u, mc, ma, vc, va = res
    full, per_block = (rows, nb * bs), (rows, nb)
    return (u.reshape(full), mc.reshape(full), ma.reshape(per_block), vc.reshape(full),
            va.reshape(per_block))  # fmt: skip


def _kernel(h_ref, g_ref, mc_ref, ma_ref, vc_ref, va_ref, *refs, bs, nb, m_map, v_map,
            sign_fix, n_tables):  # fmt: skip
    tables, (u_ref, mc_out, ma_out, vc_out, va_out) = refs[:-5], refs[-5:]
    h = _hyper_tuple(lambda k: h_ref[:, pl.ds(k, 1)])
    gather = lambda ref: functools.partial(lambda ref, i: ref[i], ref)  # noqa: E731
    lookups = [[gather(r) for r in tables[: n_tables[0]]],
               [gather(r) for r in tables[n_tables[0] :]]]  # fmt: skip
    for j in range(nb):  # the tile's blocks, one column of blocks per step
        cols, col = pl.ds(j * bs, bs), pl.ds(j, 1)
        u, mc, ma, vc, va = _block_update(
            h, g_ref[:, cols], mc_ref[:, cols], ma_ref[:, col], vc_ref[:, cols],
            va_ref[:, col], lookups, m_map=m_map, v_map=v_map, sign_fix=sign_fix,
        )  # fmt: skip
        u_ref[:, cols] = u.astype(u_ref.dtype)
        mc_out[:, cols], ma_out[:, col] = mc, ma
        vc_out[:, cols], va_out[:, col] = vc, va


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _tile_blocks(nb: int, most: int = 4) -> int:
    """Blocks per program: the largest power of two up to ``most`` that divides ``nb``."""
    k = most
    while nb % k:
        k //= 2
    return k


def _triton(g, m_codes, m_scale, v_codes, v_scale, hyper, *, m_map, v_map, sign_fix,
            interpret, block_rows=8):  # fmt: skip
    from jax.experimental.pallas import triton as plt

    rows, n = g.shape
    # whole tiles only (registry.pad_to): a row tile that divides the rows, so that the
    # state is never copied to pad it
    block_rows = R.dividing_tile(rows, block_rows, smallest=1)
    nb_all = m_scale.shape[1]
    bs = n // nb_all
    nb = _tile_blocks(nb_all)
    per_moment = _tables(m_map, v_map)
    tables = per_moment[0] + per_moment[1]
    tile = lambda w: pl.BlockSpec((block_rows, w), lambda i, j: (i, j))  # noqa: E731
    whole = lambda t: pl.BlockSpec(t.shape, lambda i, j: (0,))  # noqa: E731
    f32 = jnp.promote_types(g.dtype, jnp.float32)
    return pl.pallas_call(
        functools.partial(_kernel, bs=bs, nb=nb, m_map=m_map, v_map=v_map, sign_fix=sign_fix,
                          n_tables=(len(per_moment[0]), len(per_moment[1]))),
        out_shape=[jax.ShapeDtypeStruct((rows, n), f32),
                   jax.ShapeDtypeStruct(m_codes.shape, jnp.uint8),
                   jax.ShapeDtypeStruct(m_scale.shape, m_scale.dtype),
                   jax.ShapeDtypeStruct(v_codes.shape, jnp.uint8),
                   jax.ShapeDtypeStruct(v_scale.shape, v_scale.dtype)],  # fmt: skip
        grid=(pl.cdiv(rows, block_rows), nb_all // nb),
        in_specs=[pl.BlockSpec((1, _N_HYPER), lambda i, j: (0, 0)),
                  tile(nb * bs), tile(nb * bs), tile(nb), tile(nb * bs), tile(nb),
                  *[whole(t) for t in tables]],  # fmt: skip
        out_specs=[tile(nb * bs), tile(nb * bs), tile(nb), tile(nb * bs), tile(nb)],
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="jaxq_adam_update",
    )(hyper, g, m_codes, m_scale, v_codes, v_scale, *tables)


def why_not(impl: R.Implementation, g, m_scale, m_map, v_map, *, interpret=False) -> str | None:
    """Why ``impl`` cannot run this update here (``None``: it can)."""
    if impl.name == "mosaic_gpu":
        reason = R.check_mosaic_gpu(impl, 9.0, interpret)
    else:
        reason = R.check_triton(impl, 8.0, interpret)
    if reason:
        return reason
    bs = g.shape[1] // max(m_scale.shape[1], 1)
    if not _pow2(bs) or bs < 16:
        return f"the block size ({bs}) is not a power of two >= 16"
    for name, spec in (("m_map", m_map), ("v_map", v_map)):
        if _is_map(spec) and (getattr(spec, "search", None) is None or len(spec.values) != 256):
            return f"{name} is not a 256-value map with a bucket table"
    if impl.name == "mosaic_gpu":
        from . import fused_adam_mosaic

        return fused_adam_mosaic.why_not(g, m_scale, m_map, v_map)
    return None


def implementation_for(g, m_scale, m_map, v_map, implementation=None, interpret=False) -> str:
    """The implementation :func:`adam_update` runs for these operands (registry rule)."""
    return R.choose("adam_update", implementation,
                    lambda i: why_not(i, g, m_scale, m_map, v_map, interpret=interpret))


def _check(g, m_codes, m_scale, v_codes, v_scale, hyper, m_map, v_map):
    for name, spec in (("m_map", m_map), ("v_map", v_map)):
        if spec != "e4m3" and not hasattr(spec, "values"):
            raise ValueError(f"adam_update: {name} must be a jaxq.optim.maps.CodeBook or "
                             f"'e4m3', got {spec!r}")  # fmt: skip
    if g.ndim != 2 or not jnp.issubdtype(g.dtype, jnp.floating):
        raise ValueError(f"adam_update: g must be a 2-D float array (rows, n_pad), got "
                         f"{g.dtype}{list(g.shape)}")  # fmt: skip
    rows, n = g.shape
    for name, c in (("m_codes", m_codes), ("v_codes", v_codes)):
        if c.shape != g.shape or c.dtype != jnp.uint8:
            raise ValueError(f"adam_update: {name} must be uint8{list(g.shape)} like g, "
                             f"got {c.dtype}{list(c.shape)}")  # fmt: skip
    for name, s in (("m_scale", m_scale), ("v_scale", v_scale)):
        if s.ndim != 2 or s.shape[0] != rows or not s.shape[1] or n % s.shape[1] or \
                s.dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"adam_update: {name} must be float32/bfloat16 (rows, "
                             f"n_pad / block) with a block dividing {n}, got "
                             f"{s.dtype}{list(s.shape)} for g {list(g.shape)}")  # fmt: skip
    if m_scale.shape != v_scale.shape:
        raise ValueError(f"adam_update: m_scale {list(m_scale.shape)} and v_scale "
                         f"{list(v_scale.shape)} must have one shape")  # fmt: skip
    if tuple(hyper.shape) != (1, _N_HYPER):
        raise ValueError(f"adam_update: hyper must come from hyperparameters() "
                         f"(shape (1, {_N_HYPER})), got {list(hyper.shape)}")  # fmt: skip


def adam_update(g, m_codes, m_scale, v_codes, v_scale, hyper, *, m_map, v_map,
                     sign_fix=True, implementation=None, interpret=False):  # fmt: skip
    """One Adam step on 8-bit blockwise moments (map codes or E4M3), fused.

    Args:
        g: gradients ``(rows, n_pad)`` in the row layout (zero padding).
        m_codes, m_scale: first moment: uint8 codes ``(rows, n_pad)`` (E4M3 codes as
            their bit patterns) and block scales ``(rows, n_pad / B)`` (float32 or
            bfloat16): the absmax for map codes, absmax / 448 for E4M3.
        v_codes, v_scale: second moment, likewise.
        hyper: :func:`hyperparameters` of this step.
        m_map, v_map: each moment's :class:`jaxq.optim.maps.CodeBook` (256 values), or
            ``"e4m3"`` (:class:`jaxq.optim.codecs.FP8Codec`; a positive second moment
            never rounds to 0).
        sign_fix: the first moment never flips sign on re-encoding.
        implementation: ``None``, ``"pallas"``, ``"mosaic_gpu"`` (Hopper GPU, JAX >= 0.12,
            E4M3 moments, blocks <= 256: :mod:`~jaxq.kernels.fused_adam_mosaic`),
            ``"triton"`` or ``"xla"``; with ``interpret=True``, ``"pallas"`` picks the
            Mosaic GPU kernel where it applies on JAX >= 0.12, else the Triton kernel.
        interpret: run the Pallas kernel in interpret mode.

    Returns:
        ``(u, m_codes, m_scale, v_codes, v_scale)``: the update (float32, before the
        learning rate) and the new state.

    Raises:
        ValueError: shapes or dtypes that do not form one row layout, or an
            ``implementation`` that cannot run.
    """
    _check(g, m_codes, m_scale, v_codes, v_scale, hyper, m_map, v_map)
    impl = implementation_for(g, m_scale, m_map, v_map, implementation, interpret)
    kw = dict(m_map=m_map, v_map=v_map, sign_fix=sign_fix)
    if impl == "xla":
        return reference(g, m_codes, m_scale, v_codes, v_scale, hyper, **kw)
    if impl == "mosaic_gpu":
        from . import fused_adam_mosaic

        return fused_adam_mosaic.adam_update(g, m_codes, m_scale, v_codes, v_scale, hyper,
                                             interpret=interpret)  # fmt: skip
    return tuple(_triton(g, m_codes, m_scale, v_codes, v_scale, hyper, interpret=interpret,
                         **kw))  # fmt: skip


_REQ = ("NVIDIA GPU, compute capability >= 8.0; 256-value maps or E4M3, power-of-two "
        "blocks >= 16")
_REQ_MOSAIC = ("NVIDIA GPU, compute capability >= 9.0, JAX >= 0.12; E4M3 moments (not maps: "
               "no gather), power-of-two blocks 16-256")
R.register(R.Kernel(
    name="adam_update", module=__name__, reference=reference,
    implementations=(R.Implementation("mosaic_gpu", ("gpu",), _REQ_MOSAIC),
                     R.Implementation("triton", ("gpu",), _REQ), R.XLA),
    tolerance="codes and scales bit-identical in interpret mode, |du| <= 1e-6 max(1, |u|); "
              "on a GPU a contracted multiply-add may move a code by one step at a midpoint",
))  # fmt: skip
