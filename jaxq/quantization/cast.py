"""Rounding values onto a format's grid: ``cast``, and the code encoders behind ``quantize``.

Round-to-nearest-even on a float format with ``m`` mantissa bits and minimum exponent
``emin``: for ``a = |x|`` let ``e = max(floor(log2 a), emin)`` and ``ulp = 2^(e - m)``; then
``q = ulp * rne(a / ulp)``. ``a / ulp`` is an exact power-of-two scaling, so the result is
bit-exact with ``ml_dtypes`` (tested over every representable value, ties and subnormals).

Stochastic rounding replaces ``rne(y)`` by ``floor(y) + [u < y - floor(y)]`` with
``u ~ U[0, 1)`` drawn from an explicit key: the result is always one of the two
neighbouring representable values and ``E[q] = x`` (unbiased).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import formats as F

__all__ = ["cast"]

Rounding = Literal["nearest", "stochastic"]

# Formats whose conversion XLA implements natively on every backend.
_NATIVE = ("float8_e4m3fn", "float8_e5m2")


def _check_float_input(x, name: str = "x") -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    return x


def _check_rounding(rounding: str, key) -> None:
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if rounding == "stochastic" and key is None:
        raise ValueError("rounding='stochastic' needs an explicit PRNG key: pass key=...")


def _uniform(key, shape) -> jax.Array:
    """Uniform [0, 1) draws of ``shape``, drawn flat and reshaped: XLA:CPU compiles the
    counter-based generator over a many-dimensional shape about five times slower."""
    return jax.random.uniform(key, (math.prod(shape),), jnp.float32).reshape(shape)


def _round_grid(y: jax.Array, rounding: Rounding, key) -> jax.Array:
    """Rounds ``y`` to an integer: half-to-even, or stochastically."""
    if rounding == "nearest":
        return jnp.round(y)
    lo = jnp.floor(y)
    return lo + (_uniform(key, y.shape) < (y - lo)).astype(y.dtype)


def pow2(k: jax.Array) -> jax.Array:
    """Exact float32 ``2^k`` for integer ``k`` in ``[-126, 127]``, built from the bits."""
    return jax.lax.bitcast_convert_type(((k + 127) << 23).astype(jnp.int32), jnp.float32)


def floor_log2(a: jax.Array) -> jax.Array:
    """``floor(log2(a))`` of float32 ``a > 0`` from its exponent bits (-127 for 0)."""
    return ((jax.lax.bitcast_convert_type(a, jnp.int32) >> 23) & 0xFF) - 127


def e4m3_bits(x: jax.Array) -> jax.Array:
    """E4M3 bit patterns (uint8) of float32 ``|x| <= 448``, round to nearest even.

    Integer arithmetic on the float32 pattern, bit-identical to the ml_dtypes cast on that
    range (checked on every float32 pattern) but cheaper than XLA's generic conversion:
    normal results round the 23-bit mantissa to 3 bits (adding ``0x7FFFF`` plus the lowest
    kept bit) and re-bias the exponent (127 -> 7); results below ``2**-6`` are
    ``RNE(|x| * 2**9)``, computed by adding and removing ``2**23`` in float32 (the product
    is exact). NaN gives the NaN pattern ``0x7F`` (with its sign).
    """
    u32 = jnp.uint32
    bits = jax.lax.bitcast_convert_type(x, u32)
    sign = (bits >> u32(24)) & u32(0x80)
    mag = bits & u32(0x7FFFFFFF)
    rounded = mag + u32(0x7FFFF) + ((mag >> u32(20)) & u32(1))
    normal = (rounded >> u32(20)) - u32(120 << 3)
    scaled = jax.lax.bitcast_convert_type(mag, jnp.float32) * np.float32(512.0)
    sub = jax.lax.bitcast_convert_type(scaled + np.float32(2.0**23), u32) - u32(0x4B000000)
    code = jnp.where(mag < u32(0x3C800000), sub, normal)
    # Finite |x| <= 448 gives at most 0x7E; a NaN's pattern gives far more, clamped to 0x7F.
    code = jnp.minimum(code, u32(0x7F))
    return (code | sign).astype(jnp.uint8)


def e4m3_values(bits: jax.Array) -> jax.Array:
    """float32 values of E4M3 (``float8_e4m3fn``) bit patterns, by integer arithmetic.

    The inverse of :func:`e4m3_bits`, exact for all 256 patterns and free of table
    lookups (so XLA vectorizes it): a normal pattern ``s eeee mmm`` becomes the float32
    pattern ``s << 31 | (eeee + 120) << 23 | mmm << 20``; a subnormal one (``eeee = 0``)
    is ``mmm * 2**-9``; ``0x7F`` and ``0xFF`` are NaN.

    Example:
        >>> e4m3_values(jnp.array([0x38, 0x7E, 0x01, 0xC0], jnp.uint8)).tolist()
        [1.0, 448.0, 0.001953125, -2.0]
    """
    u32 = jnp.uint32
    b = bits.astype(u32)
    mag = b & u32(0x7F)
    normal = jax.lax.bitcast_convert_type((mag << u32(20)) + u32(120 << 23), jnp.float32)
    sub = mag.astype(jnp.float32) * np.float32(2.0**-9)
    val = jnp.where(mag < u32(8), sub, normal)
    val = jnp.where(mag == u32(0x7F), np.float32(np.nan), val)
    return jnp.where(b >= u32(0x80), -val, val)


def e8m0_values(bits: jax.Array) -> jax.Array:
    """float32 values of E8M0 (``float8_e8m0fnu``) bit patterns, by integer arithmetic.

    Byte ``e`` is ``2^{e - 127}``: the float32 pattern ``e << 23`` for ``e >= 1``, the
    subnormal ``2^-127`` for 0, and NaN for 255. Exact for all 256 patterns, with no table
    or ``exp2``, so it also runs inside Pallas kernels.

    Example:
        >>> e8m0_values(jnp.array([127, 130, 0, 255], jnp.uint8)).tolist()
        [1.0, 8.0, 5.877471754111438e-39, nan]
    """
    b = bits.astype(jnp.int32)
    v = jax.lax.bitcast_convert_type(b << 23, jnp.float32)
    v = jnp.where(b == 0, np.float32(2.0**-127), v)
    return jnp.where(b == 255, np.float32(np.nan), v)


def float_magnitude(a: jax.Array, fmt: F.FloatFormat, rounding: Rounding, key) -> jax.Array:
    """Rounds non-negative finite ``a`` (float32) onto ``fmt``'s grid, before saturation."""
    if fmt.mantissa_bits == 0:  # E8M0: its exponent range exceeds float32's normal range
        _, k = jnp.frexp(a)  # a = f * 2^k with f in [0.5, 1)
        e = jnp.maximum(k - 1, fmt.emin)
        if rounding == "nearest":
            # Powers of two; ml_dtypes rounds the mantissa half-up (1.5·2^e -> 2^(e+1)).
            f, _ = jnp.frexp(a)
            up = (f >= 0.75) & (k - 1 >= fmt.emin)
            return jnp.ldexp(jnp.ones_like(a), e + up.astype(e.dtype))
        ulp = jnp.ldexp(jnp.ones_like(a), e)
        return _round_grid(a / ulp, rounding, key) * ulp
    e = jnp.maximum(floor_log2(a), fmt.emin)
    # Multiplying by powers of two is exact, so y is a / ulp exactly.
    y = a * pow2(fmt.mantissa_bits - e)
    return _round_grid(y, rounding, key) * pow2(e - fmt.mantissa_bits)


