"""Calibration: choosing the clipping range ``amax`` that a scale maps onto the format's max.

* :class:`Absmax` — ``amax = max |x|`` over the finite elements of each group.
* :class:`Percentile` — ``amax`` = the ``q``-th percentile of ``|x|`` in each group.
* :class:`MSE` — ``amax = r* · max|x|`` with ``r*`` minimising ``‖x − dequantize(quantize(x))‖²``
  over a geometric grid of clipping ratios ``r`` in ``[min_ratio, 1]``, independently per
  group.
* :class:`AmaxHistory` — functional amax history for delayed scaling (FP8 training).

Every statistic ignores non-finite elements, so one NaN or inf never inflates a scale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import formats as F

__all__ = [
    "Absmax", "Percentile", "MSE", "AmaxHistory", "Calibration", "finite_abs", "raw_amax",
    "scale_for_amax",
]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Absmax:
    """Clip at the largest finite magnitude of each group (no clipping)."""


@dataclasses.dataclass(frozen=True)
class Percentile:
    """Clip at the ``q``-th percentile (0 < q <= 100) of ``|x|`` in each group.

    Example:
        >>> import jax.numpy as jnp, jaxq
        >>> x = jnp.concatenate([jnp.linspace(-1, 1, 9999), jnp.array([1000.0])])
        >>> q = jaxq.quantize(x, "int8", calibration=jaxq.Percentile(99.9))
        >>> bool(q.scale < 1000.0 / 127)
        True
    """

    q: float

    def __post_init__(self):
        if not 0.0 < float(self.q) <= 100.0:
            raise ValueError(f"Percentile q must be in (0, 100], got {self.q}")


@dataclasses.dataclass(frozen=True)
class MSE:
    """Per-group search of the clipping ratio minimising the squared quantization error.

    For MX formats, whose scales are powers of two, the search runs over each block's
    E8M0 exponent instead: the OCP exponent, one above it and those below it down to the
    exponent of ``min_ratio · amax`` (``num_ratios`` does not apply).

    Attributes:
        num_ratios: grid size; ratios are ``geomspace(min_ratio, 1, num_ratios)``.
        min_ratio: smallest clipping ratio tried.
    """

    num_ratios: int = 64
    min_ratio: float = 0.01

    def __post_init__(self):
        if self.num_ratios < 2 or not 0.0 < self.min_ratio < 1.0:
            raise ValueError(
                f"MSE needs num_ratios >= 2 and 0 < min_ratio < 1, got {self.num_ratios}, "
                f"{self.min_ratio}"
            )


Calibration = Absmax | Percentile | MSE


def finite_abs(x: jax.Array) -> jax.Array:
    """``|x|`` with non-finite elements replaced by 0."""
    a = jnp.abs(x)
    return jnp.where(jnp.isfinite(a), a, 0.0)


def scale_for_amax(amax: jax.Array, m: float) -> jax.Array:
    """The smallest float32 ``s`` with ``fl(m · s) >= amax`` (1 where ``amax == 0``).

    This equals ``amax / m`` up to an ulp, and it is a fixed point of re-quantization: the
    largest dequantized value ``fl(m · s)`` maps back to the same ``s``. It is computed with
    multiplications only, because XLA's float division is not correctly rounded on CPU.

    Scales are never subnormal: backends flush subnormal operands to zero, so a tiny
    ``amax`` (below ``m`` times the smallest normal float32) gets the smallest normal scale
    ``2**-126``; its codes still fit, as ``|x| / s <= amax / s < m``.
    """
    amax = jax.lax.stop_gradient(amax)  # scales are not differentiated (see fake_quant)
    tiny = np.float32(np.finfo(np.float32).tiny)
    amax = jnp.where(amax > 0, jnp.maximum(amax, tiny * np.float32(m)), jnp.float32(m))[..., None]
    s = amax * jnp.float32(1.0 / m)  # within an ulp or two of amax / m
    down, up = jnp.float32(-jnp.inf), jnp.float32(jnp.inf)
    lo2 = jnp.nextafter(jnp.nextafter(s, down), down)
    up1 = jnp.nextafter(s, up)
    cands = jnp.concatenate(
        [lo2, jnp.nextafter(s, down), s, up1, jnp.nextafter(up1, up)], axis=-1
    )
    # The smallest candidate covering amax. Being a reduction, XLA materialises it once
    # instead of recomputing it inside every per-element loop that reads the scale.
    return jnp.min(jnp.where(cands * jnp.float32(m) >= amax, cands, up), axis=-1)


def raw_amax(xg: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """NaN-propagating ``max |x|`` of each group (reduced axes kept as size 1)."""
    return jnp.max(jnp.abs(xg), axis=axes, keepdims=True)


def group_amax(
    xg: jax.Array,
    axes: tuple[int, ...],
    calibration: Calibration,
    sq_error: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Clipping range of each group of ``xg`` (reduced over ``axes``, kept as size 1).

    ``sq_error(amax)`` returns the per-group squared quantization error for a candidate
    ``amax`` (needed by :class:`MSE` only).
    """
    raw = raw_amax(xg, axes)
    # One cheap reduction in the common case; the masked one only if something is not finite.
    amax = jax.lax.cond(
        jnp.all(jnp.isfinite(raw)),
        lambda: raw,
        lambda: jnp.max(finite_abs(xg), axis=axes, keepdims=True),
    )
    if isinstance(calibration, Absmax):
        return amax
    a = finite_abs(xg)
    if isinstance(calibration, Percentile):
        return jnp.percentile(a, calibration.q, axis=axes, keepdims=True)
    if isinstance(calibration, MSE):
        ratios = jnp.asarray(
            np.geomspace(calibration.min_ratio, 1.0, calibration.num_ratios), jnp.float32
        )

        def body(carry, r):
            best_err, best_amax = carry
            err = sq_error(amax * r)
            better = err < best_err
            return (jnp.where(better, err, best_err), jnp.where(better, amax * r, best_amax)), None

        init = (sq_error(amax), amax)
        (_, best), _ = jax.lax.scan(body, init, ratios[:-1])
        return best
    raise TypeError(
        f"calibration must be Absmax(), Percentile(q) or MSE(...), got {type(calibration)!r}"
    )


