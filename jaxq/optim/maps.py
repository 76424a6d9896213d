"""Quantization maps (code books) for optimizer states and nearest-code search.

A *map* is an ascending float32 vector of code values in ``[-1, 1]``; a value ``x``
(already divided by its block's absmax) is stored as the index of the nearest map value.

* :func:`dynamic_map` -- the 256-value dynamic tree maps of bitsandbytes, bit-identical.
* :func:`build_dynamic_map` -- the same family built from its definition (any bit width).
* :func:`dynamic_map_4bit` -- the 16-value signed dynamic map (3 exponent levels).
* :func:`linear_map_4bit` -- ``1/16 ... 16/16``: the 4-bit map *without zero* for Adam's
  second moment (Li et al. 2023).

:class:`CodeBook` bundles a map with what the nearest-code search needs under ``jit``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.optim import _tables

__all__ = [
    "CodeBook",
    "build_dynamic_map",
    "dynamic_map",
    "dynamic_map_4bit",
    "linear_map_4bit",
]

_SIGNED = np.array(_tables.DYNAMIC_SIGNED_U32, dtype=np.uint32).view(np.float32)
_UNSIGNED = np.array(_tables.DYNAMIC_UNSIGNED_U32, dtype=np.uint32).view(np.float32)
_SIGNED.setflags(write=False)
_UNSIGNED.setflags(write=False)


def dynamic_map(signed: bool) -> np.ndarray:
    """The 8-bit dynamic (tree) quantization map of bitsandbytes, bit-identical.

    Dynamic tree quantization spends one bit per decade on an "exponent" (a unary run of
    zeros) and the remaining bits on a linear fraction. For exponent level ``i = 0..6``
    the map holds the midpoints of ``linspace(0.1, 1, k + 1)`` scaled by ``10**(i - 6)``,
    with ``k = 2**i`` (signed; the negatives are added too) or ``k = 2**(i + 1)``
    (unsigned). Finally ``0`` and ``1.0`` are appended and the 256 values sorted. The
    smallest nonzero magnitude is about ``5.5e-7``, the largest ``1.0``.

    The values are shipped as float32 bit patterns (``jaxq/optim/_tables.py``) taken from
    bitsandbytes 0.50.x ``create_dynamic_map(signed)``; :func:`build_dynamic_map` re-derives
    them bit for bit.

    Args:
        signed: ``True`` for the map over ``[-1, 1]`` (first moments), ``False`` for the
            map over ``[0, 1]`` (second moments).

    Returns:
        A read-only float32 array of 256 ascending values.

    Example:
        >>> m = dynamic_map(signed=True)
        >>> m.shape, float(m[0]), float(m[127]), float(m[-1])
        ((256,), -0.992968738079071, 0.0, 1.0)
    """
    if not isinstance(signed, (bool, np.bool_)):
        raise TypeError(f"signed: expected a bool, got {type(signed).__name__}")
    return _SIGNED if signed else _UNSIGNED


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)`` as computed on a GPU.

    ``step = (end - start) / (steps - 1)`` in float32; the first half is
    ``fma(step, i, start)``, the second half ``fma(-step, steps - 1 - i, end)`` (one
    rounding each; the float64 product of two float32 values is exact).
    """
    f32 = np.float32
    lo, hi = f32(start), f32(end)
    step = f32((hi - lo) / f32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    first = np.float64(lo) + np.float64(step) * i
    second = np.float64(hi) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, first, second).astype(f32)


