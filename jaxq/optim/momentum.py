"""Lion and SGD with momentum, with the momentum stored in 8 bits (signed dynamic map).

Same storage as Adam's first moment in :func:`jaxq.optim.scale_by_adam_8bit` (blocks of
256 along the last axis (rows), block absmax, no sign flips), same non-finite-gradient guard and
float32 fallback for small or selected parameters (see :mod:`jaxq.optim.engine`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxq.optim import codecs as cd
from jaxq.optim import maps
from jaxq.optim.common import scale_dtype_of, static_int
from jaxq.optim.engine import init_moments, step_moments

__all__ = ["QuantizedMomentumState", "scale_by_lion_8bit", "lion_8bit", "trace_8bit", "sgd_8bit"]


class QuantizedMomentumState(NamedTuple):
    """State of :func:`scale_by_lion_8bit` and :func:`trace_8bit`.

    Attributes:
        count: int32 step count.
        mu: the momentum, a pytree like the parameters with
            :class:`~jaxq.optim.codecs.QuantizedMoment` or float32 leaves.
    """

    count: jax.Array
    mu: Any


def _codecs(block_size, scale_dtype):
    bs = static_int(256 if block_size is None else block_size, "block_size", minimum=1)
    sd = scale_dtype_of(scale_dtype, jnp.bfloat16)
    m = cd.BlockCodec(maps.SIGNED8, bs, 8, sign_fix=True, scale_dtype=sd)
    return lambda shape: (m,)


def _one_moment(step_factory, codecs, keep_fp32, min_quantized_size):
    min_size = static_int(
        4096 if min_quantized_size is None else min_quantized_size,
        "min_quantized_size",
        minimum=0,
    )

    def init_fn(params):
        (mu,) = init_moments(params, codecs, 1, keep_fp32=keep_fp32, min_quantized_size=min_size)
        return QuantizedMomentumState(jnp.zeros([], jnp.int32), mu)

    def update_fn(updates, state, params=None):
        del params
        updates, (mu,) = step_moments(updates, (state.mu,), codecs, step_factory())
        return updates, QuantizedMomentumState(optax.safe_increment(state.count), mu)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_lion_8bit(
    b1=0.9, b2=0.99, *, block_size=None, min_quantized_size=None, keep_fp32=None,
    scale_dtype=None,
) -> optax.GradientTransformation:  # fmt: skip
    """Lion's sign update with an 8-bit momentum (drop-in for ``optax.scale_by_lion``).

    ``u = sign(b1 * m + (1 - b1) * g)``, then ``m <- b2 * m + (1 - b2) * g``.

    Args:
        b1: interpolation for the update direction.
        b2: decay of the momentum.
        block_size, min_quantized_size, keep_fp32, scale_dtype: as
            :func:`jaxq.optim.scale_by_adam_8bit`.

    Returns:
        An ``optax.GradientTransformation`` with :class:`QuantizedMomentumState`.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = scale_by_lion_8bit()
        >>> u, s = tx.update({"w": jnp.ones((64, 64))}, tx.init({"w": jnp.ones((64, 64))}))
        >>> float(u["w"][0, 0])
        1.0
    """

    def factory():
        beta1 = jnp.asarray(b1, jnp.float32)
        beta2 = jnp.asarray(b2, jnp.float32)

        def step(g, moments):
            (m,) = moments
            u = jnp.sign(beta1 * m + (1.0 - beta1) * g)
            return u, (beta2 * m + (1.0 - beta2) * g,)

        return step

    return _one_moment(factory, _codecs(block_size, scale_dtype), keep_fp32, min_quantized_size)


def lion_8bit(
    learning_rate, b1=0.9, b2=0.99, weight_decay=1e-3, mask=None, *, block_size=None,
    min_quantized_size=None, keep_fp32=None, scale_dtype=None,
) -> optax.GradientTransformation:  # fmt: skip
    """Lion with 8-bit momentum, with ``optax.lion``'s semantics.

    ``chain(scale_by_lion_8bit(b1, b2), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``.

    Args:
        learning_rate: float, array or schedule.
        b1: interpolation for the update direction.
        b2: decay of the momentum.
        weight_decay: decoupled weight decay.
        mask: which parameters decay (as ``optax.lion``).
        block_size, min_quantized_size, keep_fp32, scale_dtype: as
            :func:`jaxq.optim.scale_by_adam_8bit`.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = lion_8bit(1e-4)
        >>> state = tx.init({"w": jnp.zeros((128, 128))})
    """
    return optax.chain(
        scale_by_lion_8bit(
            b1, b2, block_size=block_size, min_quantized_size=min_quantized_size,
            keep_fp32=keep_fp32, scale_dtype=scale_dtype,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )  # fmt: skip


def trace_8bit(
    decay=0.9, nesterov=False, *, block_size=None, min_quantized_size=None,
    keep_fp32=None, scale_dtype=None,
) -> optax.GradientTransformation:  # fmt: skip
    """Momentum with an 8-bit trace (drop-in for ``optax.trace``).

    ``t <- g + decay * t``; the update is ``t`` or, with ``nesterov``, ``g + decay * t``.

    Args:
        decay: momentum coefficient (float or array).
        nesterov: Nesterov momentum (static bool).
        block_size, min_quantized_size, keep_fp32, scale_dtype: as
            :func:`jaxq.optim.scale_by_adam_8bit`.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = trace_8bit(0.9)
        >>> u, s = tx.update({"w": jnp.ones((64, 64))}, tx.init({"w": jnp.ones((64, 64))}))
    """
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov: expected a bool, got {nesterov!r}")

    def factory():
        d = jnp.asarray(decay, jnp.float32)

        def step(g, moments):
            (t,) = moments
            t = g + d * t
            return (g + d * t if nesterov else t), (t,)

        return step

    return _one_moment(factory, _codecs(block_size, scale_dtype), keep_fp32, min_quantized_size)


def sgd_8bit(
    learning_rate, momentum=0.9, nesterov=False, *, block_size=None,
    min_quantized_size=None, keep_fp32=None, scale_dtype=None,
) -> optax.GradientTransformation:  # fmt: skip
    """SGD with an 8-bit momentum buffer, with ``optax.sgd``'s semantics.

    ``chain(trace_8bit(momentum, nesterov), scale_by_learning_rate(learning_rate))``.

    Args:
        learning_rate: float, array or schedule.
        momentum: momentum coefficient in ``(0, 1]`` (required: without momentum there is no
            state to quantize; use ``optax.sgd``).
        nesterov: Nesterov momentum.
        block_size, min_quantized_size, keep_fp32, scale_dtype: as
            :func:`jaxq.optim.scale_by_adam_8bit`.

    Raises:
        ValueError: when ``momentum`` is None or a number outside ``(0, 1]``.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = sgd_8bit(0.1, momentum=0.9, nesterov=True)
        >>> state = tx.init({"w": jnp.zeros((128, 128))})
    """
    if momentum is None:
        raise ValueError("momentum: expected a number in (0, 1], got None")
    if not isinstance(momentum, jax.core.Tracer) and np.ndim(momentum) == 0:
        m = float(np.asarray(momentum))  # Python, NumPy or concrete JAX scalars
        if not 0 < m <= 1:
            raise ValueError(f"momentum: expected a number in (0, 1], got {momentum!r}")
    return optax.chain(
        trace_8bit(
            momentum, nesterov, block_size=block_size, min_quantized_size=min_quantized_size,
            keep_fp32=keep_fp32, scale_dtype=scale_dtype,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )  # fmt: skip
