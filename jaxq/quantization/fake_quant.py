"""Fake quantization with straight-through gradients, and learned step sizes (LSQ).

``fake_quant(x) = dequantize(quantize(x))`` in the forward pass. Its gradient is the
straight-through estimator: ``∂L/∂x = ∂L/∂y`` (``ste="identity"``), or
``∂L/∂x = ∂L/∂y · 1[lo_g <= x <= hi_g]`` (``ste="clipped"``), where ``[lo_g, hi_g]`` is the
range that the group's scale can represent (``±M·s`` for symmetric formats). Clipping only
happens when calibration clips (``Percentile``, ``MSE`` or a fixed ``amax``).

LSQ (Esser et al., 2020, "Learned Step Size Quantization"): with ``v = x / s``,

    y = s · round(clip(v, Q_n, Q_p))
    ∂y/∂x = 1[Q_n <= v <= Q_p]
    ∂y/∂s = round(v) − v  inside,  Q_n below,  Q_p above

and the step gradient is multiplied by ``g = 1 / sqrt(N · Q_p)``, ``N`` being the number of
elements sharing one step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxq import formats as F
from jaxq.quantization.calibration import Absmax
from jaxq.quantization.cast import _check_float_input, cast
from jaxq.quantization.qdq import dequantize, pow2, quantize

__all__ = ["fake_quant", "lsq_quant", "representable_range"]


def representable_range(q) -> tuple[jax.Array, jax.Array]:
    """``(lo, hi)`` bounds, of the logical shape, that each element's group can represent."""
    fmt, layout, shape = q.fmt, q.layout, q.shape
    gs = layout.group_scale_shape(shape)
    if isinstance(fmt, F.BlockFormat) and fmt.is_mx:
        e = jax.lax.bitcast_convert_type(q.scale, jnp.uint8).astype(jnp.int32).reshape(gs) - 127
        hi = fmt.element.max * pow2(e // 2) * pow2(e - e // 2)
        lo = -hi
    elif isinstance(fmt, F.BlockFormat):
        hi = fmt.element.max * q.scale.astype(jnp.float32).reshape(gs) * q.tensor_scale
        lo = -hi
    elif q.zero_point is not None:
        zp = q.zero_point.astype(jnp.float32).reshape(gs)
        s = q.scale.reshape(gs)
        lo, hi = -zp * s, (fmt.qmax - zp) * s
    else:
        values = fmt.values()
        s = q.scale.reshape(gs)
        lo, hi = float(values.min()) * s, float(values.max()) * s
    g = layout.grouped_shape(shape)
    return (jnp.broadcast_to(lo, g).reshape(shape), jnp.broadcast_to(hi, g).reshape(shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fake_quant(x, key, amax, options, ste):
    return dequantize(quantize(x, key=key, amax=amax, **dict(options)), x.dtype)


def _fake_quant_fwd(x, key, amax, options, ste):
    q = quantize(x, key=key, amax=amax, **dict(options))
    y = dequantize(q, x.dtype)
    mask = None
    if ste == "clipped":
        lo, hi = representable_range(q)
        mask = (x >= lo) & (x <= hi)
    return y, (mask, None if amax is None else jnp.zeros_like(amax))


def _fake_quant_bwd(options, ste, res, g):
    mask, amax_ct = res
    if ste == "clipped":
        g = jnp.where(mask, g, jnp.zeros_like(g))
    return g, None, amax_ct


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(
    x: jax.Array,
    fmt: F.Format | str,
    *,
    ste: str = "identity",
    axis: int | tuple[int, ...] | None = None,
    block_size: int | None = None,
    calibration=Absmax(),
    rounding: str = "nearest",
    key: jax.Array | None = None,
    amax: jax.Array | None = None,
) -> jax.Array:
    """Quantize-dequantize in the forward pass, straight-through gradient in the backward.

    Takes the granularity, calibration, rounding and ``amax`` options of
    :func:`jaxq.quantize`; the forward value is exactly ``dequantize(quantize(x, ...))``.
    The gradient with respect to a given ``amax`` is zero (use :func:`lsq_quant` to learn a
    step size).

    Args:
        x: floating-point array.
        fmt: any format.
        ste: ``"identity"`` (gradient passes unchanged) or ``"clipped"`` (zero gradient where
            ``x`` lies outside its group's representable range).

    Example:
        >>> import jax, jax.numpy as jnp, jaxq
        >>> x = jnp.array([0.1, 0.5, 10.0])
        >>> g = jax.grad(lambda x: jaxq.fake_quant(
        ...     x, "int8", ste="clipped", amax=jnp.float32(1.0)).sum())(x)
        >>> g.tolist()
        [1.0, 1.0, 0.0]
    """
    x = _check_float_input(x)
    if ste not in ("identity", "clipped"):
        raise ValueError(f"ste must be 'identity' or 'clipped', got {ste!r}")
    options = (
        ("fmt", F.get(fmt)),
        ("axis", tuple(axis) if isinstance(axis, list) else axis),
        ("block_size", block_size),
        ("calibration", calibration),
        ("rounding", rounding),
    )
    if amax is not None:
        amax = jnp.asarray(amax, jnp.float32)
    return _fake_quant(x, key, amax, options, ste)


def _lsq_bounds(fmt) -> tuple[float, float]:
    if isinstance(fmt, F.IntFormat):
        return float(fmt.qmin), float(fmt.qmax)
    if isinstance(fmt, F.BlockFormat):
        raise ValueError(f"lsq_quant needs an element format, got block format {fmt.name}")
    values = fmt.values()
    return float(values.min()), float(values.max())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lsq(x, step, fmt):
    lo, hi = _lsq_bounds(fmt)
    v = x / step
    return cast(jnp.clip(v, lo, hi), fmt) * step


def _lsq_fwd(x, step, fmt):
    # Saves x and step only (x is usually a parameter, alive anyway); v and q are
    # recomputed in the backward pass, bit-identically.
    return _lsq(x, step, fmt), (x, step)


def _lsq_bwd(fmt, res, g):
    x, step = res
    lo, hi = _lsq_bounds(fmt)
    v = x / step
    q = cast(jnp.clip(v, lo, hi), fmt)
    inside = (v >= lo) & (v <= hi)
    dx = jnp.where(inside, g, 0.0)
    dstep_elem = jnp.where(inside, q - v, jnp.where(v < lo, lo, hi))
    n = v.size // max(step.size, 1)
    grad_scale = 1.0 / jnp.sqrt(jnp.float32(n) * hi)
    dstep = g * dstep_elem * grad_scale
    # Sum over the axes along which step was broadcast.
    extra = dstep.ndim - step.ndim
    dstep = jnp.sum(dstep, axis=tuple(range(extra)))
    axes = tuple(i for i, d in enumerate(step.shape) if d == 1 and dstep.shape[i] != 1)
    dstep = jnp.sum(dstep, axis=axes, keepdims=True).reshape(step.shape)
    return dx.astype(v.dtype), dstep.astype(step.dtype)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq_quant(x: jax.Array, step: jax.Array, fmt: F.Format | str) -> jax.Array:
    """Learned step size quantization: ``step · round_fmt(clip(x / step, Q_n, Q_p))``.

    ``Q_n, Q_p`` are the format's smallest and largest values (``-7, 7`` for INT4; ``±max``
    for float formats). ``step`` is a positive scalar or broadcastable to ``x`` (per-channel
    steps); its gradient follows LSQ with gradient scale ``1 / sqrt(N · Q_p)``.

    Raises:
        TypeError: non-float ``x`` or ``step``.
        ValueError: ``step`` not broadcastable to ``x``, or a block format.

    Example:
        >>> import jax, jax.numpy as jnp, jaxq
        >>> x = jnp.array([0.26, -1.0, 5.0])
        >>> jaxq.lsq_quant(x, jnp.float32(0.5), "int4").tolist()
        [0.5, -1.0, 3.5]
        >>> float(jax.grad(lambda s: jaxq.lsq_quant(x, s, "int4").sum())(0.5)) > 0
        True
    """
    x = _check_float_input(x)
    step = _check_float_input(step, "step")
    fmt = F.get(fmt)
    _lsq_bounds(fmt)
    try:
        shape = jnp.broadcast_shapes(x.shape, step.shape)
    except ValueError:
        shape = None
    if shape != tuple(x.shape):
        raise ValueError(f"step of shape {step.shape} does not broadcast to x of shape {x.shape}")
    return _lsq(x, step.astype(x.dtype), fmt)
