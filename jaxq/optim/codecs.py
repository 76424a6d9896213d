"""Storage formats ("codecs") for one optimizer moment of one parameter.

A codec turns a float32 moment of the parameter's shape into a small ``NamedTuple`` of
arrays and back. Blockwise codecs use the row layout of :mod:`jaxq.optim.blockwise`: for a
parameter of shape ``(*lead, *row)`` with row length ``n`` (usually just the last axis) the
codes have shape ``(*lead, n_pad)`` (8 bits) or ``(*lead, n_pad / 2)`` (4 bits, two codes
per byte, the even element in the low nibble) and the block scales
``(*lead, n_pad / block_size)``; each state axis follows one parameter axis (the row axis
follows the first axis merged into it), so the state takes the parameter's
``PartitionSpec`` on those axes.

Encoding is split so that the optimizer step compiles to few passes over memory: each
codec lists its ``reductions`` (functions from the float32 moment to its scale statistics,
e.g. block maxima) and ``encode(x, stats)`` takes their results. Codecs may also offer
``block_parts`` / ``block_stats`` (per-block max/min operands, so the engine reduces
several moments in one variadic reduction; ``extra_reductions`` then gives the rest of
the stats) and ``code_parts`` / ``from_bytes`` (the code bytes as parts to OR together,
so several moments are encoded by one variadic reduction). The engine gives each such
pass its own fused recomputation of ``x`` (see :func:`jaxq.optim.maps.table_lookup`),
so no float32 moment is ever written to memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import formats
from jaxq.optim import blockwise as bw
from jaxq.optim.maps import CodeBook
from jaxq.quantization.cast import e4m3_bits, e4m3_values

__all__ = ["QuantizedMoment", "Rank1Moment", "BlockCodec", "FP8Codec", "Rank1Codec"]


class QuantizedMoment(NamedTuple):
    """A blockwise-quantized moment (blocks along the rows of the row layout).

    Attributes:
        codes: uint8 map indices ``(..., n_pad)``, packed ``(..., n_pad / 2)`` for 4-bit
            maps, or float8_e4m3fn values for FP8.
        absmax: per-block scale ``(..., n_pad / block_size)`` (absmax; for FP8 absmax/448).
    """

    codes: jax.Array
    absmax: jax.Array


class Rank1Moment(NamedTuple):
    """A 4-bit moment normalized by ``min(row_max, col_max)`` of its matrix view.

    The view ``(..., r, c)`` is the parameter itself when its last axis is long, else the
    parameter with the short trailing axes merged (:meth:`Rank1Codec.view`).

    Attributes:
        codes: packed 4-bit indices ``(..., r, ceil(c / 2))``.
        row_max: float32 ``(..., r)``, max over the view's last axis.
        col_max: float32 ``(..., c)``, max over the view's second-to-last axis.
    """

    codes: jax.Array
    row_max: jax.Array
    col_max: jax.Array


def _e4m3(x: jax.Array, *, keep_nonzero: bool = False) -> jax.Array:
    """Round-to-nearest-even, saturating cast to E4M3 (stored as float8_e4m3fn).

    With ``keep_nonzero``, a positive ``x`` that rounds to +0 gets the smallest subnormal
    (bit pattern 1) instead.
    """
    fmt = formats.E4M3
    x = jnp.clip(x.astype(jnp.float32), -fmt.max, fmt.max)
    bits = e4m3_bits(x)
    if keep_nonzero:
        bits = jnp.where((bits == 0) & (x > 0), np.uint8(1), bits)
    return jax.lax.bitcast_convert_type(bits, fmt.dtype)


class _Blocked:
    """What every blockwise codec shares: the operands of its per-block reduction."""

    def block_parts(self, xb: jax.Array):
        """Operands of the block reduction over the last axis of ``xb``: ``(max, min)``.

        Zero padding leaves ``max |x|`` as it is.
        """
        return ((xb, "max"), (xb, "min"))


class _RowLayout(_Blocked):
    """Codecs whose state follows the row layout of :mod:`jaxq.optim.blockwise`."""

    def dims(self, shape) -> QuantizedMoment:
        # The row axis follows the first parameter axis merged into it.
        same = tuple(range(len(shape) - bw.row_axes(shape, self.block_size) + 1))
        return QuantizedMoment(same, same)

    def blocks(self, x: jax.Array) -> jax.Array:
        """``x`` cut into this codec's blocks (row layout)."""
        return bw.to_blocks(x, self.block_size)

    def row_axes(self, shape) -> int:
        """Number of trailing axes forming a row of blocks."""
        return bw.row_axes(shape, self.block_size)


