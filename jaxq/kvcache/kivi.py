"""KIVI-style quantization of attention keys and values, and the attention that reads them.

Keys and values have different outlier structure (KIVI, Liu et al. 2024; KVQuant, Hooper
et al. 2024): a few key *channels* carry large magnitudes across all tokens, while value
magnitudes vary from *token* to token. So keys get one scale per channel (per head-dim
coordinate) and per group of ``G`` consecutive tokens, values one scale per token and head:

.. math::

    s^K_{b,h,c} = \\frac{\\max_{t \\in [bG, (b+1)G)} |K_{t,h,c}|}{M}, \\qquad
    s^V_{t,h} = \\frac{\\max_{c} |V_{t,h,c}|}{M}, \\qquad
    \\hat X = \\mathrm{round}_{\\mathrm{fmt}}(X / s) \\cdot s,

with ``M`` the largest value of the element format (127 for int8, 7 for int4, 448 for
E4M3, 57344 for E5M2). ``s`` is the smallest float32 with ``fl(M s) >= amax`` (see
:func:`jaxq.quantization.calibration.scale_for_amax`); an all-zero group gets ``s = 1``.
Integer codes are symmetric, ``[-(2^{b-1}-1), 2^{b-1}-1]``; 4-bit codes are packed two per
byte along the head dimension (:mod:`jaxq.quantization.packing`).

Non-finite inputs: a NaN or ±inf element is left out of its group's maximum, so every other
element of the group is quantized exactly as if the bad one were absent, and the bad element
itself reads back as NaN (never as a silently finite number). FP8 stores NaN directly; the
symmetric integer formats store it as their otherwise unused code ``-2^{b-1}``.

Reading rule (with the residual window ``R``): a query at position :math:`p`, the cache
holding positions :math:`0..p`, reads value :math:`j` in float iff :math:`j > p - R`, and key
:math:`j` in float iff :math:`j > p - R` or its block is incomplete,
:math:`j \\ge G \\lfloor (p + 1)/G \\rfloor`; otherwise the dequantized one.
:func:`jaxq.kvcache.teacher_forced_attention` applies this rule at every position of a sequence
at once; :mod:`jaxq.kvcache.attention` is the attention that reads keys and values by it.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxq.kvcache import kivi
    >>> fmt = kivi.resolve_format("int4")
    >>> codes, scales = kivi.quantize_groups(jnp.array([[1.0, -7.0, 3.5, 0.0]]), fmt, axis=-1)
    >>> codes.shape, codes.dtype, scales.tolist()
    ((1, 2), dtype('uint8'), [1.0])
    >>> (kivi.dequantize_codes(codes, fmt, 4) * scales[:, None]).tolist()
    [[1.0, -7.0, 4.0, 0.0]]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import formats as F
from jaxq.quantization.calibration import scale_for_amax
from jaxq.quantization.codes import code_dtype, decode, encode
from jaxq.quantization.packing import pack, packed_length, unpack

__all__ = [
    "FORMATS",
    "resolve_format",
    "code_width",
    "quantize_groups",
    "dequantize_codes",
    "empty_codes",
    "read_masks",
]

#: Names accepted as a cache ``fmt`` (``None`` keeps the cache in float).
FORMATS = ("int8", "int4", "e4m3", "e5m2")
_ALLOWED = {F.get(name).name: F.get(name) for name in FORMATS}


def resolve_format(fmt) -> F.ElementFormat | None:
    """The element format of a cache: ``None`` (float cache) or int8/int4/E4M3/E5M2.

    Args:
        fmt: ``None``, a name (``"int8"``, ``"int4"``, ``"e4m3"``, ``"e5m2"`` or the
            ml_dtypes names ``"float8_e4m3fn"``, ``"float8_e5m2"``) or a jaxq format object.

    Returns:
        The format object, or ``None``.

    Raises:
        ValueError: For any other format.
        TypeError: For something that is neither a string nor a format.
    """
    if fmt is None:
        return None
    try:
        obj = F.get(fmt)
    except ValueError:
        obj = None
    if obj is None or obj.name not in _ALLOWED or obj != _ALLOWED[obj.name]:
        raise ValueError(
            f"fmt must be None (float cache) or one of {', '.join(FORMATS)}, got {fmt!r}"
        )
    return obj


def code_width(fmt: F.ElementFormat, n: int) -> int:
    """Stored length of ``n`` codes along the packed last axis (bytes for 4-bit codes)."""
    return packed_length(n, fmt.bits) if fmt.bits < 8 else n


def _storage_dtype(fmt: F.ElementFormat) -> np.dtype:
    return np.dtype(np.uint8) if fmt.bits < 8 else code_dtype(fmt)


def _nan_code(fmt: F.ElementFormat):
    """The unused integer code that marks a non-finite element (``-2^{b-1}``)."""
    if fmt.bits == 8:
        return np.int8(-128)
    return np.uint8(1 << (fmt.bits - 1))


def quantize_groups(x: jax.Array, fmt: F.ElementFormat, axis) -> tuple[jax.Array, jax.Array]:
    """Quantizes ``x`` with one scale per group reduced over ``axis``.

    Keys use ``axis`` = the token axis of a block (per-channel scales); values use the
    head-dim axis (per-token scales).

    Args:
        x: Float array whose last axis is the head dimension.
        fmt: A format from :func:`resolve_format` (not ``None``).
        axis: Axis (int or tuple) reduced to form one group.

    Returns:
        ``(codes, scales)``: codes of ``x.shape`` with the last axis packed for 4-bit
        formats (``uint8``; ``int8`` for int8, the float8 dtype for FP8), and float32
        scales of ``x.shape`` without ``axis``.
    """
    x = jnp.asarray(x, jnp.float32)
    finite = jnp.isfinite(x)
    amax = jnp.max(jnp.where(finite, jnp.abs(x), 0.0), axis=axis, keepdims=True)
    s = scale_for_amax(amax, fmt.max)
    codes = encode(jnp.where(finite, x / s, jnp.nan), fmt)
    if isinstance(fmt, F.IntFormat):
        codes = jnp.where(finite, codes, _nan_code(fmt))
    if fmt.bits < 8:
        codes = pack(codes, bits=fmt.bits)
    return codes.astype(_storage_dtype(fmt)), jnp.squeeze(s, axis)


def dequantize_codes(codes: jax.Array, fmt: F.ElementFormat, n: int) -> jax.Array:
    """float32 values of stored codes (before scaling); the NaN marker reads as NaN.

    Args:
        codes: Stored codes from :func:`quantize_groups`.
        fmt: Their format.
        n: The unpacked length of the last axis (the head dimension).

    Returns:
        float32 array of ``codes.shape[:-1] + (n,)``.
    """
    if fmt.bits < 8:
        codes = unpack(codes, bits=fmt.bits, n=n)
    values = decode(codes, fmt)
    if isinstance(fmt, F.IntFormat):
        values = jnp.where(codes == _nan_code(fmt), jnp.nan, values)
    return values


def empty_codes(shape: tuple[int, ...], fmt: F.ElementFormat) -> jax.Array:
    """Zero codes for an unpacked ``shape`` (last axis packed for 4-bit formats)."""
    return jnp.zeros((*shape[:-1], code_width(fmt, shape[-1])), _storage_dtype(fmt))


def read_masks(j: jax.Array, p: jax.Array, residual: int, group_size: int):
    """``(float_key, float_value)``: whether key/value ``j`` is read in float at state ``p``.

    Args:
        j: Key positions (broadcastable against ``p``).
        p: Last written position(s) of the cache, as the query reads it.
        residual: ``R``.
        group_size: ``G``.

    Returns:
        Two boolean arrays of the broadcast shape.
    """
    recent = j > p - residual
    return recent | (j >= (p + 1) // group_size * group_size), recent


def __getattr__(name: str):
    # The attention that reads the cache lives in jaxq.kvcache.attention; these names stay
    # importable from here.
    if name in ("softmax_probs", "mixed_attention", "teacher_forced_attention"):
        from jaxq.kvcache import attention

        return getattr(attention, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