def build_dynamic_map(
    signed: bool, *, max_exponent_bits: int = 7, total_bits: int = 8
) -> np.ndarray:
    """Builds a dynamic tree quantization map from its definition.

    For level ``i = 0 .. max_exponent_bits - 1`` with ``s = total_bits - 1`` non-sign
    bits, ``k = 2**(i + s - max_exponent_bits)`` (signed) or twice that (unsigned)
    fractions: the midpoints of ``linspace(0.1, 1, k + 1)`` (float32, computed as a GPU
    computes ``torch.linspace``) times ``float32(10**(i - max_exponent_bits + 1))``, plus
    their negatives when signed. Then ``0`` and ``1`` are appended and the values sorted.
    With the defaults this reproduces :func:`dynamic_map` bit for bit; with
    ``max_exponent_bits=3, total_bits=4`` it gives the 16-value 4-bit map.

    Args:
        signed: whether to include negative values.
        max_exponent_bits: number of decades (exponent levels).
        total_bits: bits per code; the map has ``2**total_bits`` values.

    Returns:
        float32 array of ``2**total_bits`` ascending values.

    Raises:
        ValueError: if ``max_exponent_bits`` does not fit in ``total_bits - 1``.

    Example:
        >>> np.array_equal(build_dynamic_map(True), dynamic_map(True))
        True
    """
    non_sign = total_bits - 1
    if not 1 <= max_exponent_bits <= non_sign:
        raise ValueError(
            f"max_exponent_bits: expected 1..{non_sign} for total_bits={total_bits}, "
            f"got {max_exponent_bits}"
        )
    extra = 2 ** (non_sign - max_exponent_bits) - 1
    data: list[np.ndarray] = []
    levels = [(i, 2 ** (i + non_sign - max_exponent_bits + (0 if signed else 1)))
              for i in range(max_exponent_bits)]
    if extra > 0:
        levels.append((max_exponent_bits - 1, extra))
    for i, k in levels:
        bounds = _linspace_f32(0.1, 1.0, k + 1)
        means = ((bounds[:-1] + bounds[1:]) / np.float32(2.0)).astype(np.float32)
        scaled = (np.float32(10.0 ** (i - max_exponent_bits + 1)) * means).astype(np.float32)
        data.append(scaled)
        if signed:
            data.append(-scaled)
    data.append(np.array([0.0, 1.0], np.float32))
    out = np.sort(np.concatenate(data)).astype(np.float32)
    if out.size != 2**total_bits:
        raise ValueError(
            f"total_bits: the definition gives {out.size} values, expected {2**total_bits}"
        )
    return out


def dynamic_map_4bit() -> np.ndarray:
    """The 16-value signed dynamic map: 3 exponent levels, for 4-bit first moments.

    ``build_dynamic_map(True, max_exponent_bits=3, total_bits=4)``: magnitudes
    ``0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875`` with both signs, plus
    ``0`` and ``1``.

    Example:
        >>> dynamic_map_4bit().size
        16
    """
    return _MAP4


def linear_map_4bit() -> np.ndarray:
    """The 4-bit linear map without zero, ``(j + 1) / 16`` for ``j = 0..15``.

    Used for Adam's second moment in 4 bits (Li et al. 2023, "Memory Efficient
    Optimizers with 4-bit States"): excluding zero keeps ``1/sqrt(v)`` bounded.

    Example:
        >>> float(linear_map_4bit()[0]), float(linear_map_4bit()[-1])
        (0.0625, 1.0)
    """
    return _LIN4


_MAP4 = build_dynamic_map(True, max_exponent_bits=3, total_bits=4)
_LIN4 = (np.arange(1, 17, dtype=np.float32) / np.float32(16)).astype(np.float32)
_MAP4.setflags(write=False)
_LIN4.setflags(write=False)


def _bucket_table(mids: np.ndarray) -> tuple[np.ndarray, int]:
    """A table over the high bits of float32 patterns: index ``b`` -> #mids below bucket ``b``.

    Picks the coarsest bucketing (largest shift) such that every bucket of float32 bit
    patterns sharing ``bits >> shift`` holds at most one midpoint, so one comparison
    against ``mids[table[b]]`` finishes the search.
    """
    mbits = mids.view(np.uint32)
    for shift in range(17, 10, -1):
        if np.unique(mbits >> shift).size == mbits.size:
            break
    else:  # the shipped maps bucket at shift >= 14; CodeBook.of falls back to comparisons
        raise ValueError("map values too close together for a bucket table")
    b = np.arange(2 ** (32 - shift), dtype=np.uint64)
    low = (b << shift).astype(np.uint32)
    high = (low | np.uint32((1 << shift) - 1)).astype(np.uint32)
    # Smallest value in the bucket: the low pattern for +, the high pattern for -.
    smallest = np.where(low >= 0x80000000, high, low).view(np.float32)
    with np.errstate(invalid="ignore"):
        count = np.searchsorted(mids, smallest, side="left")
    count = np.where(np.isnan(smallest), 0, count)
    return count.astype(np.uint8), shift


