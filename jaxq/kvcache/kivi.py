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
:func:`teacher_forced_attention` applies this rule at every position of a sequence at once.

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

import functools
import math

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
    "softmax_probs",
    "mixed_attention",
    "teacher_forced_attention",
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


def softmax_probs(q, k, q_pos, scores=None) -> jax.Array:
    """float32 causal softmax of :class:`jaxq.models.CausalSelfAttention`: query ``i`` at
    position ``q_pos[i]`` sees keys ``j <= q_pos[i]``; returns ``(batch, heads, n, T)``."""
    if scores is None:
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores.astype(jnp.float32) / math.sqrt(q.shape[-1])
    mask = jnp.arange(k.shape[1])[None, :] <= q_pos[:, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def mixed_attention(q, kf, vf, kq, vq, q_pos, state, residual: int, group_size: int):
    """Attention where query ``i`` reads each key/value in float or dequantized by
    :func:`read_masks` at its own cache state ``state[i]`` (two score matrices and a choice
    per pair). ``kf``/``vf`` must hold the float keys/values wherever they are read."""
    j = jnp.arange(kf.shape[1])[None, :]
    float_key, float_value = read_masks(j, state[:, None], residual, group_size)
    s_float = jnp.einsum("bqhd,bkhd->bhqk", q, kf, preferred_element_type=jnp.float32)
    s_quant = jnp.einsum("bqhd,bkhd->bhqk", q, kq, preferred_element_type=jnp.float32)
    probs = softmax_probs(q, kf, q_pos, jnp.where(float_key, s_float, s_quant)).astype(vf.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", jnp.where(float_value, probs, 0), vf)
    out = out + jnp.einsum("bhqk,bkhd->bqhd", jnp.where(float_value, 0, probs), vq)
    return out.astype(q.dtype)


def teacher_forced_attention(
    q, k, v, *, fmt="int8", residual: int = 0, group_size: int = 32
) -> jax.Array:
    """Causal attention in which every position reads keys/values through the cache.

    Position :math:`t` sees exactly what decoding token by token with a cache
    ``init(..., fmt=fmt, residual=residual, group_size=group_size)`` gives it (float keys and
    values where the reading rule says so, dequantized ones elsewhere), for all positions at
    once. With ``fmt=None`` this is plain causal softmax attention.

    Args:
        q: Queries ``(batch, T, heads, head_dim)``; ``k`` and ``v`` the same shape.
        fmt: Cache format, or None.
        residual: Float window ``R`` (non-negative int).
        group_size: Key block ``G`` (positive int).

    Returns:
        ``(batch, T, heads, head_dim)`` in ``q``'s dtype.

    Raises:
        ValueError: If the shapes differ or an option is invalid.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share a (batch, T, heads, head_dim) shape, got "
                         f"{q.shape}, {k.shape}, {v.shape}")  # fmt: skip
    for name, value, low in (("residual", residual, 0), ("group_size", group_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return _teacher_forced(q, k, v, resolve_format(fmt), residual, group_size)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _teacher_forced(q, k, v, fmt, residual, g):
    b, t, h, d = q.shape
    pos = jnp.arange(t)
    if fmt is None:
        probs = softmax_probs(q, k, pos).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v).astype(q.dtype)
    nb = -(-t // g)
    kp = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, nb * g - t), (0, 0), (0, 0)))
    codes, scales = quantize_groups(kp.reshape(b, nb, g, h, d), fmt, axis=2)
    kq = dequantize_codes(codes, fmt, d) * scales[:, :, None]
    kq = kq.reshape(b, nb * g, h, d)[:, :t].astype(k.dtype)
    codes, scales = quantize_groups(v, fmt, axis=-1)
    vq = (dequantize_codes(codes, fmt, d) * scales[..., None]).astype(v.dtype)
    return mixed_attention(q, k, v, kq, vq, pos, pos, residual, g)
