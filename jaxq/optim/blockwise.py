"""Blockwise quantization with a code map (bitsandbytes-compatible) and its helpers.

Two layouts exist:

* the *flat* layout of :func:`quantize_blockwise` (bitsandbytes'): the tensor is flattened
  and cut into consecutive blocks of ``block_size`` elements, the last block possibly
  partial;
* the *row* layout used for optimizer state: the last ``k`` axes form a row of length
  ``n`` (``k = 1`` when the last axis is a multiple of ``block_size`` or long; more axes
  are merged only when a short last axis would need much padding, see :func:`row_axes`),
  so a tensor of shape ``(*lead, *row)`` is viewed as ``(*lead, n)``, padded with zeros
  to ``(*lead, n_pad)``, ``n_pad = ceil(n / block_size) * block_size``, and each row is
  cut into ``n_pad / block_size`` blocks. Blocks never straddle rows, so a tensor sharded
  along a leading axis, or along the first row axis with whole blocks per shard, keeps
  each block on one device. When ``n`` is a multiple of ``block_size`` the two layouts
  assign the same elements to the same blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.optim.maps import CodeBook

__all__ = ["quantize_blockwise", "dequantize_blockwise"]

# Block absmax values below the smallest normal float32 are stored as 0 (the block becomes
# all zeros): their reciprocal would overflow and denormals may be flushed by the backend.
TINY = float(np.finfo(np.float32).tiny)


def _codebook(code) -> CodeBook:
    if isinstance(code, CodeBook):
        return code
    arr = np.asarray(code)
    if arr.ndim != 1 or arr.size < 2:
        raise ValueError(
            f"code: expected a 1-D ascending map of >= 2 values, got shape {arr.shape}"
        )
    if not np.all(np.diff(arr.astype(np.float32).astype(np.float64)) > 0):
        raise ValueError(
            "code: expected strictly ascending float32 values (sort the map, e.g. "
            "np.sort(code), and drop duplicates)"
        )
    return _cached_book(arr.astype(np.float32).tobytes())


_BOOKS: dict[bytes, CodeBook] = {}


def _cached_book(key: bytes) -> CodeBook:
    if key not in _BOOKS:
        _BOOKS[key] = CodeBook.of("custom", np.frombuffer(key, np.float32))
    return _BOOKS[key]


def _check_block(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(f"block_size: expected a positive int, got {block_size!r}")
    if block_size < 1:
        raise ValueError(f"block_size: expected a positive int, got {block_size}")
    return int(block_size)


def normalize(xb: jax.Array, absmax: jax.Array) -> jax.Array:
    """``xb * (1 / absmax)`` per block (as bitsandbytes); blocks with absmax 0 give 0."""
    safe = jnp.where(absmax > 0, absmax, 1.0)
    return xb * (1.0 / safe)[..., None]


def absmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """``max |x|`` over ``axis`` (finite ``x``), as ``max(max x, -min x)``.

    Computed by one two-output reduction (max and min together) rather than
    ``jnp.max(jnp.abs(x))``: XLA's CPU backend fuses the elementwise computation of ``x``
    into this reduction, whereas a plain max-reduction is handed to a library kernel that
    first writes ``x`` out in full. The value is the same.
    """
    axis = axis % x.ndim
    hi, lo = jax.lax.reduce(
        (x, x),
        (np.asarray(-np.inf, x.dtype), np.asarray(np.inf, x.dtype)),
        lambda a, b: (jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])),
        (axis,),
    )
    return jnp.maximum(hi, -lo)


def block_absmax(xb: jax.Array) -> jax.Array:
    """Max of ``|xb|`` over the last axis, with sub-normal results flushed to 0."""
    a = absmax(xb, -1)
    return jnp.where(a >= TINY, a, 0.0)


def quantize_blockwise(x, code, *, block_size: int = 256):
    """Blockwise quantization with a code map, as ``bitsandbytes.functional.quantize_blockwise``.

    The tensor is flattened and cut into blocks of ``block_size`` consecutive elements (the
    last block may be partial). For block ``b`` with ``absmax_b = max |x_i|``, element
    ``x_i`` is stored as the index of the nearest map value to ``x_i * (1 / absmax_b)``
    (on an exact float32 midpoint, the even index of the two, as bitsandbytes' search). A
    block whose absmax is 0 (or below the smallest normal float32, ``1.2e-38``) is stored
    as zeros with absmax 0. Inputs must be finite: a NaN
    propagates into its block's absmax (and so becomes visible on dequantization).

    Args:
        x: array of any shape and float dtype.
        code: the map, e.g. ``dynamic_map(signed=True)`` (<= 256 ascending values).
        block_size: elements per block.

    Returns:
        ``(codes, absmax)``: ``codes`` uint8 of ``x``'s shape, ``absmax`` float32 of shape
        ``(ceil(x.size / block_size),)``.

    Example:
        >>> from jaxq.optim import dynamic_map
        >>> x = jnp.linspace(-1.0, 1.0, 1000)
        >>> codes, absmax = quantize_blockwise(x, dynamic_map(True))
        >>> codes.dtype, absmax.shape
        (dtype('uint8'), (4,))
    """
    book = _codebook(code)
    if book.values.size > 256:
        raise ValueError(f"code: expected at most 256 values, got {book.values.size}")
    block_size = _check_block(block_size)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x: expected a floating array, got dtype {x.dtype}")
    return _quantize_flat(x, book, block_size)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_flat(x, book: CodeBook, block_size: int):
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.size
    nb = -(-n // block_size)
    xb = jnp.pad(flat, (0, nb * block_size - n)).reshape(nb, block_size)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    amax = jnp.where(amax >= TINY, amax, jnp.where(jnp.isnan(amax), amax, 0.0))
    idx = book.encode(jnp.nan_to_num(normalize(xb, amax)))
    codes = idx.reshape(-1)[:n].astype(jnp.uint8).reshape(x.shape)
    return codes, amax


def dequantize_blockwise(codes, absmax, code, shape, *, block_size: int = 256):
    """Inverse of :func:`quantize_blockwise`: ``code[codes] * absmax[block]`` (float32).

    Args:
        codes: uint8 codes (any shape with ``prod(shape)`` elements).
        absmax: float32 block maxima, ``ceil(prod(shape) / block_size)`` of them.
        code: the map used to quantize.
        shape: shape of the result.
        block_size: elements per block.

    Returns:
        float32 array of ``shape``.

    Raises:
        ValueError: when the sizes of ``codes`` or ``absmax`` do not match ``shape``.

    Example:
        >>> from jaxq.optim import dynamic_map
        >>> x = jnp.linspace(-1.0, 1.0, 1000)
        >>> c, a = quantize_blockwise(x, dynamic_map(True))
        >>> y = dequantize_blockwise(c, a, dynamic_map(True), x.shape)
        >>> bool(jnp.max(jnp.abs(y - x)) < 0.01)
        True
    """
    book = _codebook(code)
    block_size = _check_block(block_size)
    try:
        shape = tuple(int(s) for s in ((shape,) if np.ndim(shape) == 0 else shape))
    except (TypeError, ValueError) as e:
        raise TypeError(f"shape: expected a tuple of ints, got {shape!r}") from e
    n = int(np.prod(shape, dtype=np.int64))
    codes = jnp.asarray(codes)
    absmax = jnp.asarray(absmax)
    nb = -(-n // block_size)
    if codes.size != n:
        raise ValueError(f"codes: expected {n} elements for shape {shape}, got {codes.shape}")
    if absmax.size != nb:
        raise ValueError(
            f"absmax: expected {nb} blocks of {block_size} for shape {shape}, "
            f"got shape {absmax.shape}"
        )
    return _dequantize_flat(codes, absmax, book, shape, block_size)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _dequantize_flat(codes, absmax, book: CodeBook, shape, block_size: int):
    n = codes.size
    nb = absmax.size
    vals = book.decode(codes.reshape(-1))
    vals = jnp.pad(vals, (0, nb * block_size - n)).reshape(nb, block_size)
    out = vals * absmax.reshape(nb, 1).astype(jnp.float32)
    return out.reshape(-1)[:n].reshape(shape)


# ----------------------------------------------------------------- row layout helpers


def padded_len(n: int, block_size: int) -> int:
    """``n`` rounded up to a multiple of ``block_size``."""
    return -(-n // block_size) * block_size


def row_axes(shape, block_size: int) -> int:
    """How many trailing axes of ``shape`` form one row of blocks (the *row layout*).

    The smallest ``k`` for which the row length ``L = prod(shape[-k:])`` needs padding of
    at most ``L / 64`` to a multiple of ``block_size`` (every ``k`` with ``L`` a multiple of
    ``block_size`` qualifies); ``ndim`` when none does. So a last axis that is a multiple
    of the block size, or long, is its own row (blocks never straddle rows, and a
    parameter sharded along any axis keeps its blocks on one device when each shard holds
    whole blocks), while a short last axis -- ``(d, heads, 64)``, ``(n, 300)`` -- is merged
    with the axes before it instead of being padded to a whole block per row.

    Example:
        >>> row_axes((4096, 1024), 256), row_axes((1024, 16, 64), 256), row_axes((512, 300), 256)
        (1, 2, 2)
    """
    shape = tuple(int(d) for d in shape)
    for k in range(1, len(shape) + 1):
        n = int(np.prod(shape[len(shape) - k :], dtype=np.int64))
        if 64 * (padded_len(n, block_size) - n) <= n:
            return k
    return max(len(shape), 1)


def row_shape(shape, block_size: int) -> tuple[tuple[int, ...], int]:
    """``(lead, L)``: the leading axes kept and the row length of the row layout."""
    shape = tuple(int(d) for d in shape)
    k = row_axes(shape, block_size)
    lead = shape[: len(shape) - k]
    return lead, int(np.prod(shape[len(shape) - k :], dtype=np.int64))


def to_blocks(x: jax.Array, block_size: int) -> jax.Array:
    """``shape -> (*lead, L_pad / block_size, block_size)`` in the row layout, zero-padded."""
    lead, n = row_shape(x.shape, block_size)
    x = x.reshape(*lead, n)
    pad = padded_len(n, block_size) - n
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*lead, -1, block_size)


def from_blocks(xb: jax.Array, shape) -> jax.Array:
    """Inverse of :func:`to_blocks`: ``(*lead, nb, B)`` -> ``shape``."""
    lead, n = row_shape(shape, xb.shape[-1])
    x = xb.reshape(*xb.shape[:-2], -1)
    x = x[..., :n] if x.shape[-1] != n else x
    return x.reshape(shape)


def round_up_scale(a: jax.Array, dtype) -> jax.Array:
    """Stores non-negative float32 ``a`` in ``dtype``, rounding up (never below ``a``).

    For bfloat16 the float32 bit pattern is rounded up to a multiple of ``2**16``, so the
    stored scale is the smallest bfloat16 ``>= a`` and ``|x| / scale <= 1`` still holds.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return a.astype(jnp.float32)
    if dtype != jnp.bfloat16:
        raise ValueError(f"scale_dtype: expected float32 or bfloat16, got {dtype}")
    bits = jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.uint32)
    up = (bits + jnp.uint32(0xFFFF)) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(up, jnp.float32).astype(jnp.bfloat16)


def pack4(idx: jax.Array) -> jax.Array:
    """Packs 4-bit indices ``(..., 2k)`` into bytes ``(..., k)``: ``lo | hi << 4``.

    Written as an OR-reduction over each pair so that XLA fuses the computation of
    ``idx`` into the packing loop (no full-size intermediate).
    """
    pairs = idx.astype(jnp.uint8).reshape(*idx.shape[:-1], -1, 2)
    shifted = pairs << jnp.array([0, 4], jnp.uint8)
    return jax.lax.reduce(shifted, np.uint8(0), jax.lax.bitwise_or, (shifted.ndim - 1,))


def unpack4(packed: jax.Array) -> jax.Array:
    """Inverse of :func:`pack4`: bytes ``(..., k)`` -> int32 indices ``(..., 2k)``."""
    pairs = (packed[..., None] >> jnp.array([0, 4], jnp.uint8)) & jnp.uint8(0x0F)
    return pairs.reshape(*packed.shape[:-1], -1).astype(jnp.int32)