def _cast_float(x, fmt: F.FloatFormat, rounding: Rounding, key, saturate: bool) -> jax.Array:
    out_dtype = x.dtype
    if rounding == "nearest" and fmt is F.E4M3 and saturate and x.dtype != jnp.float64:
        # Integer rounding on the float32 bits: exact, and cheaper than XLA's conversion.
        xf = x.astype(jnp.float32)
        # inf - inf is NaN: no broadcast constant, which XLA:CPU may materialize
        y = jnp.where(jnp.isinf(xf), xf - xf, jnp.clip(xf, -fmt.max, fmt.max))
        bits = e4m3_bits(y)
        return jax.lax.bitcast_convert_type(bits, fmt.dtype).astype(out_dtype)
    if rounding == "nearest" and fmt.name in _NATIVE and x.dtype != jnp.float64:
        y = jnp.clip(x, -fmt.max, fmt.max) if saturate else x
        if saturate and fmt.has_inf:
            y = jnp.where(jnp.isinf(x), x, y)
        elif saturate and fmt.has_nan:
            y = jnp.where(jnp.isinf(x), jnp.nan, y)
        return y.astype(fmt.dtype).astype(out_dtype)
    xf = x.astype(jnp.float32)
    a = jnp.abs(xf)
    finite = jnp.isfinite(xf)
    q = float_magnitude(jnp.where(finite, a, 0.0), fmt, rounding, key)
    overflow = q > fmt.max
    if saturate or not (fmt.has_inf or fmt.has_nan):
        q = jnp.minimum(q, fmt.max)
    else:
        q = jnp.where(overflow, jnp.inf if fmt.has_inf else jnp.nan, q)
    # Non-finite inputs: inf stays inf where the format has inf, becomes NaN where it only
    # has NaN, and saturates to max where it has neither (FP6/FP4, as ml_dtypes does).
    inf_to = jnp.inf if fmt.has_inf else (jnp.nan if fmt.has_nan else fmt.max)
    q = jnp.where(jnp.isinf(xf), inf_to, q)
    q = jnp.where(jnp.isnan(xf), jnp.nan, q)
    if fmt.signed:
        q = jnp.copysign(q, xf)
    else:  # E8M0: no sign and no zero; ml_dtypes maps x <= 0 to NaN.
        q = jnp.where(xf > 0, q, jnp.nan)
    return q.astype(out_dtype)