@dataclasses.dataclass(frozen=True)
class BlockCodec(_RowLayout):
    """Blockwise absmax quantization onto a code map (8-bit, or 4-bit packed).

    ``encode``: per block ``absmax = max |x|``, stored rounded up in ``scale_dtype``;
    index of the nearest map value to ``x / absmax``. With ``sign_fix``, a code whose value
    has the other sign than a nonzero ``x`` moves one step toward ``x``'s sign (as
    bitsandbytes does for first moments), so no moment flips sign or collapses from
    negative to zero.
    """

    book: CodeBook
    block_size: int
    bits: int = 8
    sign_fix: bool = False
    scale_dtype: Any = jnp.float32

    def init(self, shape) -> QuantizedMoment:
        lead, n = bw.row_shape(shape, self.block_size)
        npad = bw.padded_len(n, self.block_size)
        z = self.book.zero_index
        fill = z | (z << 4) if self.bits == 4 else z
        codes = jnp.full((*lead, npad * self.bits // 8), fill, jnp.uint8)
        absmax = jnp.zeros((*lead, npad // self.block_size), self.scale_dtype)
        return QuantizedMoment(codes, absmax)

    def decode(self, q: QuantizedMoment, shape, *, copy: int = 0) -> jax.Array:
        idx = bw.unpack4(q.codes) if self.bits == 4 else q.codes
        vals = self.book.decode(idx, copy=copy)
        vals = vals.reshape(*vals.shape[:-1], -1, self.block_size)
        x = vals * q.absmax.astype(jnp.float32)[..., None]
        return bw.from_blocks(x, shape)

    @property
    def reductions(self):
        return (self._scale,)

    def _scale(self, x: jax.Array) -> jax.Array:
        xb = bw.to_blocks(x, self.block_size)
        return bw.round_up_scale(bw.block_absmax(xb), self.scale_dtype)

    def block_stats(self, reduced) -> tuple:
        """The stats (as ``reductions`` gives them) from the reduced :meth:`block_parts`."""
        hi, lo = reduced
        a = jnp.maximum(hi, -lo)
        return (bw.round_up_scale(jnp.where(a >= bw.TINY, a, 0.0), self.scale_dtype),)

    def _index(self, x: jax.Array, amax: jax.Array) -> jax.Array:
        xb = bw.to_blocks(x, self.block_size)
        idx = self.book.encode(bw.normalize(xb, amax.astype(jnp.float32)))
        if self.sign_fix:
            # map values are ascending: value < 0 exactly for indices below `negatives`.
            neg = self.book.negatives
            idx = idx - ((xb < 0) & (idx >= neg)) + ((xb > 0) & (idx < neg))
        return idx.reshape(*idx.shape[:-2], -1)

    def code_parts(self, x: jax.Array, stats):
        """uint8 parts ``(..., bytes, k)`` and shifts: ``byte = OR_j parts[..., j] << s_j``."""
        idx = self._index(x, stats[0]).astype(jnp.uint8)
        if self.bits == 4:
            return idx.reshape(*idx.shape[:-1], -1, 2), (0, 4)
        return idx[..., None], (0,)

    def from_bytes(self, codes: jax.Array, stats) -> QuantizedMoment:
        """The state from the code bytes assembled from :meth:`code_parts`."""
        return QuantizedMoment(codes, stats[0])

    def encode(self, x: jax.Array, stats=None) -> QuantizedMoment:
        (amax,) = (self._scale(x),) if stats is None else stats
        idx = self._index(x, amax)
        codes = bw.pack4(idx) if self.bits == 4 else idx.astype(jnp.uint8)
        return QuantizedMoment(codes, amax)


@dataclasses.dataclass(frozen=True)
class FP8Codec(_RowLayout):
    """Blockwise E4M3: ``scale = absmax / 448`` per block, codes = ``E4M3(x / scale)`` (RNE).

    E4M3 spans about 18 binades below its maximum (``448`` down to the smallest subnormal
    ``2**-9``), so a block of second moments can hold elements that round to 0 while their
    first moment does not; Adam's next step then divides that ``m`` by
    ``sqrt((1 - b2) g**2)``, up to ``1 / sqrt(1 - b2)`` (32 for ``b2 = 0.999``) times too
    small a denominator. With ``keep_nonzero=True`` (used for ``v``) a positive ``x`` that
    would round to 0 is stored as the smallest subnormal ``2**-9 * scale`` instead: the
    zero-point problem of second-moment quantization (Li et al. 2023), solved by rounding
    up, which only damps the update of such an element.
    """

    block_size: int = 256
    scale_dtype: Any = jnp.float32
    keep_nonzero: bool = False

    def init(self, shape) -> QuantizedMoment:
        lead, n = bw.row_shape(shape, self.block_size)
        npad = bw.padded_len(n, self.block_size)
        return QuantizedMoment(
            jnp.zeros((*lead, npad), formats.E4M3.dtype),
            jnp.zeros((*lead, npad // self.block_size), self.scale_dtype),
        )

    def decode(self, q: QuantizedMoment, shape, *, copy: int = 0) -> jax.Array:
        # E4M3 -> float32 by integer arithmetic (exact, no lookup, so each consumer
        # recomputes it inside its own vectorized loop; ``copy`` has nothing to select).
        del copy
        vals = e4m3_values(jax.lax.bitcast_convert_type(q.codes, jnp.uint8))
        vals = vals.reshape(*q.codes.shape[:-1], -1, self.block_size)
        return bw.from_blocks(vals * q.absmax.astype(jnp.float32)[..., None], shape)

    @property
    def reductions(self):
        return (self._scale,)

    def _scale(self, x: jax.Array) -> jax.Array:
        xb = bw.to_blocks(x, self.block_size)
        scale = bw.block_absmax(xb) / np.float32(formats.E4M3.max)
        return bw.round_up_scale(jnp.where(scale >= bw.TINY, scale, 0.0), self.scale_dtype)

    def block_stats(self, reduced) -> tuple:
        """The stats (as ``reductions`` gives them) from the reduced :meth:`block_parts`."""
        hi, lo = reduced
        a = jnp.maximum(hi, -lo)
        scale = jnp.where(a >= bw.TINY, a, 0.0) / np.float32(formats.E4M3.max)
        return (bw.round_up_scale(jnp.where(scale >= bw.TINY, scale, 0.0), self.scale_dtype),)

    def encode(self, x: jax.Array, stats=None) -> QuantizedMoment:
        (scale,) = (self._scale(x),) if stats is None else stats
        xb = bw.to_blocks(x, self.block_size)
        codes = _e4m3(bw.normalize(xb, scale.astype(jnp.float32)), keep_nonzero=self.keep_nonzero)
        return QuantizedMoment(codes.reshape(*codes.shape[:-2], -1), scale)


@dataclasses.dataclass(frozen=True)
class Rank1Codec(_Blocked):
    """4-bit linear map without zero, normalized by ``min(row_max_i, col_max_j)``.

    For a non-negative moment ``v`` viewed as ``(..., r, c)`` (see :meth:`view`; for a
    matrix with a long last axis, the matrix itself): ``R_i = max_j v_ij``,
    ``C_j = max_i v_ij``, ``N_ij = min(R_i, C_j)`` and the code of ``v_ij / N_ij`` on the
    map ``{1/16, ..., 16/16}`` (Li et al. 2023). Since ``N_ij >= v_ij``, the ratio is in
    ``[0, 1]``; a zero ``N_ij`` decodes to 0.
    """

    book: CodeBook
    block_size: int = 128  # blocks of the row-maximum reduction, and of the row layout

    def view(self, shape) -> tuple[int, ...]:
        """The matrix view ``(*batch, r, c)`` that is normalized.

        A matrix is its own view (Li et al.'s rank-1 normalization). A tensor of 3 or more
        axes is viewed in the row layout (:func:`jaxq.optim.blockwise.row_shape`): with a
        long last axis it is a batch of matrices over its leading axes; a short last axis
        is merged with the axes before it (``(d, heads, 64)`` -> ``(d, heads * 64)``), so
        the row and column maxima stay a small fraction of the state.
        """
        shape = tuple(int(d) for d in shape)
        if not self.applies_to(shape):
            raise ValueError(
                f"shape: expected a matrix or a tensor with a matrix view, got {shape}"
            )
        if len(shape) == 2:
            return shape
        lead, n = bw.row_shape(shape, self.block_size)
        return (*lead, n)

    def applies_to(self, shape) -> bool:
        """Whether ``shape`` has a matrix view ``(..., r, c)`` whose maxima are cheap.

        The view is 2-D, or N-D keeping a leading axis, with ``1/r + 1/c <= 1/16``: the
        ``r + c`` float32 maxima add at most 1/4 byte per parameter. Degenerate matrices
        such as ``(1, 8192)`` or ``(4096, 2)``, whose maxima would cost up to 4 bytes per
        parameter, are left to the blockwise codec.
        """
        shape = tuple(int(d) for d in shape)
        if len(shape) > 2:
            lead, c = bw.row_shape(shape, self.block_size)
            if not lead:
                return False
            shape = (lead[-1], c)
        if len(shape) != 2:
            return False
        r, c = shape
        return r > 0 and c > 0 and 16 * (r + c) <= r * c

    def init(self, shape) -> Rank1Moment:
        *lead, r, c = self.view(shape)
        return Rank1Moment(
            jnp.zeros((*lead, r, (c + 1) // 2), jnp.uint8),
            jnp.zeros((*lead, r), jnp.float32),
            jnp.zeros((*lead, c), jnp.float32),
        )

    def dims(self, shape) -> Rank1Moment:
        # View axis j follows parameter axis j; the row axis the first axis merged into it.
        nd = len(self.view(shape))
        return Rank1Moment(
            tuple(range(nd)),
            tuple(range(nd - 1)),
            tuple(range(nd - 2)) + (nd - 1,),
        )

    def _norm(self, row, col):
        return jnp.minimum(row[..., :, None], col[..., None, :])

    def decode(self, q: Rank1Moment, shape, *, copy: int = 0) -> jax.Array:
        c = self.view(shape)[-1]
        idx = bw.unpack4(q.codes)[..., :c]
        return (self.book.decode(idx, copy=copy) * self._norm(q.row_max, q.col_max)).reshape(
            shape
        )

    @property
    def reductions(self):
        return (self._row, self._col)

    def row_axes(self, shape) -> int:
        """Number of trailing parameter axes merged into the view's rows."""
        return len(shape) - len(self.view(shape)) + 1

    def blocks(self, x: jax.Array) -> jax.Array:
        """The view's rows cut into zero-padded blocks: ``(*batch, r, c_pad / B, B)``."""
        x = x.reshape(self.view(x.shape))
        pad = bw.padded_len(x.shape[-1], self.block_size) - x.shape[-1]
        if pad:
            x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
        return x.reshape(*x.shape[:-1], -1, self.block_size)

    def block_stats(self, reduced) -> tuple:
        """The row maxima from the reduced :meth:`block_parts` (the column maxima follow)."""
        hi, lo = reduced
        row = jnp.maximum(jnp.max(hi, axis=-1), -jnp.min(lo, axis=-1))
        return (jnp.where(row >= bw.TINY, row, 0.0),)

    @property
    def extra_reductions(self):
        return (self._col,)

    def _row(self, x: jax.Array) -> jax.Array:
        row = bw.absmax(x.reshape(self.view(x.shape)), -1)  # x >= 0: max |x| = max x
        return jnp.where(row >= bw.TINY, row, 0.0)

    def _col(self, x: jax.Array) -> jax.Array:
        # Single-operand maxima: the partitioner splits them across a sharded row axis
        # (partial maxima, then an all-reduce), which it does not do for the two-output
        # reduction of bw.absmax.
        col = _col_max(x.reshape(self.view(x.shape)))
        return jnp.where(col >= bw.TINY, col, 0.0)

    def _index(self, x: jax.Array, row, col) -> jax.Array:
        x = x.reshape(self.view(x.shape))
        norm = self._norm(row, col)
        idx = self.book.encode(x / jnp.where(norm > 0, norm, 1.0))
        if x.shape[-1] % 2:
            idx = jnp.pad(idx, [(0, 0)] * (idx.ndim - 1) + [(0, 1)])
        return idx

    def code_parts(self, x: jax.Array, stats):
        """uint8 nibble pairs ``(..., r, ceil(c / 2), 2)`` and shifts ``(0, 4)``."""
        idx = self._index(x, *stats).astype(jnp.uint8)
        return idx.reshape(*idx.shape[:-1], -1, 2), (0, 4)

    def from_bytes(self, codes: jax.Array, stats) -> Rank1Moment:
        """The state from the code bytes assembled from :meth:`code_parts`."""
        return Rank1Moment(codes, *stats)

    def encode(self, x: jax.Array, stats=None) -> Rank1Moment:
        row, col = (self._row(x), self._col(x)) if stats is None else stats
        return Rank1Moment(bw.pack4(self._index(x, row, col)), row, col)


def _col_max(x: jax.Array) -> jax.Array:
    """``max(x, axis=-2)`` for NaN-free float32 ``x``, in two stages.

    Groups of ``k = 8`` rows are first reduced as order-preserving int32 keys (``bits ^
    ((bits >> 31) & 0x7FFFFFFF)`` orders like the float values), which XLA's CPU backend
    fuses with the computation of ``x``; a float max over the ``r / k`` partial rows
    follows. Both stages are single-operand maxima, so the partitioner still splits them
    across a sharded row axis. The result is the float maximum (up to the sign of zero).
    """
    i32 = jnp.int32
    *lead, r, c = x.shape
    # 8 rows per group measured fastest (4096 x 4096, CPU); only when the row count keeps
    # whole groups on each of up to 64 shards of the row axis, else a single stage.
    k = 8 if r % (8 * 64) == 0 else 1
    if k == 1:
        return jnp.max(x, axis=-2)
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), i32)
    key = bits ^ ((bits >> i32(31)) & i32(0x7FFFFFFF))
    part = jnp.max(key.reshape(*lead, r // k, k, c), axis=-2)
    part = jax.lax.bitcast_convert_type(part ^ ((part >> i32(31)) & i32(0x7FFFFFFF)), jnp.float32)
    return jnp.max(part, axis=-2)


def shard_count(mesh, axes) -> int:
    """Number of shards of an axis partitioned over mesh ``axes`` (None, a name or a tuple)."""
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([mesh.shape[a] for a in axes]))


def explicit_sharding(x) -> jax.sharding.NamedSharding | None:
    """The sharding in a traced value's type when its mesh has explicit axes, else None."""
    if not isinstance(x, jax.core.Tracer):
        return None
    sharding = jax.typeof(x).sharding
    explicit = jax.sharding.AxisType.Explicit
    if isinstance(sharding, jax.sharding.NamedSharding) and any(
        t == explicit for t in getattr(sharding.mesh, "axis_types", ())
    ):
        return sharding
    return None


def place_like(param, state, dims):
    """Puts each array of ``state`` on ``param``'s mesh with the matching partition.

    ``dims`` gives, per state array, the parameter axis each of its axes follows (an axis
    whose length the mesh axes do not divide stays unpartitioned). Works on concrete
    arrays with a ``NamedSharding`` (``jax.device_put``) and, under ``jit``, on tracers
    whose type carries an explicit sharding (``jax.sharding.reshard``); anything else --
    e.g. ``jit`` over automatic sharding, where the partitioner decides -- is returned
    unchanged.
    """
    if isinstance(param, jax.core.Tracer):
        sharding = explicit_sharding(param)
        if sharding is None:
            return state
        move = jax.sharding.reshard
    else:
        sharding = getattr(param, "sharding", None)
        if not isinstance(sharding, jax.sharding.NamedSharding):
            return state
        move = jax.device_put
    spec = tuple(sharding.spec) + (None,) * (param.ndim - len(sharding.spec))
    mesh = sharding.mesh

    def put(arr, arr_dims):
        parts = []
        for d, pd in zip(range(arr.ndim), arr_dims, strict=True):
            axes = spec[pd]
            parts.append(axes if arr.shape[d] % shard_count(mesh, axes) == 0 else None)
        spec_ = jax.sharding.PartitionSpec(*parts)
        return move(arr, jax.sharding.NamedSharding(mesh, spec_))

    return type(state)(*(put(a, d) for a, d in zip(state, dims, strict=True)))
