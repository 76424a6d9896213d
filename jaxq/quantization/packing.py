"""Packing sub-byte codes into bytes along the last axis.

``b``-bit codes (``b`` in 2, 3, 4, 6) are grouped ``g = lcm(8, b) / b`` at a time into
``lcm(8, b) / 8`` bytes, little-endian within the group: code ``j`` of a group occupies bits
``[j*b, (j+1)*b)`` of the group's integer. Two 4-bit codes share a byte (code 0 in the low
nibble), four 2-bit codes share a byte, eight 3-bit codes and four 6-bit codes share three
bytes. The last axis is zero-padded to a multiple of ``g``.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxq.quantization.packing import pack, unpack
    >>> p = pack(jnp.array([1, 2, 3], jnp.uint8), bits=4)
    >>> p.tolist(), unpack(p, bits=4, n=3).tolist()
    ([33, 3], [1, 2, 3])
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

__all__ = ["pack", "unpack", "packed_length", "group"]


def group(bits: int) -> tuple[int, int]:
    """``(codes per group, bytes per group)`` for ``bits``-bit codes."""
    if bits not in (1, 2, 3, 4, 6, 8):
        raise ValueError(f"bits must be one of 1, 2, 3, 4, 6, 8, got {bits}")
    n = math.lcm(8, bits)
    return n // bits, n // 8


def packed_length(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits occupy along the packed axis."""
    g, nbytes = group(bits)
    return -(-n // g) * nbytes


@functools.partial(jax.jit, static_argnames=("bits",))
def pack(codes: jax.Array, *, bits: int) -> jax.Array:
    """Packs unsigned ``bits``-bit codes (any integer dtype) along the last axis into uint8."""
    g, nbytes = group(bits)
    if bits == 8:
        return codes.astype(jnp.uint8)
    n = codes.shape[-1]
    pad = -n % g
    c = codes.astype(jnp.uint32) & ((1 << bits) - 1)
    if pad:
        c = jnp.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, pad)])
    c = c.reshape(*c.shape[:-1], -1, g)
    # The fields are disjoint, so OR is a sum. As a reduction it is also materialised once,
    # rather than fused into (and recomputed by) every consumer of the packed bytes.
    shifts = jnp.arange(g, dtype=jnp.uint32) * bits
    word = jnp.sum(c << shifts, axis=-1, dtype=jnp.uint32)
    out = jnp.stack([(word >> (8 * k)) & 0xFF for k in range(nbytes)], axis=-1)
    return out.reshape(*out.shape[:-2], -1).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("bits", "n"))
def unpack(packed: jax.Array, *, bits: int, n: int) -> jax.Array:
    """Inverse of :func:`pack`: returns ``n`` uint8 codes along the last axis."""
    g, nbytes = group(bits)
    if bits == 8:
        return packed[..., :n].astype(jnp.uint8)
    p = packed.astype(jnp.uint32).reshape(*packed.shape[:-1], -1, nbytes)
    word = jnp.zeros(p.shape[:-1], jnp.uint32)
    for k in range(nbytes):
        word = word | (p[..., k] << (8 * k))
    mask = (1 << bits) - 1
    out = jnp.stack([(word >> (j * bits)) & mask for j in range(g)], axis=-1)
    return out.reshape(*out.shape[:-2], -1)[..., :n].astype(jnp.uint8)
