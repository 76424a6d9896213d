"""Power-of-two scale arithmetic used by the scalify rules.

Scales are positive, normal float32 numbers. Every scale a rule *creates* is a power of
two, so that rescaling data by a ratio of scales is exact in any binary floating-point
format. The helpers work on the float32 bit pattern, ``bits = sign | E << 23 | F`` with
value ``2^(E-127) * (1 + F/2^23)``, which makes them exact, cheap and differentiable only
through ``stop_gradient`` (a rounded scale is a constant for the chain rule: the data
absorbs whatever the rounding removed, so ``data * scale`` keeps its exact derivative).

Python and NumPy inputs (a jaxpr's literals, such as a mean's ``1/N`` or a learning rate,
and the rules' constant scales, such as a nonlinear op's unit scale) are computed on the
host with NumPy, on the same bit patterns, and returned as NumPy values; the program then
holds one constant instead of the scalar ops that would compute it.

Example:
    >>> import jax.numpy as jnp
    >>> float(pow2_round(jnp.float32(3.0))), float(pow2_round(jnp.float32(2.5)))
    (4.0, 2.0)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "pow2_round", "add_scale", "sqrt_split", "scale_ok", "poison", "poison_product", "pow2_split",
    "renormalize", "on_host",
    "magnitude", "narrow_range",
]  # fmt: skip

_MANT_BITS = 23
_EXP_MASK = 0xFF
# Fraction field of float32(sqrt(2)): values at or above it round up in log2 space.
_SQRT2_FRAC = 0x3504F3


def on_host(x: Any) -> bool:
    """True for a Python or NumPy number or array: a value known when tracing (a jaxpr's
    literal, a rule's constant scale), whose scale arithmetic runs on the host. JAX
    arrays, traced or not, stay on their device: an eager call must not copy device data
    to the host.

    Example:
        >>> on_host(np.float32(1.0)), on_host(jnp.float32(1.0))
        (True, False)
    """
    return isinstance(x, np.ndarray | np.generic | int | float)


def _host(x: Any) -> np.ndarray | None:
    """``x`` as float32 NumPy when :func:`on_host`, else None."""
    return np.asarray(x, np.float32) if on_host(x) else None


def _host_pow2_round(x: np.ndarray) -> np.ndarray:
    """:func:`pow2_round` on the host: the same integer add and mask on the bit pattern."""
    b = x.view(np.int32).astype(np.int64) + ((1 << _MANT_BITS) - _SQRT2_FRAC)
    out = (b & (_EXP_MASK << _MANT_BITS)).astype(np.int32).view(np.float32)
    with np.errstate(invalid="ignore"):
        return out + (x - x)


def _f32(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return x if x.dtype == jnp.float32 else lax.convert_element_type(x, jnp.float32)


def _bits(x: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(x, jnp.int32)


def _from_exponent(e: jax.Array) -> jax.Array:
    """``2^e`` for an int32 unbiased exponent ``e`` (0 below 2^-126, inf above 2^127)."""
    biased = lax.clamp(jnp.int32(0), e + 127, jnp.int32(255))
    return lax.bitcast_convert_type(lax.shift_left(biased, jnp.int32(_MANT_BITS)), jnp.float32)


def _exponent(x: jax.Array) -> jax.Array:
    """Unbiased exponent ``floor(log2 |x|)`` of a normal float32."""
    return (lax.shift_right_logical(_bits(x), jnp.int32(_MANT_BITS)) & _EXP_MASK) - 127


def pow2_round(x: jax.Array) -> jax.Array:
    """Rounds a positive float32 to the nearest power of two in log2 space.

    ``r(x) = 2^round(log2 x)``, ties (``x = sqrt(2) * 2^k``) rounded up. Exact: the result
    depends only on the exponent and on whether the fraction field is at least that of
    ``sqrt(2)``, so ``r(2^k x) = 2^k r(x)`` bit for bit. Zero and subnormal input give 0,
    infinite or NaN input gives NaN; :func:`poison` turns both into NaN where it matters.

    Args:
        x: positive float32 array (any shape).

    Returns:
        float32 array of powers of two, same shape, with no gradient.

    Example:
        >>> float(pow2_round(jnp.float32(0.7)))
        0.5
    """
    h = _host(x)
    if h is not None:
        return _host_pow2_round(h)
    x = lax.stop_gradient(_f32(x))
    # adding 2^23 - frac(sqrt 2) to the bit pattern carries into the exponent exactly when
    # the fraction is at least sqrt(2)'s; masking keeps the (rounded) exponent field
    b = (_bits(x) + np.int32((1 << _MANT_BITS) - _SQRT2_FRAC)) & np.int32(_EXP_MASK << _MANT_BITS)
    out = lax.bitcast_convert_type(b, jnp.float32)
    return out + (x - x)  # inf - inf = NaN: non-finite input never becomes a finite scale


def add_scale(sa: jax.Array, sb: jax.Array) -> jax.Array:
    """Output scale of ``a + b``: ``r(sqrt(sa^2 + sb^2))`` without squaring overflow.

    Computed as ``r(hi * sqrt(1 + (lo/hi)^2))`` with ``hi = max(sa, sb)``. A zero ``sb``
    (an operand that contributes no magnitude) gives ``r(sa)``.

    Example:
        >>> float(add_scale(jnp.float32(4.0), jnp.float32(1.0)))
        4.0
    """
    ha, hb = _host(sa), _host(sb)
    if ha is not None and hb is not None:
        hi = np.maximum(ha, hb)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            ratio = np.minimum(ha, hb) / hi
            hyp = (hi * np.sqrt(np.float32(1) + ratio * ratio)).astype(np.float32)
        return _host_pow2_round(hyp)
    sa, sb = _f32(sa), _f32(sb)
    hi = lax.max(sa, sb)
    ratio = lax.min(sa, sb) / hi
    return pow2_round(hi * lax.sqrt(1.0 + ratio * ratio))


def sqrt_split(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Splits a scale as ``s = t^2 * res`` with ``t`` a power of two and ``res`` in [1, 4).

    ``sqrt(s * d) = t * sqrt(res * d)``: the square root of a power-of-two scale stays a
    power of two and the odd factor (1 or 2) moves into the data, exactly.

    Example:
        >>> t, res = sqrt_split(jnp.float32(8.0))
        >>> float(t), float(res)
        (2.0, 2.0)
    """
    s = poison_product(lax.stop_gradient(_f32(s)))
    e = _exponent(s)
    half = lax.shift_right_arithmetic(e, jnp.int32(1))  # floor(e / 2)
    t = _from_exponent(half) + (s - s)  # NaN stays NaN
    res = lax.bitcast_convert_type(
        _bits(s) - lax.shift_left(2 * half, jnp.int32(_MANT_BITS)), jnp.float32
    )
    return t, res


def pow2_split(c: jax.Array, *, grow: bool = False) -> tuple[jax.Array, jax.Array]:
    """Splits a plain number as ``c = m * 2^k``; returns ``(m, 2^k)``.

    ``|m|`` is in ``[0.5, 1)`` (default) or in ``[1, 2)`` with ``grow=True``: multiplying
    data by the first, or dividing it by the second, never increases its magnitude, so a
    constant moved into the scale cannot overflow the data. Zero, subnormal and
    non-finite ``c`` give ``(c, 1)``.

    Example:
        >>> m, s = pow2_split(jnp.float32(-24.0))
        >>> float(m), float(s)
        (-0.75, 32.0)
    """
    h = _host(c)
    if h is not None:
        mag = np.abs(h)
        ok = np.isfinite(mag) & (mag >= np.finfo(np.float32).tiny)
        e = np.frexp(np.where(ok, mag, 1.0).astype(np.float32))[1].astype(np.int32) - 1
        s = np.where(ok, np.ldexp(np.float32(1), e + (0 if grow else 1)), 1).astype(np.float32)
        return (h / s).astype(np.float32), s
    c32 = _f32(c)
    mag = lax.abs(c32)
    ok = lax.is_finite(mag) & (mag >= np.float32(np.finfo(np.float32).tiny))
    s = lax.select(ok, _from_exponent(_exponent(mag) + (0 if grow else 1)), lax.full_like(mag, 1))
    return c32 / s, lax.stop_gradient(s)


def scale_ok(s: jax.Array) -> jax.Array:
    """True where a scale is usable: positive, finite (a boolean array)."""
    return lax.is_finite(s) & (s > 0)


def poison(s: jax.Array) -> jax.Array:
    """Replaces zero, negative or non-finite scales by NaN, so the failure shows downstream.

    A scale that underflowed to 0 would otherwise silently zero the tensor, and an
    infinite one silently saturate it; NaN makes every value that depends on it NaN.

    Example:
        >>> poison(jnp.float32(0.0))
        Array(nan, dtype=float32)
    """
    s = _f32(s)
    return lax.select(scale_ok(s), s, lax.full_like(s, np.nan))


def poison_product(s: jax.Array) -> jax.Array:
    """:func:`poison` for a scale formed from positive scales: ``s / max(s / s, 1/2)``.

    ``s / s`` is 1 for a positive finite ``s`` and NaN for 0, inf and NaN (and for a
    subnormal where the backend flushes them, as :func:`poison`'s ``s > 0`` does); ``max``
    propagates NaN, so the result is ``s`` exactly or NaN. A negative ``s`` passes:
    products and quotients of positive scales are never negative (scales given by a user
    go through :func:`poison`).
    Three scalar ops instead of four comparison and select ops, and XLA keeps a division
    in its own kernel rather than copying the scale's chain of scalar ops into every
    consumer: a scalified train step compiles measurably faster (see
    ``benchmarks/results/scaling.md``).

    Example:
        >>> float(poison_product(jnp.float32(0.0))), float(poison_product(jnp.float32(8.0)))
        (nan, 8.0)
    """
    h = _host(s)
    if h is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            return h / np.maximum(h / h, np.float32(0.5))
    s = _f32(s)
    # not s / (s / s): XLA's simplifier rewrites a / (b / c) as (a * c) / b, whose s * s
    # under- or overflows for |log2 s| > 63 (the max, which propagates NaN, stops it)
    return s / lax.max(s / s, np.float32(0.5))


def magnitude(x: jax.Array) -> jax.Array:
    """``r(max|x|)`` of a plain array as a float32 power of two; 1 where that is 0 or not finite.

    The scale a plain operand brings into the scaled world: ``x / magnitude(x)`` has its
    largest magnitude in ``[2^-0.5, 2^0.5)``, so a constant such as the ``1/N`` of a mean's
    cotangent moves into the scale instead of shrinking the data.

    Example:
        >>> float(magnitude(jnp.full((3,), -1.0 / 64)))
        0.015625
    """
    h = _host(x)
    if h is not None:
        m = np.max(np.abs(h)) if h.size else np.float32(0)
        ok = np.isfinite(m) & (m >= np.finfo(np.float32).tiny)
        return _host_pow2_round(np.float32(m)) if ok else np.float32(1)
    x = jnp.asarray(x)
    m = jnp.max(lax.abs(_f32(x))) if x.size else jnp.float32(0)
    ok = lax.is_finite(m) & (m >= np.float32(np.finfo(np.float32).tiny))
    return lax.stop_gradient(lax.select(ok, pow2_round(lax.select(ok, m, 1.0)), 1.0))


def renormalize(d: jax.Array, s: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Moves the RMS of wide data into the scale, then narrows: ``(d / r, s * r)``.

    ``r = r(sqrt(mean(d^2)))`` (a power of two, so the division is exact); a zero,
    subnormal or non-finite mean square gives ``r = 1``. ``r`` comes from the exponent
    ``e`` of ``q = mean(d^2) = f 2^e`` (``f`` in [1, 2)) with no square root:
    ``log2 sqrt(q) = (e + log2 f) / 2`` rounds to ``e / 2`` for even ``e`` and, the tie
    rounding up, to ``(e + 1) / 2`` for odd ``e``; so ``r = 2^((e + 1) >> 1)`` and
    ``1 / r = 2^-((e + 1) >> 1)``, both built from bits (integer ops that XLA fuses into
    the consumers, where a square root and a division would each be a kernel).

    ``d`` is the float32 (or wider) result of a rule, computed *before* the cast to the
    narrow data ``dtype``, so that values the static scale rule placed too low (or too
    high) are brought back to unit range instead of flushing to zero (or overflowing) in
    that cast. The value ``d * s`` is unchanged.

    Args:
        d: data in a wide dtype (any shape).
        s: its scale (scalar or per-block).
        dtype: the dtype of the returned data.

    Returns:
        ``(data, scale)`` with ``data.dtype == dtype`` and ``data * scale == d * s``.

    Example:
        >>> d, s = renormalize(jnp.full((4,), 2.0**-20), jnp.float32(8.0), jnp.float16)
        >>> float(d[0]), float(s)
        (1.0, 7.62939453125e-06)
    """
    w = _f32(d) if np.dtype(d.dtype).itemsize < 4 else d
    if w.size == 0:
        return d.astype(dtype), s
    ms = lax.stop_gradient(jnp.mean(lax.square(w), dtype=jnp.float32))
    bits = _bits(ms)  # ms >= 0: positive normal finite <=> bits in [2^23, 0x7F800000)
    ok = (bits >= np.int32(1 << _MANT_BITS)) & (bits < np.int32(_EXP_MASK << _MANT_BITS))
    half = lax.shift_right_arithmetic(
        lax.shift_right_logical(bits, np.int32(_MANT_BITS)) - np.int32(126), np.int32(1)
    )  # (e + 1) >> 1 with e = biased exponent - 127; in [-62, 64]
    half = lax.select(ok, half, jnp.zeros_like(half))
    r, inv = _from_exponent(half), _from_exponent(-half)
    return (w * inv.astype(w.dtype)).astype(dtype), poison_product(s * r)


def narrow_range(dtype: Any) -> bool:
    """True for floating dtypes whose exponent range is narrower than float32's.

    float16 and the FP8/FP6/FP4 formats: a value that a scale rule places a few binades
    off unit range flushes to zero or overflows there, so rules renormalize before
    casting to them. bfloat16, float32 and float64 share float32's range or exceed it.

    Example:
        >>> narrow_range(jnp.float16), narrow_range(jnp.bfloat16)
        (True, False)
    """
    try:
        return bool(jnp.finfo(dtype).maxexp < 128)
    except ValueError:
        return False
