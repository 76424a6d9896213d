"""Power-of-two scale arithmetic used by the scalify rules.

Scales are positive, normal float32 numbers. Every scale a rule *creates* is a power of
two, so that rescaling data by a ratio of scales is exact in any binary floating-point
format. The helpers work on the float32 bit pattern, ``bits = sign | E << 23 | F`` with
value ``2^(E-127) * (1 + F/2^23)``, which makes them exact, cheap and differentiable only
through ``stop_gradient`` (a rounded scale is a constant for the chain rule: the data
absorbs whatever the rounding removed, so ``data * scale`` keeps its exact derivative).

Example:
    >>> import jax.numpy as jnp
    >>> float(pow2_round(jnp.float32(3.0))), float(pow2_round(jnp.float32(2.5)))
    (4.0, 2.0)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["pow2_round", "add_scale", "sqrt_split", "scale_ok", "poison", "pow2_split"]

_MANT_BITS = 23
_EXP_MASK = 0xFF
# Fraction field of float32(sqrt(2)): values at or above it round up in log2 space.
_SQRT2_FRAC = 0x3504F3


def _bits(x: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.int32)


def _from_exponent(e: jax.Array) -> jax.Array:
    """``2^e`` for an int32 unbiased exponent ``e`` (clamped to the float32 bit range)."""
    biased = jnp.clip(e + 127, 0, 255)
    return lax.bitcast_convert_type(lax.shift_left(biased, _MANT_BITS), jnp.float32)


def _exponent(x: jax.Array) -> jax.Array:
    """Unbiased exponent ``floor(log2 |x|)`` of a normal float32."""
    return (lax.shift_right_logical(_bits(x), _MANT_BITS) & _EXP_MASK) - 127


def pow2_round(x: jax.Array) -> jax.Array:
    """Rounds a positive float32 to the nearest power of two in log2 space.

    ``r(x) = 2^round(log2 x)``, ties (``x = sqrt(2) * 2^k``) rounded up. Exact: the result
    depends only on the exponent and on whether the fraction field is at least that of
    ``sqrt(2)``, so ``r(2^k x) = 2^k r(x)`` bit for bit. Zero, subnormal, infinite or NaN
    input gives a zero, infinite or NaN result, which :func:`poison` then turns into NaN.

    Args:
        x: positive float32 array (any shape).

    Returns:
        float32 array of powers of two, same shape, with no gradient.

    Example:
        >>> float(pow2_round(jnp.float32(0.7)))
        0.5
    """
    x = lax.stop_gradient(jnp.asarray(x, jnp.float32))
    b = _bits(x)
    e = _exponent(x) + (b & ((1 << _MANT_BITS) - 1) >= _SQRT2_FRAC).astype(jnp.int32)
    out = _from_exponent(e)
    bad = ~jnp.isfinite(x) | (x < jnp.finfo(jnp.float32).tiny)
    return jnp.where(bad, jnp.where(x == 0, 0.0, jnp.nan), out).astype(jnp.float32)


def add_scale(sa: jax.Array, sb: jax.Array) -> jax.Array:
    """Output scale of ``a + b``: ``r(sqrt(sa^2 + sb^2))`` without squaring overflow.

    Computed as ``r(hi * sqrt(1 + (lo/hi)^2))`` with ``hi = max(sa, sb)``. A zero ``sb``
    (an operand that contributes no magnitude) gives ``r(sa)``.

    Example:
        >>> float(add_scale(jnp.float32(4.0), jnp.float32(1.0)))
        4.0
    """
    sa = jnp.asarray(sa, jnp.float32)
    sb = jnp.asarray(sb, jnp.float32)
    hi = jnp.maximum(sa, sb)
    lo = jnp.minimum(sa, sb)
    ratio = jnp.where(hi > 0, lo / jnp.where(hi > 0, hi, 1.0), 0.0)
    return pow2_round(hi * jnp.sqrt(1.0 + ratio * ratio))


def sqrt_split(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Splits a scale as ``s = t^2 * res`` with ``t`` a power of two and ``res`` in [1, 4).

    ``sqrt(s * d) = t * sqrt(res * d)``: the square root of a power-of-two scale stays a
    power of two and the odd factor (1 or 2) moves into the data, exactly.

    Example:
        >>> t, res = sqrt_split(jnp.float32(8.0))
        >>> float(t), float(res)
        (2.0, 2.0)
    """
    s = lax.stop_gradient(jnp.asarray(s, jnp.float32))
    e = _exponent(s)
    half = lax.shift_right_arithmetic(e, 1)  # floor(e / 2)
    t = _from_exponent(half)
    res = lax.bitcast_convert_type(_bits(s) - lax.shift_left(2 * half, _MANT_BITS), jnp.float32)
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
    c32 = jnp.asarray(c, jnp.float32)
    mag = jnp.abs(c32)
    ok = jnp.isfinite(mag) & (mag >= jnp.finfo(jnp.float32).tiny)
    e = _exponent(jnp.where(ok, mag, 1.0)) + (0 if grow else 1)
    s = jnp.where(ok, _from_exponent(e), 1.0)
    m = jnp.where(ok, c32 / s, c32)
    return m, lax.stop_gradient(s)


def scale_ok(s: jax.Array) -> jax.Array:
    """True where a scale is usable: positive, finite (a boolean array)."""
    return jnp.isfinite(s) & (s > 0)


def poison(s: jax.Array) -> jax.Array:
    """Replaces zero, negative or non-finite scales by NaN, so the failure shows downstream.

    A scale that underflowed to 0 would otherwise silently zero the tensor, and an
    infinite one silently saturate it; NaN makes every value that depends on it NaN.

    Example:
        >>> poison(jnp.float32(0.0))
        Array(nan, dtype=float32)
    """
    s = jnp.asarray(s, jnp.float32)
    return jnp.where(scale_ok(s), s, jnp.nan)
