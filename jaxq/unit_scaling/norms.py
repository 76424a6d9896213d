"""Unit-scaled normalisation and embedding lookup.

Normalisations already give unit-variance outputs and (for unit-variance inputs)
unit-variance input gradients; only the gradients of their affine parameters, summed over
``batch`` rows, need the factor ``batch^-1/2``. An embedding table row receives the sum of
``batch / vocab`` token gradients on average, hence the factor ``sqrt(vocab / batch)``.
No op here has differing forward and input-gradient factors, so none takes a constraint.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxq.unit_scaling import _checks
from jaxq.unit_scaling.scale import scale_bwd

__all__ = ["layer_norm", "rms_norm", "embedding"]


def _check_affine(x, p, name):
    if p is None:
        return None
    p = _checks.floating(p, name)
    if p.shape != x.shape[-1:]:
        raise ValueError(f"{name} must have shape {x.shape[-1:]}, got shape {p.shape}")
    return scale_bwd(p, (x.size // x.shape[-1]) ** -0.5 if x.size else 1.0)


def layer_norm(
    x: jax.Array,
    weight: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    eps: float = 1e-5,
) -> jax.Array:
    """Unit-scaled layer norm over the last axis: ``(x - mean) / sqrt(var + eps) * w + b``.

    Statistics are computed in float32 at least. ``weight``/``bias`` gradients are scaled
    by ``batch^-1/2`` (``batch = x.size / x.shape[-1]``).

    Example:
        >>> import jax
        >>> x = 3.0 * jax.random.normal(jax.random.key(0), (16, 256))
        >>> round(float(layer_norm(x).std()), 2)
        1.0
    """
    x = _checks.floating(x, "x")
    _checks.min_ndim(x, 1, "x", "(..., features)")
    eps = _checks.positive(eps, "eps", allow_zero=True)
    w, b = _check_affine(x, weight, "weight"), _check_affine(x, bias, "bias")
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    if w is not None:
        y = y * w.astype(y.dtype)
    if b is not None:
        y = y + b.astype(y.dtype)
    return y


def rms_norm(x: jax.Array, weight: jax.Array | None = None, *, eps: float = 1e-5) -> jax.Array:
    """Unit-scaled RMS norm over the last axis: ``x / sqrt(mean(x^2) + eps) * w``.

    Example:
        >>> import jax
        >>> x = 3.0 * jax.random.normal(jax.random.key(0), (16, 256))
        >>> round(float(rms_norm(x).std()), 2)
        1.0
    """
    x = _checks.floating(x, "x")
    _checks.min_ndim(x, 1, "x", "(..., features)")
    eps = _checks.positive(eps, "eps", allow_zero=True)
    w = _check_affine(x, weight, "weight")
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    y = (xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + eps)).astype(x.dtype)
    return y if w is None else y * w.astype(y.dtype)


def embedding(ids: jax.Array, table: jax.Array) -> jax.Array:
    """Unit-scaled lookup ``table[ids]``; the table gradient is scaled by ``sqrt(vocab/batch)``.

    With a unit-variance table the output is unit-variance. Out-of-range ids give rows
    of NaN (JAX's ``fill`` gather mode), so a bad id shows up as a NaN loss instead of a
    silently clamped lookup.

    Args:
        ids: integer array of any shape (``batch = ids.size``).
        table: ``(vocab, features)``.

    Returns:
        ``ids.shape + (features,)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> table = jax.random.normal(jax.random.key(0), (256, 64))
        >>> embedding(jnp.zeros((2, 8), jnp.int32), table).shape
        (2, 8, 64)
    """
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"ids must be an integer array, got dtype {ids.dtype}")
    table = _checks.floating(table, "table")
    if table.ndim != 2:
        raise ValueError(f"table must have shape (vocab, features), got shape {table.shape}")
    table = scale_bwd(table, (table.shape[0] / max(1, ids.size)) ** 0.5)
    return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)
