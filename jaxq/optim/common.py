"""Shared pieces of the quantized-state optimizers: leaf selection, gradient guard, bytes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["state_nbytes", "is_stable_embedding", "STABLE_EMBEDDING_NAME"]

#: Parameter name of :class:`jaxq.optim.StableEmbed`'s table; paths containing it keep
#: 32-bit optimizer state by default.
STABLE_EMBEDDING_NAME = "stable_embedding"

# |g| is clipped here before use: g**2 <= 2**126 < float32 max, so no moment overflows.
GRAD_LIMIT = float(2.0**63)


def state_nbytes(state: Any) -> int:
    """Real bytes of every array leaf of a pytree (``size * itemsize``), e.g. optimizer state.

    Works on concrete arrays and on ``jax.ShapeDtypeStruct`` leaves (as returned by
    ``jax.eval_shape(opt.init, params)``). Typed PRNG keys count their key data
    (8 bytes for a threefry key). Non-array leaves count 0.

    Args:
        state: any pytree.

    Returns:
        Total bytes as a Python int.

    Example:
        >>> import jax.numpy as jnp
        >>> state_nbytes({"a": jnp.zeros((4,), jnp.float32), "b": jnp.zeros((3,), jnp.uint8)})
        19
    """
    total = 0
    for leaf in jax.tree.leaves(state):
        shape = getattr(leaf, "shape", None)
        dtype = getattr(leaf, "dtype", None)
        if shape is None or dtype is None:
            continue
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
            shape, dtype = data.shape, data.dtype
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return total


def path_str(path) -> str:
    """``'a/b/0/value'`` for a ``jax.tree_util`` key path."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def is_stable_embedding(path: str, leaf: Any) -> bool:
    """Default ``keep_fp32`` predicate: the tables of :class:`jaxq.optim.StableEmbed`.

    True when a component of ``path`` (``"/"``-separated) is ``"stable_embedding"``.

    Example:
        >>> is_stable_embedding("embed/stable_embedding/value", None)
        True
    """
    del leaf
    return STABLE_EMBEDDING_NAME in path.split("/")


def static_int(value, name: str, *, minimum: int) -> int:
    """A Python int from ``value`` (also from a concrete 0-d array), else a clear error."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name}: expected a static int, got a traced value; with "
            f"optax.inject_hyperparams pass static_args=('{name}',)"
        )
    arr = np.asarray(value)
    if isinstance(value, bool) or arr.ndim or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    out = int(arr)
    if out < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {out}")
    return out


def quantize_mask(
    params, keep_fp32: Callable[[str, Any], bool] | Any | None, min_quantized_size: int
):
    """Pytree of bools over ``params``: True where the state is quantized.

    A leaf keeps float32 state when it is a scalar, is empty, has fewer than
    ``min_quantized_size`` elements, is a :class:`~jaxq.optim.StableEmbed` table
    (:func:`is_stable_embedding`), or ``keep_fp32`` selects it. ``keep_fp32`` is a
    predicate ``(path: str, leaf) -> bool`` on the ``"/"``-joined key path, a pytree of
    bools with ``params``' structure (True = keep 32-bit), or None (StableEmbed tables
    only).
    """
    if keep_fp32 is None:
        keep_fp32 = lambda path, x: False  # noqa: E731
    if callable(keep_fp32):
        keep = jax.tree_util.tree_map_with_path(
            lambda p, x: bool(keep_fp32(path_str(p), x)), params
        )
    else:
        try:
            keep = jax.tree.map(lambda x, k: bool(k), params, keep_fp32)
        except ValueError as e:
            raise ValueError(
                "keep_fp32: expected a predicate (path, leaf) -> bool or a pytree of bools "
                f"with the structure of params; {e}"
            ) from e

    stable = jax.tree_util.tree_map_with_path(
        lambda p, x: bool(is_stable_embedding(path_str(p), x)), params
    )
    keep = jax.tree.map(lambda k, e: k or e, keep, stable)

    def decide(x, k):
        shape = np.shape(x)
        size = int(np.prod(shape, dtype=np.int64))
        return (not k) and len(shape) > 0 and size >= max(min_quantized_size, 1)

    return jax.tree.map(decide, params, keep)


def scale_dtype_of(value, default) -> jnp.dtype:
    """The block-scale dtype: float32 or bfloat16 (default when None), else ValueError."""
    try:
        dt = jnp.dtype(default if value is None else value)
    except TypeError as e:
        raise TypeError(f"scale_dtype: expected float32 or bfloat16, got {value!r}") from e
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"scale_dtype: expected float32 or bfloat16, got {dt}")
    return dt


def sanitize(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 gradient with non-finite elements zeroed and ``|g| <= 2**63``, and the mask.

    Returns ``(g32, finite)``: ``finite`` marks the elements that were finite.
    """
    g32 = g.astype(jnp.float32)
    finite = jnp.isfinite(g32)
    return jnp.where(finite, jnp.clip(g32, -GRAD_LIMIT, GRAD_LIMIT), 0.0), finite