@dataclasses.dataclass(frozen=True)
class AmaxHistory:
    """Functional amax history for delayed scaling.

    The state is a float32 array of the last ``length`` amax values (newest first).
    ``update`` records ``max |x|`` over the **finite** elements of ``x`` only: NaN and ±inf
    are ignored instead of stored, and a tensor with no finite element leaves the state
    unchanged, so one bad step never poisons later scales.

    ``amax(state)`` reduces the history (``"max"``, ``"mean"`` or ``"most_recent"``);
    ``scale(state, fmt)`` is ``amax / fmt.max · 2^margin`` (1 when the history is all zero),
    computed exactly as :func:`jaxq.quantize` computes a scale from an amax.

    Example:
        >>> import jax.numpy as jnp, jaxq
        >>> hist = jaxq.AmaxHistory(length=4)
        >>> s = hist.update(hist.init(), jnp.array([1.0, -3.0, jnp.nan]))
        >>> float(hist.amax(s)), round(float(hist.scale(s, "e4m3")) * 448, 5)
        (3.0, 3.0)
    """

    length: int = 16
    reduction: Literal["max", "mean", "most_recent"] = "max"

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"AmaxHistory length must be >= 1, got {self.length}")
        if self.reduction not in ("max", "mean", "most_recent"):
            raise ValueError(
                f"reduction must be 'max', 'mean' or 'most_recent', got {self.reduction!r}"
            )

    def init(self) -> jax.Array:
        return jnp.zeros((self.length,), jnp.float32)

    def update(self, state: jax.Array, x: jax.Array) -> jax.Array:
        if state.shape != (self.length,):
            raise ValueError(f"state has shape {state.shape}, expected ({self.length},)")
        finite = jnp.isfinite(x)
        new = jnp.max(finite_abs(x).astype(jnp.float32), initial=0.0)
        rolled = jnp.roll(state, 1).at[0].set(new)
        return jnp.where(jnp.any(finite), rolled, state)

    def amax(self, state: jax.Array) -> jax.Array:
        if self.reduction == "max":
            return jnp.max(state)
        if self.reduction == "mean":
            return jnp.mean(state)
        return state[0]

    def scale(self, state: jax.Array, fmt: F.Format | str, *, margin: int = 0) -> jax.Array:
        fmt = F.get(fmt)
        return scale_for_amax(self.amax(state), fmt.max) * jnp.float32(2.0**margin)