def _cast_int(x, fmt: F.IntFormat, rounding: Rounding, key) -> jax.Array:
    xf = x.astype(jnp.float32)
    # ±inf round (nearest or stochastically: floor(inf) + 0) to ±inf and clip to the range.
    # NaN is restored explicitly: XLA:CPU's vectorized min/max do not always propagate it.
    q = jnp.clip(_round_grid(xf, rounding, key), fmt.qmin, fmt.qmax)
    return jnp.where(jnp.isnan(xf), jnp.nan, q).astype(x.dtype)


def lookup_index(xf: jax.Array, fmt: F.LookupFormat, rounding: Rounding, key) -> jax.Array:
    """Index of the level of ``fmt`` that ``xf`` (float32, finite) rounds to."""
    levels = jnp.asarray(np.asarray(fmt.levels, np.float32))
    xf = jnp.clip(xf, levels[0], levels[-1])
    if rounding == "nearest":
        mids = (levels[1:] + levels[:-1]) / 2
        return jnp.searchsorted(mids, xf, side="left").astype(jnp.int32)
    lo = jnp.clip(jnp.searchsorted(levels, xf, side="right") - 1, 0, len(fmt.levels) - 2)
    frac = (xf - levels[lo]) / (levels[lo + 1] - levels[lo])
    return (lo + (_uniform(key, xf.shape) < frac)).astype(jnp.int32)


def _cast_lookup(x, fmt: F.LookupFormat, rounding: Rounding, key) -> jax.Array:
    xf = x.astype(jnp.float32)
    idx = lookup_index(jnp.where(jnp.isnan(xf), 0.0, xf), fmt, rounding, key)
    q = jnp.asarray(np.asarray(fmt.levels, np.float32))[idx]
    return jnp.where(jnp.isnan(xf), jnp.nan, q).astype(x.dtype)


def cast(
    x: jax.Array,
    fmt: F.Format | str,
    *,
    rounding: Rounding = "nearest",
    key: jax.Array | None = None,
    saturate: bool = True,
) -> jax.Array:
    """Rounds ``x`` onto the value grid of an element format, with no scaling.

    Returns an array of ``x``'s dtype and shape whose values are representable in ``fmt``.
    With ``rounding="nearest"`` the result equals ``x.astype(fmt.dtype).astype(x.dtype)``
    under ml_dtypes bit for bit on every finite input within ``[-fmt.max, fmt.max]``
    (subnormals and ties to even included).

    Special values:
        * finite ``|x| > fmt.max``: ``±fmt.max`` when ``saturate=True``; otherwise what
          ml_dtypes gives: ``±inf`` (E5M2), NaN (E4M3, E8M0), ``±max`` (FP6/FP4, which have
          neither).
        * ``±inf``: stays ``±inf`` for E5M2, becomes NaN for E4M3/E8M0 (NaN but no inf),
          saturates to ``±max`` for FP6/FP4, INT and NF4 (no special values).
        * NaN stays NaN in the result for every format. For formats without a NaN encoding
          (FP6, FP4, INT, NF4) the returned NaN is *not* a representable value; ``quantize``
          records such elements by making their block scale NaN instead.
        * E8M0 has no sign and no zero: ``x <= 0`` gives NaN, as in ml_dtypes.

    Args:
        x: floating-point array.
        fmt: an element format or its name (``"e4m3"``, ``"float4_e2m1fn"``, ``"int8"``...).
        rounding: ``"nearest"`` (ties to even; NF4 ties to the lower level) or
            ``"stochastic"`` (unbiased; needs ``key``).
        key: PRNG key for stochastic rounding.
        saturate: clamp finite overflow to ``±fmt.max``.

    Raises:
        TypeError: ``x`` is not floating point.
        ValueError: block format given, unknown rounding, or stochastic without ``key``.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxq import cast
        >>> cast(jnp.array([0.3, 5.0, 1000.0]), "e2m1").tolist()
        [0.5, 4.0, 6.0]
    """
    x = _check_float_input(x)
    fmt = F.get(fmt)
    _check_rounding(rounding, key)
    if isinstance(fmt, F.BlockFormat):
        raise ValueError(
            f"cast needs an element format, got block format {fmt.name}; use jaxq.quantize"
        )
    return _cast_jit(x, key, fmt=fmt, rounding=rounding, saturate=saturate)


@functools.partial(jax.jit, static_argnames=("fmt", "rounding", "saturate"))
def _cast_jit(x, key, *, fmt, rounding, saturate):
    if isinstance(fmt, F.FloatFormat):
        return _cast_float(x, fmt, rounding, key, saturate)
    if isinstance(fmt, F.IntFormat):
        return _cast_int(x, fmt, rounding, key)
    return _cast_lookup(x, fmt, rounding, key)
