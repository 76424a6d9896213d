"""The fast Walsh–Hadamard transform: orthogonal rotations that spread outliers.

For ``n = 2^p`` the normalized Hadamard matrix is ``H_n = H_2^{⊗p} / sqrt(n)`` with
``H_2 = [[1, 1], [1, -1]]``; it is symmetric and orthogonal, ``H_n H_nᵀ = I``, so it is
its own inverse. :func:`hadamard` applies it along one axis in ``O(n log n)`` butterflies.

* ``key``: randomized by a sign vector, ``x ↦ H (d ⊙ x)`` with ``d_i = ±1`` drawn from the
  key (the random Hadamard transform of QuaRot and NVIDIA's NVFP4 recipe); the inverse is
  ``y ↦ d ⊙ (H y)`` (``inverse=True``).
* ``block_size``: block-diagonal ``I ⊗ H_b`` along the axis, for lengths that are not a
  power of two (``b`` must be a power of two dividing the length).

Because the transform is orthogonal, applying the same one to both operands of a product
along their contraction axis leaves the exact product unchanged:
``(x Qᵀ)(w Qᵀ)ᵀ = x Qᵀ Q wᵀ = x wᵀ`` for ``Q = H D``.
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp

__all__ = ["hadamard"]


def _fwht(y: jax.Array) -> jax.Array:
    """Unnormalized transform along the last axis (length a power of two)."""
    n = y.shape[-1]
    lead = y.shape[:-1]
    h = 1
    while h < n:
        z = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = z[..., 0, :], z[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, n)
        h *= 2
    return y


def hadamard(
    x: jax.Array,
    axis: int = -1,
    *,
    key: jax.Array | None = None,
    block_size: int | None = None,
    inverse: bool = False,
) -> jax.Array:
    """Normalized (block) Walsh–Hadamard transform of ``x`` along ``axis``.

    Args:
        x: floating-point array; computed in float32 (float64 stays float64), returned in
            ``x``'s dtype.
        axis: the transformed axis.
        key: PRNG key of the random sign vector (one sign per index of ``axis``).
        block_size: power-of-two block of a block-diagonal transform; default: the whole
            axis, whose length must then be a power of two.
        inverse: apply the inverse (differs from the forward only with a ``key``).

    Returns:
        The transformed array, same shape and dtype.

    Raises:
        TypeError: ``x`` is not floating point.
        ValueError: the block size is not a power of two or does not divide the axis.

    Example:
        >>> import jax, jax.numpy as jnp, jaxq
        >>> x = jnp.array([1.0, 0.0, 0.0, 0.0])
        >>> jaxq.hadamard(x).tolist()
        [0.5, 0.5, 0.5, 0.5]
        >>> k = jax.random.key(0)
        >>> y = jaxq.hadamard(x, key=k)
        >>> jnp.allclose(jaxq.hadamard(y, key=k, inverse=True), x).item()
        True
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"hadamard: x must be floating point, got dtype {x.dtype}")
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"hadamard: axis must be an int, got {axis!r}") from None
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"hadamard: axis {axis} out of range for x of shape {x.shape}")
    axis %= x.ndim
    n = x.shape[axis]
    b = n if block_size is None else block_size
    if not isinstance(b, int) or b < 1 or b & (b - 1):
        what = f"block_size={block_size}" if block_size is not None else f"axis length {n}"
        raise ValueError(
            f"hadamard: {what} must be a power of two (x.shape={x.shape}, axis={axis}); "
            "pass a power-of-two block_size that divides the axis"
        )
    if n % b:
        raise ValueError(
            f"hadamard: block_size={b} does not divide axis {axis} of size {n} (x.shape={x.shape})"
        )
    if key is not None and not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return _hadamard(x, key, axis=axis, b=b, inverse=inverse)


@functools.partial(jax.jit, static_argnames=("axis", "b", "inverse"))
def _hadamard(x, key, *, axis, b, inverse):
    n = x.shape[axis]
    dtype = x.dtype
    y = jnp.moveaxis(x.astype(jnp.promote_types(dtype, jnp.float32)), axis, -1)
    signs = None
    if key is not None:
        signs = jnp.where(jax.random.bernoulli(key, 0.5, (n,)), 1.0, -1.0).astype(y.dtype)
    if signs is not None and not inverse:
        y = y * signs
    lead = y.shape[:-1]
    y = _fwht(y.reshape(*lead, n // b, b)).reshape(*lead, n) * (1.0 / math.sqrt(b))
    if signs is not None and inverse:
        y = y * signs
    return jnp.moveaxis(y, -1, axis).astype(dtype)
