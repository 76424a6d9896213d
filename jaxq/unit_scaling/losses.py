"""Unit-scaled losses: softmax cross-entropy and mean squared error.

A loss's output is a scalar, so unit scaling concerns only its input gradient: it is
scaled to unit variance per element *independently of the number of elements averaged*
(the ``1/N`` of a mean is applied in the forward pass only). Reported loss values equal
the ordinary ones.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from jaxq.unit_scaling import _checks
from jaxq.unit_scaling.scale import scale_bwd, scale_fwd

__all__ = ["cross_entropy", "mse_loss"]

Reduction = Literal["mean", "sum"]


def _reduce(loss_sum, n, reduction):
    if reduction == "mean":
        return scale_fwd(loss_sum, 1.0 / max(1, n))
    if reduction == "sum":
        return loss_sum
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    mult: float = 1.0,
    reduction: Reduction = "mean",
) -> jax.Array:
    """Unit-scaled softmax cross-entropy ``-log softmax(mult * logits)[label]``.

    For near-uniform predictions the per-token logit gradient ``p - onehot`` has
    standard deviation ``sqrt(V - 1) / V``; it is scaled by ``V / sqrt(V - 1)``. ``mult``
    (u-muP's ``alpha_loss_softmax``) acts in the forward pass only.

    Args:
        logits: ``(..., V)``.
        labels: integer ``(...)`` in ``[0, V)``; an out-of-range label gives a NaN loss.
        mult: softmax temperature multiplier (> 0).
        reduction: ``"mean"`` (over all tokens) or ``"sum"``.

    Returns:
        A float32 scalar.

    Example:
        >>> import jax.numpy as jnp
        >>> round(float(cross_entropy(jnp.zeros((4, 256)), jnp.zeros(4, jnp.int32))), 3)
        5.545
    """
    logits = _checks.floating(logits, "logits")
    _checks.min_ndim(logits, 1, "logits", "(..., vocab)")
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels has shape {labels.shape}, expected logits.shape[:-1] = {logits.shape[:-1]}"
        )
    mult = _checks.positive(mult, "mult")
    v = logits.shape[-1]
    x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    x = scale_bwd(x, v / max(1, v - 1) ** 0.5)
    x = scale_fwd(x, mult)
    picked = jnp.take_along_axis(x, labels[..., None], axis=-1, mode="fill", fill_value=jnp.nan)
    per_token = jax.nn.logsumexp(x, axis=-1) - picked[..., 0]
    return _reduce(per_token.sum(), labels.size, reduction)


def mse_loss(pred: jax.Array, target: jax.Array, *, reduction: Reduction = "mean") -> jax.Array:
    """Unit-scaled squared error ``sum or mean of (pred - target)^2``.

    For independent unit ``pred`` and ``target`` the gradients ``+-2 (pred - target)``
    have standard deviation ``sqrt(8)``; both are scaled by ``8^-1/2``.

    Example:
        >>> import jax.numpy as jnp
        >>> float(mse_loss(jnp.ones(4), jnp.zeros(4)))
        1.0
    """
    pred = _checks.floating(pred, "pred")
    target = _checks.floating(target, "target")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred has shape {pred.shape} but target has shape {target.shape}; expected equal"
        )
    s = 8.0**-0.5
    diff = scale_bwd(pred, s) - scale_bwd(target, s)
    return _reduce(jnp.square(diff).sum(), pred.size, reduction)
