"""``ScaledArray``: a tensor stored as ``data * scale``.

``data`` holds the numbers in a low-precision-friendly range (any floating dtype, FP8
included); ``scale`` is float32, either a scalar or a per-block array. A per-block scale
has the same rank as ``data`` and each of its axes divides the matching data axis; block
``b`` along axis ``i`` has ``data.shape[i] // scale.shape[i]`` elements, so

    value[j0, j1, ...] = data[j0, j1, ...] * scale[j0 // B0, j1 // B1, ...]

with ``B = data.shape // scale.shape``. An MX or NVFP4 tensor of shape ``(M, K)`` with
32-element blocks along ``K`` is ``ScaledArray(codes, scale)`` with ``scale.shape ==
(M, K // 32)``; a per-channel scale is ``(M, 1)``.

Example:
    >>> import jax.numpy as jnp
    >>> sa = ScaledArray(jnp.array([1.0, -0.5]), jnp.float32(8.0))
    >>> asarray(sa)
    Array([ 8., -4.], dtype=float32)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import core as jcore
from jax.tree_util import register_pytree_node_class

from jaxq.scaled.scales import pow2_round

__all__ = [
    "ScaledArray",
    "as_scaled_array",
    "asarray",
    "is_scaled",
    "scaled",
    "block_shape",
    "expand_scale",
    "to_scalar_scale",
]


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jcore.Tracer)


def block_shape(data_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Block shape ``data_shape // scale_shape`` of a per-block scale (``()`` for a scalar).

    Raises:
        ValueError: when ``scale_shape`` is neither ``()`` nor a same-rank shape whose
            axes divide the data axes.

    Example:
        >>> block_shape((4, 64), (4, 2))
        (1, 32)
    """
    data_shape, scale_shape = tuple(data_shape), tuple(scale_shape)
    if scale_shape == ():
        return ()
    if len(scale_shape) != len(data_shape) or any(
        s <= 0 or d % s for d, s in zip(data_shape, scale_shape, strict=True)
    ):
        raise ValueError(
            f"scale of shape {scale_shape} does not tile data of shape {data_shape}: expected "
            "a scalar scale or a scale of the same rank whose axes divide the data axes"
        )
    return tuple(d // s for d, s in zip(data_shape, scale_shape, strict=True))


def expand_scale(scale: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Repeats a per-block scale to ``shape`` (a scalar scale is returned unchanged).

    Example:
        >>> expand_scale(jnp.array([[1.0, 2.0]]), (1, 4))
        Array([[1., 1., 2., 2.]], dtype=float32)
    """
    scale = jnp.asarray(scale)
    if scale.ndim == 0:
        return scale
    blocks = block_shape(shape, scale.shape)
    if all(b == 1 or s == 1 for b, s in zip(blocks, scale.shape, strict=True)):
        return scale  # broadcasts as is
    inter = []
    for s, b in zip(scale.shape, blocks, strict=True):
        inter += [s, b]
    x = jnp.broadcast_to(scale.reshape([d for s in scale.shape for d in (s, 1)]), inter)
    return x.reshape(shape)


# The operators (``a + b``, ``a @ b``, ...) run the matching jnp function under
# ``jaxq.scaled.scalify``. This module sits below the interpreter in the import graph (the
# interpreter reads ScaledArrays), so the interpreter installs the transform here when it
# is imported, with :func:`install_operator_transform`; importing ``jaxq.scaled`` does so.
_OPERATOR_TRANSFORM: list[Any] = []


def install_operator_transform(transform: Any) -> None:
    """Sets the transform that ``ScaledArray`` operators run under (``scalify``)."""
    _OPERATOR_TRANSFORM[:] = [transform]


@register_pytree_node_class
class ScaledArray:
    """A tensor represented as ``data * scale``; a JAX pytree with leaves ``(data, scale)``.

    Args:
        data: floating array holding the scaled values (float32, bf16, fp16 or FP8).
        scale: float32 scalar, or a per-block array of the same rank as ``data`` whose
            axes divide the data axes (see the module docstring).

    Attributes:
        data: the stored array.
        scale: the float32 scale.

    ``ScaledArray(0, None)`` and other integer/None leaves are accepted unchecked, so that
    the class can describe pytree specs such as ``jax.vmap(..., in_axes=ScaledArray(0,
    None))``.

    Raises:
        TypeError: if ``data`` is not floating.
        ValueError: if the scale does not tile the data, or (for concrete values) is zero,
            negative or non-finite.

    Example:
        >>> sa = ScaledArray(jnp.ones((2, 4), jnp.float16), jnp.float32(2.0**-20))
        >>> sa.shape, sa.dtype
        ((2, 4), dtype('float16'))
    """

    __slots__ = ("data", "scale")

    def __init__(self, data: Any, scale: Any):
        if data is None or scale is None or isinstance(data, int) and not isinstance(data, bool):
            # a pytree *spec* (e.g. vmap's in_axes=ScaledArray(0, None)), not a tensor
            self.data, self.scale = data, scale
            return
        data = data if isinstance(data, jax.Array | jcore.Tracer) else jnp.asarray(data)
        if not jnp.issubdtype(data.dtype, jnp.floating):
            raise TypeError(f"ScaledArray data must be floating, got dtype {data.dtype}")
        scale = jnp.asarray(scale, jnp.float32)
        block_shape(data.shape, scale.shape)
        if _is_concrete(scale):
            s = np.asarray(scale)
            if not np.all(np.isfinite(s) & (s > 0)):
                raise ValueError(
                    f"ScaledArray scale must be positive and finite, got {s!r} "
                    f"(shape {s.shape}); a zero or non-finite scale would silently zero or "
                    "poison every value"
                )
        self.data = data
        self.scale = scale

    # -- pytree -------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.data, self.scale), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)  # no validation: transformations pass placeholder leaves
        obj.data, obj.scale = children
        return obj

    # -- array-like metadata ------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the represented tensor (= ``data.shape``)."""
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        """Dtype of the represented tensor (= ``data.dtype``)."""
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def aval(self) -> jcore.ShapedArray:
        """``ShapedArray(shape, dtype)`` of the represented tensor."""
        return jcore.ShapedArray(self.shape, self.dtype)

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Elements per scale block along each axis; ``()`` for a scalar scale."""
        return block_shape(self.shape, jnp.shape(self.scale))

    def __repr__(self) -> str:
        return f"ScaledArray(data={self.data!r}, scale={self.scale!r})"

    def to_array(self, dtype: Any = None) -> jax.Array:
        """The value ``data * scale`` (see :func:`asarray`)."""
        return asarray(self, dtype=dtype)

    def astype(self, dtype: Any) -> ScaledArray:
        """Changes the data's dtype only; the scale is kept (a scaled-world cast)."""
        return ScaledArray(self.data.astype(dtype), self.scale)

    # -- operators: each runs the matching jnp function under scalify --------------------
    def _op(self, fn, *args):
        return _OPERATOR_TRANSFORM[0](fn)(*args)

    def __neg__(self):
        return self._op(jnp.negative, self)

    def __pos__(self):
        return self

    def __abs__(self):
        return self._op(jnp.abs, self)

    def __add__(self, o):
        return self._op(jnp.add, self, o)

    def __radd__(self, o):
        return self._op(jnp.add, o, self)

    def __sub__(self, o):
        return self._op(jnp.subtract, self, o)

    def __rsub__(self, o):
        return self._op(jnp.subtract, o, self)

    def __mul__(self, o):
        return self._op(jnp.multiply, self, o)

    def __rmul__(self, o):
        return self._op(jnp.multiply, o, self)

    def __truediv__(self, o):
        return self._op(jnp.divide, self, o)

    def __rtruediv__(self, o):
        return self._op(jnp.divide, o, self)

    def __pow__(self, o):
        return self._op(jnp.power, self, o)

    def __matmul__(self, o):
        return self._op(jnp.matmul, self, o)

    def __rmatmul__(self, o):
        return self._op(jnp.matmul, o, self)

    def __getitem__(self, idx):
        return self._op(lambda x: x[idx], self)

    def __lt__(self, o):
        return self._op(jnp.less, self, o)

    def __le__(self, o):
        return self._op(jnp.less_equal, self, o)

    def __gt__(self, o):
        return self._op(jnp.greater, self, o)

    def __ge__(self, o):
        return self._op(jnp.greater_equal, self, o)

    @property
    def T(self) -> ScaledArray:
        return self._op(jnp.transpose, self)

    def reshape(self, *shape) -> ScaledArray:
        shape = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
        return self._op(lambda x: jnp.reshape(x, shape), self)

    def sum(self, axis=None) -> ScaledArray:
        return self._op(lambda x: jnp.sum(x, axis=axis), self)

    __hash__ = None  # type: ignore[assignment]


def scaled(data: Any, scale: Any) -> ScaledArray:
    """Builds a ``ScaledArray`` without validation (for rules, on traced or NaN scales).

    The interpreter checks every rule output's shape, dtype and block layout instead.
    """
    if not isinstance(scale, jax.Array | jcore.Tracer):
        # a constant (such as a nonlinear op's unit scale) stays on the host, so that the
        # scale arithmetic on it is done when tracing; scalify returns JAX arrays
        scale = np.asarray(scale, np.float32)
    elif scale.dtype != jnp.float32:
        scale = scale.astype(jnp.float32)
    return ScaledArray.tree_unflatten(None, (data, scale))


def is_scaled(x: Any) -> bool:
    """True for a :class:`ScaledArray`."""
    return isinstance(x, ScaledArray)


def as_scaled_array(x: Any, scale: Any = None) -> ScaledArray:
    """Represents ``x`` as a ``ScaledArray`` with the same value.

    With ``scale=None`` the scale is the power of two nearest (in log2) to the RMS of
    ``x``, ``s = 2^round(log2 sqrt(mean(x^2)))``, so ``data = x / s`` has RMS in
    ``[2^-0.5, 2^0.5)`` and ``as_scaled_array(2^k * x)`` has the same data as
    ``as_scaled_array(x)`` and ``2^k`` times its scale. An all-zero ``x``, or one whose RMS
    is not finite (it holds inf/NaN), gets scale 1 and keeps its values in the data.
    With an explicit ``scale`` (scalar or per-block), ``data = x / scale``.

    A ``ScaledArray`` input is returned unchanged when ``scale`` is None.

    Args:
        x: floating array.
        scale: None, or a positive float32 scalar / per-block array.

    Returns:
        ``ScaledArray`` with ``data.dtype == x.dtype``.

    Example:
        >>> sa = as_scaled_array(jnp.full((4,), 3.0e6))
        >>> float(sa.scale), float(sa.data[0])
        (4194304.0, 0.7152557373046875)
    """
    if isinstance(x, ScaledArray):
        if scale is None:
            return x
        x = asarray(x)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"as_scaled_array expects a floating array, got dtype {x.dtype}")
    if scale is None:
        x32 = x.astype(jnp.float32)
        rms = jnp.sqrt(jnp.mean(x32 * x32)) if x.size else jnp.float32(0)
        ok = jnp.isfinite(rms) & (rms >= jnp.finfo(jnp.float32).tiny)
        s = jnp.where(ok, pow2_round(jnp.where(ok, rms, 1.0)), 1.0)
        s = jax.lax.stop_gradient(s)
    else:
        s = jnp.asarray(scale, jnp.float32)
    data = (x.astype(jnp.promote_types(x.dtype, jnp.float32)) / expand_scale(s, x.shape)).astype(
        x.dtype
    )
    return ScaledArray(data, s)


def asarray(x: Any, dtype: Any = None) -> jax.Array:
    """The value of a ``ScaledArray``, ``data * scale``, as an ordinary array.

    The product is formed in at least float32 and cast to ``dtype`` (default: the data's
    dtype), so a value outside the data dtype's range saturates/overflows only at that
    final cast. Non-scaled input is passed to ``jnp.asarray``.

    Example:
        >>> float(asarray(ScaledArray(jnp.ones(2, jnp.float16), 2.0**20), jnp.float32)[0])
        1048576.0
    """
    if not isinstance(x, ScaledArray):
        return jnp.asarray(x, dtype=dtype)
    dtype = x.dtype if dtype is None else dtype
    wide = jnp.promote_types(x.dtype, jnp.float32)
    return (x.data.astype(wide) * expand_scale(x.scale, x.shape)).astype(dtype)


def to_scalar_scale(x: ScaledArray) -> ScaledArray:
    """Re-expresses a per-block ``ScaledArray`` with one scalar scale (the largest block's).

    ``data' = data * (scale_block / max(scale))`` is formed in float32 and cast back to the
    data dtype: exact for float32/bf16 data with power-of-two scales, lossy (small blocks
    may flush) for FP8 data. Rules that do not understand block scales receive their
    operands through this function.

    Example:
        >>> sa = ScaledArray(jnp.ones((1, 4)), jnp.array([[1.0, 4.0]]))
        >>> to_scalar_scale(sa).data
        Array([[0.25, 0.25, 1.  , 1.  ]], dtype=float32)
    """
    if jnp.ndim(x.scale) == 0:
        return x
    s = jnp.max(x.scale)
    wide = jnp.promote_types(x.dtype, jnp.float32)
    data = x.data.astype(wide) * expand_scale(x.scale / s, x.shape)
    return scaled(data.astype(x.dtype), s)
