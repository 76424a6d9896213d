"""Element codes: from already-scaled values to stored codes and back.

Storage per element format (before sub-byte packing):

* FP8 (E4M3, E5M2): the ml_dtypes float8 dtype itself.
* FP6/FP4 (E2M3, E3M2, E2M1): the IEEE-style bit pattern ``sign | exponent | mantissa`` in the
  low bits of a uint8 (the same bits ml_dtypes stores).
* INT8: int8; UINT8: uint8; INT4/INT3/INT2: two's complement in the low bits of a uint8;
  UINT4/UINT2: the unsigned code.
* NF4: the level index 0..15.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import formats as F
from jaxq.quantization.cast import cast, float_magnitude, floor_log2, lookup_index, pow2

__all__ = ["encode", "decode", "code_dtype"]


def code_dtype(fmt: F.ElementFormat) -> np.dtype:
    """Dtype of unpacked codes."""
    if isinstance(fmt, F.FloatFormat) and fmt.bits == 8:
        return fmt.dtype
    if isinstance(fmt, F.IntFormat) and fmt.bits == 8 and fmt.signed:
        return np.dtype(np.int8)
    return np.dtype(np.uint8)


@functools.cache
def _decode_table(fmt: F.ElementFormat) -> np.ndarray:
    """float32 value of every code ``0 .. 2^bits - 1``."""
    codes = np.arange(2**fmt.bits)
    if isinstance(fmt, F.FloatFormat):
        return codes.astype(np.uint8).view(fmt.dtype).astype(np.float32)
    if isinstance(fmt, F.LookupFormat):
        return np.asarray(fmt.levels, np.float32)
    if fmt.signed:  # two's complement
        return np.where(codes >= 2 ** (fmt.bits - 1), codes - 2**fmt.bits, codes).astype(
            np.float32
        )
    return codes.astype(np.float32)


def _nearest_magnitude_index(a: jax.Array, fmt: F.FloatFormat) -> jax.Array:
    """Round-to-nearest-even index of ``a >= 0`` among the format's ascending magnitudes.

    Positive bit patterns are ordered like their values, so the index *is* the magnitude's
    bit pattern. Index ``k`` and ``k + 1`` meet at the midpoint ``t_k``; a tie goes to the
    even index (even mantissa), so ``t_k`` itself counts as "above" exactly when ``k`` is
    odd. Values beyond the largest midpoint saturate to the top index.
    """
    mags = _decode_table(fmt)[: 2 ** (fmt.bits - 1)].astype(np.float64)
    mids = ((mags[1:] + mags[:-1]) / 2).astype(np.float32)  # exact: few mantissa bits
    idx = jnp.zeros(a.shape, jnp.int32)
    for k, t in enumerate(mids):
        above = a >= t if k % 2 else a > t
        idx = idx + above.astype(jnp.int32)
    return idx


def _float_bits(y: jax.Array, fmt: F.FloatFormat, rounding, key) -> jax.Array:
    """Bit patterns of ``y`` rounded (saturating) onto a sub-byte float format."""
    if rounding == "nearest":
        sign = (jnp.signbit(y) & ~jnp.isnan(y)).astype(jnp.int32) << (fmt.bits - 1)
        idx = _nearest_magnitude_index(jnp.abs(y), fmt)  # NaN compares false: index 0
        return (idx | sign).astype(jnp.uint8)
    a = jnp.abs(y)
    a = jnp.minimum(float_magnitude(jnp.where(jnp.isfinite(a), a, fmt.max), fmt, rounding, key),
                    fmt.max)  # fmt: skip
    e = floor_log2(a)
    normal = a >= fmt.min_normal
    exp_field = jnp.where(normal, e + fmt.bias, 0)
    mant = jnp.where(
        normal,
        a * pow2(fmt.mantissa_bits - jnp.maximum(e, fmt.emin)) - 2**fmt.mantissa_bits,
        a * (1.0 / fmt.min_subnormal),
    )
    bits = (exp_field << fmt.mantissa_bits) | mant.astype(jnp.int32)
    sign = (jnp.signbit(y) & ~jnp.isnan(y)).astype(jnp.int32) << (fmt.bits - 1)
    return jnp.where(jnp.isnan(y), 0, bits | sign).astype(jnp.uint8)


def encode(y: jax.Array, fmt: F.ElementFormat, *, rounding="nearest", key=None) -> jax.Array:
    """Rounds scaled values ``y`` (float32) onto ``fmt`` and returns unpacked codes.

    NaN encodes as NaN for FP8 and as code 0 elsewhere (the caller marks the block's scale);
    out-of-range values saturate.
    """
    if isinstance(fmt, F.FloatFormat):
        if fmt.bits == 8:
            return cast(y, fmt, rounding=rounding, key=key).astype(fmt.dtype)
        return _float_bits(y, fmt, rounding, key)
    if isinstance(fmt, F.LookupFormat):
        return lookup_index(jnp.where(jnp.isnan(y), 0.0, y), fmt, rounding, key).astype(jnp.uint8)
    q = cast(jnp.where(jnp.isnan(y), 0.0, y), fmt, rounding=rounding, key=key).astype(jnp.int32)
    if fmt.bits == 8:
        return q.astype(code_dtype(fmt))
    return (q & ((1 << fmt.bits) - 1)).astype(jnp.uint8)


def _decode_float_bits(c: jax.Array, fmt: F.FloatFormat) -> jax.Array:
    """Values of sub-byte float bit patterns, rebuilt arithmetically (no table gather)."""
    m = fmt.mantissa_bits
    exp_field = (c >> m) & ((1 << fmt.exponent_bits) - 1)
    mant = (c & ((1 << m) - 1)).astype(jnp.float32)
    normal = pow2(exp_field - fmt.bias) * (1.0 + mant * (1.0 / 2**m))
    mag = jnp.where(exp_field == 0, mant * fmt.min_subnormal, normal)
    return jnp.where((c >> (fmt.bits - 1)) & 1 == 1, -mag, mag)


def decode(codes: jax.Array, fmt: F.ElementFormat) -> jax.Array:
    """float32 values of unpacked codes."""
    if fmt.bits == 8 and not isinstance(fmt, F.LookupFormat):
        return codes.astype(jnp.float32)
    if isinstance(fmt, F.FloatFormat):
        return _decode_float_bits(codes.astype(jnp.int32), fmt)
    if isinstance(fmt, F.IntFormat):
        c = codes.astype(jnp.int32)
        half = 1 << (fmt.bits - 1)
        return ((c ^ half) - half if fmt.signed else c).astype(jnp.float32)
    return jnp.asarray(_decode_table(fmt))[codes.astype(jnp.int32)]
