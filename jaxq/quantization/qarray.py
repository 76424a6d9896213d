"""``QArray``: a quantized array as a pytree of codes and scales with static metadata.

Invariants (checked by :meth:`QArray.validate`, which raises ``ValueError`` with shapes):

1. ``layout.kind`` is ``"tensor"``, ``"channel"`` or ``"block"``.
   * tensor: ``scale.shape == ()``;
   * channel: ``scale.shape`` equals ``shape`` with every axis not in ``layout.axes`` set to 1;
   * block: ``layout.axes == (a,)``, ``shape[a] % block_size == 0`` and ``scale.shape`` equals
     ``shape`` with ``shape[a]`` replaced by ``shape[a] // block_size``.
2. ``codes``: unpacked formats (8-bit) have ``codes.shape == shape``; sub-byte formats are
   packed along the last axis, ``codes.shape == shape[:-1] + (packed_length(shape[-1]),)``,
   dtype uint8 (two 4-bit codes, four 2-bit codes, eight 3-bit or four 6-bit codes per
   1/1/3/3 bytes).
3. ``scale`` dtype: float32 for element formats; E8M0 for MX formats; E4M3 for NVFP4, whose
   ``tensor_scale`` is a float32 scalar. ``zero_point`` (asymmetric integer formats only) has
   ``scale``'s shape and dtype uint8.

The represented value is ``decode(codes) * scale`` (``(decode(codes) - zero_point) * scale``
for asymmetric formats; times ``tensor_scale`` for NVFP4), broadcast blockwise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import formats as F
from jaxq.quantization import packing
from jaxq.quantization.cast import pow2
from jaxq.quantization.codes import code_dtype, decode

__all__ = ["QArray", "Layout", "dequantize"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Granularity of the scales.

    Attributes:
        kind: ``"tensor"``, ``"channel"`` (one scale per index of ``axes``) or ``"block"``
            (blocks of ``block_size`` consecutive elements along ``axes[0]``).
        axes: non-negative axes (channel axes, or the single blocked axis).
        block_size: elements per block (block layout only).
    """

    kind: Literal["tensor", "channel", "block"] = "tensor"
    axes: tuple[int, ...] = ()
    block_size: int | None = None

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.kind == "tensor":
            return ()
        if self.kind == "channel":
            return tuple(d if i in self.axes else 1 for i, d in enumerate(shape))
        a = self.axes[0]
        return shape[:a] + (shape[a] // self.block_size,) + shape[a + 1 :]

    def grouped_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """``shape`` with the blocked axis split into ``(n_blocks, block_size)``."""
        if self.kind != "block":
            return shape
        a = self.axes[0]
        return shape[:a] + (shape[a] // self.block_size, self.block_size) + shape[a + 1 :]

    def reduce_axes(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Axes of the grouped shape reduced to compute one scale."""
        if self.kind == "tensor":
            return tuple(range(len(shape)))
        if self.kind == "channel":
            return tuple(i for i in range(len(shape)) if i not in self.axes)
        return (self.axes[0] + 1,)

    def group_scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Scale shape broadcastable against the grouped shape (reduced axes kept as 1)."""
        g = self.grouped_shape(shape)
        red = self.reduce_axes(shape)
        return tuple(1 if i in red else d for i, d in enumerate(g))


def _element(fmt):
    return fmt.element if isinstance(fmt, F.BlockFormat) else fmt


def _is_packed(fmt) -> bool:
    return _element(fmt).bits < 8


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized array: codes + scales (pytree leaves) and static format/shape/layout.

    Attributes:
        codes: stored element codes (see module docstring for dtypes and packing).
        scale: scales (float32, or E8M0/E4M3 for block formats).
        zero_point: uint8 zero points for asymmetric integer formats, else ``None``.
        tensor_scale: float32 second-level scale (NVFP4), else ``None``.
        fmt: the format.
        shape: logical shape.
        dtype: logical dtype (what :func:`jaxq.dequantize` returns by default).
        layout: scale granularity.

    Example:
        >>> import jax.numpy as jnp, jaxq
        >>> q = jaxq.quantize(jnp.ones((4, 256)), "int4", block_size=128)
        >>> q.shape, q.codes.shape, q.scale.shape, q.nbytes
        ((4, 256), (4, 128), (4, 2), 544)
    """

    codes: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    tensor_scale: jax.Array | None
    fmt: F.Format
    shape: tuple[int, ...]
    dtype: np.dtype
    layout: Layout

    def tree_flatten(self):
        children = (self.codes, self.scale, self.zero_point, self.tensor_scale)
        return children, (self.fmt, self.shape, np.dtype(self.dtype), self.layout)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def packed(self) -> bool:
        """Whether codes are sub-byte and packed along the last axis."""
        return _is_packed(self.fmt)

    @property
    def nbytes(self) -> int:
        """Real bytes stored: codes + scales (+ zero points, tensor scale)."""
        leaves = [self.codes, self.scale, self.zero_point, self.tensor_scale]
        return int(
            sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves if x is not None)
        )

    @property
    def bits_per_element(self) -> float:
        """Stored bits per logical element, scales included."""
        return 8.0 * self.nbytes / max(self.size, 1)

    def expected_codes_shape(self) -> tuple[int, ...]:
        if not self.packed:
            return self.shape
        if not self.shape:
            return (packing.packed_length(1, _element(self.fmt).bits),)
        return self.shape[:-1] + (packing.packed_length(self.shape[-1], _element(self.fmt).bits),)

    def validate(self) -> QArray:
        """Checks the invariants of the module docstring; returns ``self``.

        Raises:
            ValueError: naming the field, its shape/dtype and what was expected.
        """
        fmt, elem = self.fmt, _element(self.fmt)
        if self.layout.kind not in ("tensor", "channel", "block"):
            raise ValueError(f"layout.kind must be tensor/channel/block, got {self.layout.kind!r}")
        if self.layout.kind == "block":
            (a,) = self.layout.axes
            if self.shape[a] % self.layout.block_size:
                raise ValueError(
                    f"axis {a} of shape {self.shape} is not a multiple of block_size "
                    f"{self.layout.block_size}"
                )
        want = self.expected_codes_shape()
        if tuple(self.codes.shape) != want:
            raise ValueError(f"codes has shape {tuple(self.codes.shape)}, expected {want}")
        want_dtype = np.dtype(np.uint8) if self.packed else code_dtype(elem)
        if np.dtype(self.codes.dtype) != want_dtype:
            raise ValueError(f"codes has dtype {self.codes.dtype}, expected {want_dtype}")
        s_shape = self.layout.scale_shape(self.shape)
        if tuple(self.scale.shape) != s_shape:
            raise ValueError(
                f"scale has shape {tuple(self.scale.shape)}, expected {s_shape} for layout "
                f"{self.layout} and shape {self.shape}"
            )
        s_dtype = fmt.scale_format.dtype if isinstance(fmt, F.BlockFormat) else np.float32
        if np.dtype(self.scale.dtype) != np.dtype(s_dtype):
            raise ValueError(f"scale has dtype {self.scale.dtype}, expected {np.dtype(s_dtype)}")
        asym = isinstance(elem, F.IntFormat) and not elem.signed
        if asym != (self.zero_point is not None):
            raise ValueError(f"zero_point must be given exactly for asymmetric formats ({fmt})")
        if asym and tuple(self.zero_point.shape) != s_shape:
            raise ValueError(
                f"zero_point has shape {tuple(self.zero_point.shape)}, expected {s_shape}"
            )
        has_ts = isinstance(fmt, F.BlockFormat) and fmt.tensor_scale
        if has_ts != (self.tensor_scale is not None):
            raise ValueError(f"tensor_scale must be given exactly for {fmt} (two-level scales)")
        if has_ts and tuple(self.tensor_scale.shape) != ():
            raise ValueError(
                f"tensor_scale has shape {tuple(self.tensor_scale.shape)}, expected ()"
            )
        return self

    def dequantize(self, dtype=None) -> jax.Array:
        """Same as :func:`jaxq.dequantize`."""
        return dequantize(self, dtype)

    def __repr__(self) -> str:
        return (
            f"QArray(fmt={self.fmt.name}, shape={self.shape}, layout={self.layout.kind}"
            f"{self.layout.axes or ''}, codes={getattr(self.codes, 'dtype', None)}"
            f"{tuple(getattr(self.codes, 'shape', ()))})"
        )


def dequantize(q: QArray, dtype=None) -> jax.Array:
    """Returns the values a :class:`QArray` represents, as ``dtype`` (default ``q.dtype``).

    Example:
        >>> import jax.numpy as jnp, jaxq
        >>> jaxq.dequantize(jaxq.quantize(jnp.array([1.0, -2.0, 0.3]), "e4m3")).tolist()
        [1.0, -2.0, 0.2857...]
    """
    if not isinstance(q, QArray):
        raise TypeError(f"dequantize expects a jaxq.QArray, got {type(q)!r}")
    q.validate()
    return _dequantize_jit(q, dtype=None if dtype is None else np.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize_jit(q: QArray, dtype) -> jax.Array:
    fmt, layout, shape = q.fmt, q.layout, q.shape
    elem = fmt.element if isinstance(fmt, F.BlockFormat) else fmt
    codes = q.codes
    if elem.bits < 8:
        codes = packing.unpack(codes, bits=elem.bits, n=shape[-1] if shape else 1)
    v = decode(codes.reshape(shape), elem).reshape(layout.grouped_shape(shape))
    gs = layout.group_scale_shape(shape)
    if isinstance(fmt, F.BlockFormat) and fmt.is_mx:
        bits = jax.lax.bitcast_convert_type(q.scale, jnp.uint8).astype(jnp.int32).reshape(gs)
        e = bits - 127
        # 2^e per block (two factors: 2^-127 is subnormal), NaN for the byte 255; applied as
        # one product, which rounds v * 2^e once either way
        s = jnp.where(bits == 255, np.float32(np.nan), pow2(e // 2) * pow2(e - e // 2))
        v = v * s
    elif isinstance(fmt, F.BlockFormat):
        v = v * q.scale.astype(jnp.float32).reshape(gs) * q.tensor_scale
    elif q.zero_point is not None:
        v = (v - q.zero_point.astype(jnp.float32).reshape(gs)) * q.scale.reshape(gs)
    else:
        v = v * q.scale.reshape(gs)
    return v.reshape(shape).astype(q.dtype if dtype is None else dtype)