def _search_table(mids: np.ndarray, count: np.ndarray, shift: int) -> np.ndarray:
    """The bucket table and the one comparison it leaves, merged into one uint32 table.

    Within bucket ``b`` (the float32 patterns with ``bits >> shift == b``) the nearest-code
    index is ``count[b] + (x > mids[count[b]])``, and the comparison only matters when that
    midpoint lies in the bucket, where it is a comparison of the low ``shift`` bits:
    ``low(x) > low(mid)`` for positive patterns, ``low(x) < low(mid)`` for negative ones.
    With ``flip(p) = low(p) ^ (mask if p is negative else 0)`` and ``t`` the flipped low
    bits of the in-bucket midpoint (``mask`` when there is none: never exceeded), the
    entry is ``count[b] << shift | (mask - t)``, and the index is
    ``(entry + flip(x)) >> shift``: the sum carries into the count exactly when
    ``flip(x) > t``.
    """
    mask = np.uint32((1 << shift) - 1)
    padded = np.append(mids, np.float32(np.inf))
    cand = count.astype(np.int64)
    mbits = padded[cand].view(np.uint32)
    b = np.arange(count.size, dtype=np.uint32)
    inside = ((mbits >> np.uint32(shift)) == b) & (cand < mids.size)
    low = mbits & mask
    low = np.where(b >= np.uint32(1 << (31 - shift)), low ^ mask, low)
    t = np.where(inside, low, mask).astype(np.uint32)
    return ((count.astype(np.uint32) << np.uint32(shift)) | (mask - t)).astype(np.uint32)


def _even_grid(values: np.ndarray) -> tuple[float, float] | None:
    """``(2 / d, 2 * j0 + 1)`` when ``values[j] == (j + j0) * d`` exactly, ``d = 2**k``, else None.

    Then ``mids[j] = (2 * (j + j0) + 1) * d / 2`` exactly, and with ``t = x * 2 / d`` (exact)
    ``#{j : mids[j] < x} = #{j < n - 1 : j < (t - 2 * j0 - 1) / 2}``; the subtraction and
    halving are exact while ``|t| < 2**22``, so the closed form matches the comparisons.
    """
    n = values.size
    if n < 2 or n > 2**16:
        return None
    d = float(values[1]) - float(values[0])
    if d <= 0 or np.frexp(d)[0] != 0.5:
        return None
    j0 = float(values[0]) / d
    if j0 != int(j0) or not 0 <= j0 < 2**16:
        return None
    want = ((np.arange(n) + j0) * d).astype(np.float32)
    if not np.array_equal(want, values) or np.abs(values).max() * 2 / d >= 2**22:
        return None
    return 2.0 / d, 2.0 * j0 + 1.0


