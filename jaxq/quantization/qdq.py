"""``quantize`` / ``dequantize``: scaled quantization at tensor, channel or block granularity.

For an element format with largest value ``M`` and a group (the tensor, one channel, or one
block) with clipping range ``amax`` (see :mod:`jaxq.quantization.calibration`):

* scale ``s = amax / M`` (1 for an all-zero group), rounded to the smallest float32 with
  ``fl(M·s) >= amax``, so that ``quantize(dequantize(q))`` reproduces ``q`` exactly;
* codes ``c = round_fmt(x / s)`` (saturating), value ``c · s``.

Asymmetric integer formats (``uint8``/``uint4``/``uint2``) map ``[lo, hi] ∋ 0`` onto
``[0, 2^b − 1]``: ``s = (hi − lo) / (2^b − 1)``, zero point ``z = round(−lo / s)``, value
``(c − z) · s``.

Block formats follow their specs exactly (see :mod:`jaxq.formats.block`): MX uses the E8M0
scale ``2^(floor(log2 amax) − emax_elem)``; NVFP4 uses ``s_t = amax_tensor / 2688`` and
``s_b = E4M3(amax_block / (6 s_t))``.

Non-finite inputs: statistics ignore them. Elements the element format can encode (NaN in
FP8; inf in E5M2) are stored as such; E4M3 stores inf as NaN. A group containing a value the
element format cannot encode (NaN for FP6/FP4/INT/NF4; ±inf for any format without inf
other than E4M3) gets a NaN scale, so the whole group dequantizes to NaN — never to a
silently finite number.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import formats as F
from jaxq.quantization import packing
from jaxq.quantization.calibration import (
    MSE,
    Absmax,
    Calibration,
    group_amax,
    scale_for_amax,
)
from jaxq.quantization.cast import (
    _check_float_input,
    _check_rounding,
    _round_grid,
    floor_log2,
    pow2,
)
from jaxq.quantization.codes import decode, encode
from jaxq.quantization.qarray import Layout, QArray, dequantize

__all__ = ["quantize", "dequantize", "pow2"]

_NVFP4_DENOM = 448.0 * 6.0


def _normalize_axis(axis: int, ndim: int, shape) -> int:
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}") from None
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an array of shape {tuple(shape)}")
    return axis % ndim


def _layout(shape, fmt, axis, block_size) -> Layout:
    ndim = len(shape)
    if isinstance(fmt, F.BlockFormat):
        if block_size not in (None, fmt.block_size):
            raise ValueError(
                f"{fmt.name} has a fixed block size of {fmt.block_size}, "
                f"got block_size={block_size}"
            )
        block_size = fmt.block_size
    if block_size is not None:
        if isinstance(axis, (tuple, list)):
            raise ValueError(f"block quantization takes a single axis, got axis={axis}")
        if ndim == 0:
            raise ValueError("block quantization needs at least one axis, got a scalar x")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        a = _normalize_axis(-1 if axis is None else axis, ndim, shape)
        if shape[a] % block_size:
            raise ValueError(
                f"block_size {block_size} does not divide axis {a} of size {shape[a]} "
                f"(x.shape={tuple(shape)}); pad the array or choose another block size"
            )
        return Layout("block", (a,), block_size)
    if axis is None:
        return Layout("tensor")
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    axes = tuple(sorted({_normalize_axis(a, ndim, shape) for a in axes}))
    return Layout("channel", axes)


def _materialize(s: jax.Array) -> jax.Array:
    """``s`` itself, computed once: XLA:CPU removes optimisation barriers, but it does not
    recompute a reduction inside each per-element loop that reads it, as it would for the
    E4M3 conversion of a block scale."""
    return jnp.min(jnp.stack([s, jnp.full_like(s, jnp.inf)]), axis=0)


def _broadcast_amax(amax, layout: Layout, shape) -> jax.Array:
    """Broadcasts a user-given amax (scalar or of the scale shape) to the grouped shape."""
    amax = jnp.asarray(amax, jnp.float32)
    target = layout.group_scale_shape(shape)
    if amax.ndim:
        want = layout.scale_shape(shape)
        if tuple(amax.shape) != want:
            raise ValueError(f"amax has shape {tuple(amax.shape)}, expected () or {want}")
        amax = amax.reshape(target)
    return jnp.broadcast_to(amax, target)


def _poison(xg, red, elem) -> jax.Array:
    """True for groups holding a value the element format cannot encode.

    Every element format either encodes NaN (FP8) or encodes neither NaN nor inf, so the
    test is whether any element of the group is non-finite. (An explicit test: XLA:CPU's
    vectorized ``max`` does not propagate NaN for every shape.)
    """
    if elem.has_nan:
        return jnp.zeros((), bool)
    return jnp.any(~jnp.isfinite(xg), axis=red, keepdims=True)


def _element_codes(xg, red, fmt, calibration, amax, rounding, key):
    """Symmetric element formats: returns ``(codes, scale)`` in the grouped shape."""
    m = fmt.max

    def qdq_error(a):
        s = scale_for_amax(a, m)
        err = decode(encode(xg / s, fmt), fmt) * s - xg
        return jnp.sum(jnp.where(jnp.isfinite(err), err * err, 0.0), axis=red, keepdims=True)

    if amax is None:
        amax = group_amax(xg, red, calibration, qdq_error)
    s = scale_for_amax(amax, m)
    codes = encode(xg / s, fmt, rounding=rounding, key=key)
    return codes, jnp.where(_poison(xg, red, fmt), jnp.nan, s)


def _asymmetric_codes(xg, red, fmt, calibration, rounding, key):
    xf = jnp.where(jnp.isfinite(xg), xg, 0.0)
    if isinstance(calibration, Absmax):
        lo, hi = jnp.min(xf, red, keepdims=True), jnp.max(xf, red, keepdims=True)
    elif hasattr(calibration, "q"):
        lo = jnp.percentile(xf, 100.0 - calibration.q, axis=red, keepdims=True)
        hi = jnp.percentile(xf, calibration.q, axis=red, keepdims=True)
    else:
        raise ValueError(f"asymmetric format {fmt.name} supports Absmax and Percentile calibration")
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    s = jnp.where(hi > lo, (hi - lo) / fmt.qmax, 1.0)
    zp = jnp.clip(jnp.round(-lo / s), 0, fmt.qmax)
    y = xg / s + zp
    c = jnp.clip(_round_grid(jnp.where(jnp.isfinite(y), y, zp), rounding, key), 0, fmt.qmax)
    s = jnp.where(_poison(xg, red, fmt), jnp.nan, s)
    return c.astype(jnp.uint8), s, zp.astype(jnp.uint8)


def _mx_codes(xg, red, fmt: F.BlockFormat, calibration, amax, rounding, key):
    elem = fmt.element

    def exponent(a):
        return jnp.where(a > 0, jnp.clip(floor_log2(a) - elem.emax, -127, 127), 0)

    if amax is None and isinstance(calibration, MSE):
        e = _mx_mse_exponent(xg, red, elem, calibration, exponent)
    else:
        e = exponent(group_amax(xg, red, calibration) if amax is None else amax)
    codes = encode(xg * pow2(-e), elem, rounding=rounding, key=key)
    bits = jnp.where(_poison(xg, red, elem), 255, e + 127).astype(jnp.uint8)
    return codes, jax.lax.bitcast_convert_type(bits, fmt.scale_format.dtype)


def _mx_mse_exponent(xg, red, elem, calibration: MSE, exponent):
    """Per block, the E8M0 exponent minimising the block's squared error.

    MX scales are powers of two, so the search runs over exponents rather than clipping
    ratios: the OCP exponent ``e₀ = floor(log2 amax) − emax`` first, then ``e₀ + 1`` (the
    round-up rule, under which nothing saturates), then ``e₀ − 1, e₀ − 2, …`` down to the
    exponent of ``min_ratio · amax``. A candidate replaces the best so far only when its
    error is strictly smaller, so ties keep the OCP exponent (and an all-zero block keeps 0).
    """
    amax = group_amax(xg, red, Absmax())
    e0 = exponent(amax)
    below = int(np.ceil(-np.log2(calibration.min_ratio)))
    offsets = jnp.asarray([1] + [-d for d in range(1, below + 1)], jnp.int32)

    def sq_error(e):
        err = decode(encode(xg * pow2(-e), elem), elem) * pow2(e // 2) * pow2(e - e // 2) - xg
        return jnp.sum(jnp.where(jnp.isfinite(err), err * err, 0.0), axis=red, keepdims=True)

    def body(carry, d):
        best_err, best_e = carry
        e = jnp.where(amax > 0, jnp.clip(e0 + d, -127, 127), 0)
        err = sq_error(e)
        better = err < best_err
        return (jnp.where(better, err, best_err), jnp.where(better, e, best_e)), None

    (_, e), _ = jax.lax.scan(body, (sq_error(e0), e0), offsets)
    return e


def _nvfp4_codes(xg, red, fmt: F.BlockFormat, calibration, amax, rounding, key, block_amax=None):
    elem = fmt.element
    block_absmax = group_amax(xg, red, Absmax()) if block_amax is None else block_amax
    if amax is None:
        t_amax = jnp.max(block_absmax)
    else:
        t_amax = jnp.asarray(amax, jnp.float32)
    s_t = scale_for_amax(t_amax, _NVFP4_DENOM)

    def block_scale(a):
        return jnp.clip(a / (elem.max * s_t), 0, F.E4M3.max).astype(F.E4M3.dtype)

    def qdq_error(a):
        d = block_scale(a).astype(jnp.float32) * s_t
        y = jnp.where(d > 0, xg / jnp.where(d > 0, d, 1.0), 0.0)
        err = decode(encode(y, elem), elem) * block_scale(a).astype(jnp.float32) * s_t - xg
        return jnp.sum(jnp.where(jnp.isfinite(err), err * err, 0.0), axis=red, keepdims=True)

    if isinstance(calibration, Absmax) or block_amax is not None:
        b_amax = block_absmax
    else:
        b_amax = group_amax(xg, red, calibration, qdq_error)
    s_b = block_scale(b_amax)
    d = s_b.astype(jnp.float32) * s_t
    # One reciprocal per block instead of a division per element: XLA:CPU divides with a
    # refined reciprocal anyway, and a division inside the packing loop does not vectorise.
    inv_d = _materialize(jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0))
    codes = encode(xg * inv_d, elem, rounding=rounding, key=key)
    s_b = jnp.where(_poison(xg, red, elem), jnp.nan, s_b.astype(jnp.float32)).astype(s_b.dtype)
    return codes, s_b, s_t.astype(jnp.float32)


@functools.partial(
    jax.jit, static_argnames=("fmt", "axis", "block_size", "calibration", "rounding")
)
def _quantize_jit(x, key, amax, *, fmt, axis, block_size, calibration, rounding):
    return _quantize(x, fmt, axis, block_size, calibration, rounding, key, amax)


def quantize(
    x: jax.Array,
    fmt: F.Format | str,
    *,
    axis: int | tuple[int, ...] | None = None,
    block_size: int | None = None,
    calibration: Calibration = Absmax(),
    rounding: str = "nearest",
    key: jax.Array | None = None,
    amax: jax.Array | None = None,
) -> QArray:
    """Quantizes ``x`` to ``fmt`` with per-tensor, per-channel or per-block scales.

    Granularity:
        * neither ``axis`` nor ``block_size``: one scale for the tensor;
        * ``axis`` (int or tuple) without ``block_size``: one scale per index of those axes
          (e.g. ``axis=-1`` for per-output-channel weights of shape ``(in, out)``);
        * ``block_size``: blocks of ``block_size`` consecutive elements along ``axis``
          (default: the last axis). Block formats fix their own block size.

    Args:
        x: floating-point array.
        fmt: a format or its name (``"e4m3"``, ``"int4"``, ``"nf4"``, ``"mxfp4"``, ``"nvfp4"``...).
        axis: channel axes, or the blocked axis.
        block_size: elements per block; must divide the blocked axis.
        calibration: :class:`Absmax` (default), :class:`Percentile` or :class:`MSE`.
        rounding: ``"nearest"`` or ``"stochastic"`` (needs ``key``).
        key: PRNG key for stochastic rounding.
        amax: precomputed clipping range (e.g. from :class:`AmaxHistory` for delayed
            scaling), broadcastable to the scale shape; replaces ``calibration``. For NVFP4 a
            scalar is the tensor amax, and an array of the scale shape gives each block's
            amax (the tensor amax is then their maximum), e.g. to share one scale over a
            2-D tile.

    Returns:
        A :class:`QArray`; see its invariants. Non-finite inputs: see the module docstring.

    Raises:
        TypeError: ``x`` is not floating point.
        ValueError: bad axis, block size not dividing the axis, unknown format or rounding.

    Example:
        >>> import jax, jax.numpy as jnp, jaxq
        >>> x = jax.random.normal(jax.random.key(0), (128, 256))
        >>> q = jaxq.quantize(x, "mxfp4")
        >>> q.scale.shape, q.codes.shape, q.bits_per_element
        ((128, 8), (128, 128), 4.25)
    """
    x = _check_float_input(x)
    fmt = F.get(fmt)
    _check_rounding(rounding, key)
    if isinstance(axis, list):
        axis = tuple(axis)
    return _quantize_jit(x, key, amax, fmt=fmt, axis=axis, block_size=block_size,
                         calibration=calibration, rounding=rounding)  # fmt: skip


def _quantize(x, fmt, axis, block_size, calibration, rounding, key, amax) -> QArray:
    if fmt is F.E8M0:
        raise ValueError("E8M0 is a scale format; quantize to a format that can hold elements")
    shape = tuple(x.shape)
    layout = _layout(shape, fmt, axis, block_size)
    xg = x.astype(jnp.float32).reshape(layout.grouped_shape(shape))
    red = layout.reduce_axes(shape)
    zp = ts = None
    nvfp4 = isinstance(fmt, F.BlockFormat) and fmt.tensor_scale
    block_amax = None
    if amax is not None and (not nvfp4 or jnp.ndim(amax) > 0):
        amax = _broadcast_amax(amax, layout, shape)
        if nvfp4:  # per-block amaxes; the tensor amax is their maximum
            block_amax, amax = amax, jnp.max(amax)
    if isinstance(fmt, F.BlockFormat) and fmt.is_mx:
        codes, scale = _mx_codes(xg, red, fmt, calibration, amax, rounding, key)
    elif nvfp4:
        codes, scale, ts = _nvfp4_codes(
            xg, red, fmt, calibration, amax, rounding, key, block_amax
        )
    elif isinstance(fmt, F.IntFormat) and not fmt.signed:
        if amax is not None:
            raise ValueError(f"amax= is not supported for asymmetric format {fmt.name}")
        codes, scale, zp = _asymmetric_codes(xg, red, fmt, calibration, rounding, key)
    else:
        codes, scale = _element_codes(xg, red, fmt, calibration, amax, rounding, key)
    s_shape = layout.scale_shape(shape)
    codes = codes.reshape(shape)
    elem = fmt.element if isinstance(fmt, F.BlockFormat) else fmt
    if elem.bits < 8:
        codes = packing.pack(codes.reshape(shape or (1,)), bits=elem.bits)
    return QArray(
        codes=codes,
        scale=scale.reshape(s_shape),
        zero_point=None if zp is None else zp.reshape(s_shape),
        tensor_scale=ts,
        fmt=fmt,
        shape=shape,
        dtype=np.dtype(x.dtype),
        layout=layout,
    )