@dataclasses.dataclass(frozen=True, eq=False)
class CodeBook:
    """A quantization map plus its nearest-code search (hashable by identity; static).

    ``encode(x)`` returns, for each element, the index of the nearest map value; an ``x``
    exactly at a float32 midpoint ``(values[j] + values[j + 1]) / 2`` goes to the *even*
    index of the two, as in bitsandbytes' binary search (whose last probe is always an even
    index). It is ``#{j : cuts[j] < x}`` with ``cuts[j]`` that midpoint where ``x`` on it
    belongs to ``j`` (even ``j``, or a midpoint that rounded onto ``values[j]``) and the
    float32 just below it where it belongs to ``j + 1``. Maps with more than 16 values
    search with one lookup of a table over the high bits of ``x``'s float32 bit pattern,
    whose entry also settles the one comparison left in the bucket (``_search_table``);
    evenly spaced maps ``values[j] = (j + j0) * d`` (``d`` a power of two, e.g.
    :func:`linear_map_4bit`) use the closed form
    ``clip(ceil((x * 2 / d - (2 * j0 + 1)) / 2), 0, n - 1)``, exact in float32 for
    ``|x| * 2 / d < 2**22`` (every step is exact there; an odd integer result of the
    ceiling's argument is a tie, moved up to the even index), which reads ``x`` once; other
    small maps compare against every cut.

    Attributes:
        name: a label.
        values: the ascending float32 map.

    Example:
        >>> cb = CodeBook.of("signed8", dynamic_map(True))
        >>> int(cb.encode(jnp.float32(1.0))), int(cb.encode(jnp.float32(0.0)))
        (255, 127)
    """

    name: str
    values: np.ndarray
    cuts: np.ndarray  # decision thresholds: midpoints, those going up moved one float32 down
    table: np.ndarray | None
    shift: int
    grid: tuple[float, float] | None = None  # (2 / d, 2 * j0 + 1) for evenly spaced maps
    search: np.ndarray | None = None  # the bucket table merged with the comparison

    @classmethod
    def of(cls, name: str, values: np.ndarray) -> CodeBook:
        values = np.asarray(values, np.float32)
        mids = ((values[:-1] + values[1:]) / np.float32(2)).astype(np.float32)
        # x == mids[j] goes to j when it is values[j], or a true tie with j even; else to
        # j + 1, which "x > cut" does with the float32 just below the midpoint.
        even = np.arange(mids.size) % 2 == 0
        lower = (mids == values[:-1]) | ((mids != values[1:]) & even)
        cuts = np.where(lower, mids, np.nextafter(mids, np.float32(-np.inf))).astype(np.float32)
        table, shift, search = None, 0, None
        if values.size > 16:
            try:
                table, shift = _bucket_table(cuts)
                search = _search_table(cuts, table, shift)
            except ValueError:  # values too close for buckets: compare against every cut
                table, shift, search = None, 0, None
        return cls(name, values, cuts, table, shift, _even_grid(values), search)

    @property
    def zero_index(self) -> int:
        """Index of the value 0 (or of the smallest value when the map has no zero)."""
        return int(np.argmin(np.abs(self.values)))

    def encode(self, x: jax.Array) -> jax.Array:
        """Nearest-code index (int32) of each element of float32 ``x``; NaN-free input."""
        x = jnp.asarray(x, jnp.float32)
        if self.grid is not None:
            scale, offset = self.grid
            t = (x * np.float32(scale) - np.float32(offset)) * np.float32(0.5)
            up = jnp.ceil(t)
            # t == k exactly: x is the midpoint of values k and k + 1; odd k ties up.
            tie_up = (up == t) & (jnp.abs(jnp.fmod(up, 2.0)) == 1.0)
            idx = up + tie_up.astype(jnp.float32)
            return jnp.clip(idx, 0, self.values.size - 1).astype(jnp.int32)
        if self.table is None:
            idx = jnp.zeros(x.shape, jnp.int32)
            for m in self.cuts:
                idx = idx + (x > m).astype(jnp.int32)
            return idx
        # One lookup of the merged table (see _search_table); the entry is used once, so
        # the lookup stays fused into its consumer.
        mask = np.uint32((1 << self.shift) - 1)
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        flip = (bits & mask) ^ ((bits >> np.uint32(31)) * mask)
        entry = table_lookup(self.search, (bits >> np.uint32(self.shift)).astype(jnp.int32))
        return ((entry + flip) >> np.uint32(self.shift)).astype(jnp.int32)

    @property
    def negatives(self) -> int:
        """Number of negative map values: ``values[i] < 0`` exactly when ``i < negatives``."""
        return int(np.count_nonzero(self.values < 0))

    def decode(self, idx: jax.Array, *, copy: int = 0) -> jax.Array:
        """Map values (float32) at integer indices ``idx``.

        ``copy`` selects a private copy of the table (see :func:`table_lookup`); every copy
        gives the same values.
        """
        return table_lookup(self.values, idx.astype(jnp.int32), copy=copy)


def table_lookup(table: np.ndarray, idx: jax.Array, *, copy: int = 0) -> jax.Array:
    """``table[idx]`` for a small constant table; the result is sharded like ``idx``.

    ``copy = k`` gathers from the table followed by ``k`` unused zeros. The values are the
    same for every ``k``, but XLA cannot merge lookups from tables of different lengths, so
    each consumer of a decoded moment (a block-maximum reduction, an encoder, the
    parameter update) keeps its own lookup fused into its own loop instead of sharing one
    materialised float32 copy of the moment.
    """
    table = np.asarray(table)
    if copy:
        table = np.concatenate([table, np.zeros(copy, table.dtype)])
    return jnp.asarray(table).at[idx].get(out_sharding=jax.typeof(idx).sharding, mode="clip")


SIGNED8 = CodeBook.of("dynamic_signed_8bit", _SIGNED)
UNSIGNED8 = CodeBook.of("dynamic_unsigned_8bit", _UNSIGNED)
SIGNED4 = CodeBook.of("dynamic_signed_4bit", _MAP4)
LINEAR4 = CodeBook.of("linear_4bit_no_zero", _LIN4)
