"""Scalify rules for elementwise primitives.

Notation: an operand is ``x = d * s`` (data ``d``, scale ``s``); ``r`` rounds to a power
of two (:func:`jaxq.scaled.scales.pow2_round`). Plain (unscaled) operands are promoted:

* in ``add``/``sub``: a plain *scalar* ``c`` contributes its magnitude ``r(|c|)`` to the
  output scale (zero contributes nothing); a plain *array* contributes ``r(max|c|)``
  likewise (a zero fill contributes nothing, so it does not move the scale);
* in ``mul``/``div``: a plain scalar ``c = m * 2^k`` moves ``2^k`` into the scale and ``m``
  into the data, with ``|m|`` in [0.5, 1) for a factor and [1, 2) for a divisor so that the
  data never grows (no overflow at the top of the range); a plain floating array moves
  ``r(max|c|)`` into the scale and multiplies the data by ``c / r(max|c|)``. This is where
  the loss's cotangent enters the scaled world: ``value_and_grad`` seeds a plain ``1.0``
  that the mean's transpose turns into a plain ``-1/N`` array, and its ``1/N`` belongs in
  the scale, not in float16 or FP8 data;
* in selection-like ops (``max``, ``min``, ``select_n``, ``clamp``, comparisons) every
  operand is expressed in the common scale ``max(s_i)`` of the scaled operands.

Rules:

====================  =====================================  =========================
primitive             output data                            output scale
====================  =====================================  =========================
add, sub, add_any     da*sa/s +- db*sb/s                     r(sqrt(sa^2 + sb^2))
mul / div             da*db  /  da/db                        sa*sb  /  sa/sb
neg, abs              -d, abs(d)                             s
sign                  sign(d)                                1
square, integer_pow   d^n                                    s^n
sqrt / rsqrt          sqrt(d*res) / rsqrt(d*res)             t / 1/t, s = t^2 * res
pow (plain scalar y)  d^y * s^y / r(s^y)                     r(s^y)
log                   log(d) + log(s)                        1
exp, tanh, logistic,  f(d*s)                                 1
erf, ... (non-linear)
max, min, clamp,      op of operands in the common scale     max(s_i)
select_n
comparisons           plain boolean from the common scale    (unscaled)
convert_element_type  d.astype(new_dtype) (float targets)    s
====================  =====================================  =========================

All arithmetic on data is done in the data's dtype, widened to float32 when the data is
narrower, and cast back; rescaling by a ratio of power-of-two scales is exact.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import primitives as P

from jaxq.scaled.array import ScaledArray, expand_scale, is_scaled, scaled
from jaxq.scaled.rules import _register_builtin
from jaxq.scaled.scales import (
    add_scale,
    magnitude,
    narrow_range,
    on_host,
    poison_product,
    pow2_round,
    pow2_split,
    renormalize,
    sqrt_split,
)

__all__ = ["rescale", "common_scale", "check_blocks", "value_of", "NONLINEAR"]


def _wide(dtype: Any) -> Any:
    """float32 for narrow floats, the dtype itself otherwise."""
    dtype = np.dtype(dtype)
    return dtype if dtype.itemsize >= 4 else np.dtype(np.float32)


def _dtype_of(x: Any) -> Any:
    return x.dtype if is_scaled(x) else jnp.result_type(x)


def check_blocks(name: str, *xs: Any) -> None:
    """Raises ValueError when scaled operands carry incompatible per-block scales.

    Two scales are compatible when they have the same shape, or one of them has a single
    element (a scalar scale, or a block covering the whole tensor).
    """
    shapes = [(x.shape, tuple(jnp.shape(x.scale))) for x in xs if is_scaled(x)]
    blocked = [(d, s) for d, s in shapes if int(np.prod(s)) > 1]
    if any(s != blocked[0][1] for _, s in blocked[1:]):
        desc = ", ".join(f"data {d} with scale {s}" for d, s in blocked)
        raise ValueError(
            f"scalify rule for {name!r}: ScaledArray operands have mismatched block shapes "
            f"({desc}); re-express them with a common block layout first"
        )


def _to(x: jax.Array, dtype: Any) -> jax.Array:
    return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def rescale(x: Any, s: jax.Array, dtype: Any = None) -> jax.Array:
    """Data of ``x`` expressed in scale ``s``: ``d * sx / s`` (``x / s`` for plain ``x``)."""
    if is_scaled(x):
        dtype = np.dtype(dtype or x.dtype)
        if s is x.scale:
            return _to(x.data, dtype)
        d, ratio = x.data, x.scale / s
    else:
        d = jnp.asarray(x)
        dtype = np.dtype(dtype or d.dtype)
        ratio = 1.0 / s
    w = _wide(dtype)
    if on_host(ratio) and np.all(np.asarray(ratio) == 1):
        return _to(d, dtype)  # scales that are equal constants
    ratio = jnp.asarray(ratio)
    if ratio.ndim and ratio.size == 1:  # a single block is a scalar scale
        ratio = jnp.reshape(ratio, ())
    ratio = ratio if ratio.ndim == 0 else expand_scale(ratio, np.shape(d))
    return _to(_to(d, w) * _to(ratio, w), dtype)


def value_of(x: Any) -> jax.Array:
    """The value ``d * s`` of a scaled operand in its data dtype (plain operands as is)."""
    if not is_scaled(x):
        return x
    w = _wide(x.dtype)
    return (x.data.astype(w) * expand_scale(x.scale, x.shape).astype(w)).astype(x.dtype)


def common_scale(*xs: Any) -> jax.Array:
    """``max`` of the scales of the scaled operands (elementwise for per-block scales)."""
    scales = [x.scale for x in xs if is_scaled(x)]
    out = scales[0]
    for s in scales[1:]:
        out = np.maximum(out, s) if on_host(out) and on_host(s) else jnp.maximum(out, s)
    return out


def _is_scalar(x: Any) -> bool:
    return int(np.size(x)) == 1 and np.ndim(x) == 0


# -- add / sub -------------------------------------------------------------------------
def _plain_magnitude(c: Any) -> jax.Array:
    """``r(|c|)`` for a finite nonzero plain scalar, else 0 (it adds no magnitude)."""
    if on_host(c):  # a literal
        v = np.abs(np.asarray(c, np.float32))
        ok = np.isfinite(v) & (v >= np.finfo(np.float32).tiny)
        return pow2_round(v) if ok else np.float32(0)
    c = lax.abs(_to(jnp.asarray(c), np.dtype(np.float32)))
    ok = lax.is_finite(c) & (c >= np.float32(np.finfo(np.float32).tiny))
    return lax.select(ok, pow2_round(c), lax.full_like(c, 0))


def _add_like(prim: Any):
    def rule(a, b, **params):
        check_blocks(prim.name, a, b)
        if is_scaled(a) and is_scaled(b):
            s = add_scale(a.scale, b.scale)
        else:
            x, c = (a, b) if is_scaled(a) else (b, a)
            s = add_scale(x.scale, _plain_magnitude(c) if _is_scalar(c) else _array_magnitude(c))
        dtype = _dtype_of(a) if is_scaled(a) else _dtype_of(b)
        return scaled(prim.bind(rescale(a, s, dtype), rescale(b, s, dtype), **params), s)

    return rule


def _array_magnitude(c: Any) -> jax.Array:
    """``r(max|c|)`` of a plain array, 0 when that is zero or not finite."""
    c = jnp.asarray(c)
    if not jnp.issubdtype(c.dtype, jnp.floating) or c.size == 0:
        return np.float32(0)
    m = jnp.max(lax.abs(_to(c, np.dtype(np.float32))))
    ok = lax.is_finite(m) & (m >= np.float32(np.finfo(np.float32).tiny))
    return lax.select(ok, pow2_round(lax.select(ok, m, 1.0)), np.float32(0))


# -- mul / div -------------------------------------------------------------------------
def _as_factor(c: Any, dtype: Any, grow: bool = False) -> tuple[jax.Array, jax.Array]:
    """A plain operand of mul/div as (data factor, scale factor).

    A scalar ``c = m * 2^k`` gives ``(m, 2^k)``; an array gives ``(c / r, r)`` with
    ``r = r(max|c|)``, so a plain array such as the ``-1/N`` cotangent of a mean enters
    the scale instead of shrinking the data.
    """
    if _is_scalar(c):
        m, k = pow2_split(c, grow=grow)
        return m.astype(dtype), k
    c = jnp.asarray(c)
    if not jnp.issubdtype(c.dtype, jnp.floating):
        return c.astype(dtype), np.float32(1.0)
    r = magnitude(c)
    w = _wide(c.dtype)
    return (_to(c, w) * _to(1.0 / r, w)).astype(dtype), r


def _mul(a, b, **params):
    check_blocks("mul", a, b)
    if is_scaled(a) and is_scaled(b):
        return scaled(P.mul_p.bind(a.data, b.data, **params), poison_product(a.scale * b.scale))
    x, c = (a, b) if is_scaled(a) else (b, a)
    m, k = _as_factor(c, x.dtype)
    d = P.mul_p.bind(x.data, m, **params) if is_scaled(a) else P.mul_p.bind(m, x.data, **params)
    return scaled(d, poison_product(x.scale * k))


def _div(a, b, **params):
    check_blocks("div", a, b)
    if is_scaled(a) and is_scaled(b):
        return scaled(P.div_p.bind(a.data, b.data, **params), poison_product(a.scale / b.scale))
    if is_scaled(a):
        m, k = _as_factor(b, a.dtype, grow=True)
        return scaled(P.div_p.bind(a.data, m, **params), poison_product(a.scale / k))
    m, k = _as_factor(a, b.dtype)
    return scaled(P.div_p.bind(m, b.data, **params), poison_product(k / b.scale))


# -- unary -----------------------------------------------------------------------------
def _data_only(prim: Any):
    def rule(x, *rest, **params):
        return scaled(prim.bind(x.data, *rest, **params), x.scale)

    return rule


def _sign(x, **params):
    return scaled(P.sign_p.bind(x.data, **params), np.float32(1.0))


def _stop_gradient(x, **params):
    return scaled(lax.stop_gradient(x.data), lax.stop_gradient(x.scale))


def _square(x, **params):
    return scaled(P.square_p.bind(x.data, **params), poison_product(x.scale * x.scale))


def _integer_pow(x, *, y, **params):
    s = x.scale
    if on_host(s):
        with np.errstate(over="ignore", divide="ignore"):
            s = np.asarray(s, np.float32) ** np.float32(y)
    else:
        s = lax.integer_pow(s, y)
    s = poison_product(s)
    return scaled(P.integer_pow_p.bind(x.data, y=y, **params), s)


def _sqrt_like(prim: Any, invert: bool):
    def rule(x, **params):
        t, res = sqrt_split(x.scale)
        d = rescale(ScaledArray.tree_unflatten(None, (x.data, res)), np.float32(1.0))
        return scaled(prim.bind(d, **params), 1.0 / t if invert else t)

    return rule


def _pow(x, y, **params):
    if is_scaled(x) and not is_scaled(y) and _is_scalar(y):
        ylog = jnp.asarray(y, jnp.float32) * jnp.log2(x.scale)
        sy = jnp.exp2(ylog)
        k = pow2_round(sy)
        base = P.pow_p.bind(x.data, y, **params)
        return scaled(
            rescale(ScaledArray.tree_unflatten(None, (base, sy / k)), 1.0), poison_product(k)
        )
    return _nonlinear(P.pow_p)(x, y, **params)


def _log(x, **params):
    """``log(d * s)``, or ``log(d) + log(s)`` where the product would leave float32's
    normal range (the scaled world's reason to exist); the direct form is preferred as it
    avoids cancellation near 1."""
    w = _wide(x.dtype)
    s = expand_scale(x.scale, x.shape).astype(w)
    d = x.data.astype(w)
    v = d * s
    direct = jnp.isfinite(v) & (jnp.abs(v) >= jnp.finfo(w).tiny)
    split = P.log_p.bind(d, **params) + jnp.log(s)
    out = jnp.where(direct | ~jnp.isfinite(d) | (d == 0), P.log_p.bind(v, **params), split)
    return scaled(out.astype(x.dtype), np.float32(1.0))


def _is_finite(x, **params):
    return P.is_finite_p.bind(x.data) & jnp.isfinite(expand_scale(x.scale, x.shape))


def _nonlinear(prim: Any):
    def rule(*args, **params):
        out = prim.bind(*[value_of(a) for a in args], **params)
        outs = out if prim.multiple_results else [out]
        outs = [
            scaled(o, np.float32(1.0)) if jnp.issubdtype(o.dtype, jnp.floating) else o
            for o in outs
        ]
        return outs if prim.multiple_results else outs[0]

    return rule


# -- selection and comparison ---------------------------------------------------------
def _in_common_scale(prim: Any, first_plain: int = 0):
    """Rule for ops whose result is one of the operands (max, min, clamp, select_n)."""

    def rule(*args, **params):
        head, ops = list(args[:first_plain]), args[first_plain:]
        check_blocks(prim.name, *ops)
        s = common_scale(*ops)
        dtype = next(_dtype_of(o) for o in ops if is_scaled(o))
        datas = [rescale(o, s, dtype) for o in ops]
        return scaled(prim.bind(*head, *datas, **params), s)

    return rule


def _compare(prim: Any):
    def rule(a, b, **params):
        check_blocks(prim.name, a, b)
        s = common_scale(a, b)
        dtype = _dtype_of(a) if is_scaled(a) else _dtype_of(b)
        return prim.bind(rescale(a, s, dtype), rescale(b, s, dtype), **params)

    return rule


def _convert(x, *, new_dtype, **params):
    if jnp.issubdtype(new_dtype, jnp.floating):
        if narrow_range(new_dtype) and not narrow_range(x.dtype):  # narrowing the range
            d, s = renormalize(x.data, x.scale, x.dtype)
            return scaled(P.convert_element_type_p.bind(d, new_dtype=new_dtype, **params), s)
        return scaled(
            P.convert_element_type_p.bind(x.data, new_dtype=new_dtype, **params), x.scale
        )
    return P.convert_element_type_p.bind(value_of(x), new_dtype=new_dtype, **params)


NONLINEAR = (
    "exp", "exp2", "expm1", "log1p", "tanh", "logistic", "erf", "erfc", "erf_inv", "sin",
    "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh",
    "atan2", "cbrt", "floor", "ceil", "round", "lgamma", "digamma", "rem", "nextafter",
    "reduce_prod", "cumprod", "cumlogsumexp", "sort",
    "one_minus_square",  # tanh's derivative (JAX >= 0.12)
)  # fmt: skip


def _register() -> None:
    for p in (P.add_p, P.sub_p, P.add_jaxvals_p):
        _register_builtin(p, _add_like(p), block_scales=True)
    _register_builtin(P.mul_p, _mul, block_scales=True)
    _register_builtin(P.div_p, _div, block_scales=True)
    for p in (P.neg_p, P.abs_p, P.copy_p, P.reduce_precision_p, P.real_p):
        _register_builtin(p, _data_only(p), block_scales=True)
    _register_builtin(P.sign_p, _sign, block_scales=True)
    _register_builtin(P.stop_gradient_p, _stop_gradient, block_scales=True)
    _register_builtin(P.square_p, _square, block_scales=True)
    _register_builtin(P.integer_pow_p, _integer_pow, block_scales=True)
    _register_builtin(P.sqrt_p, _sqrt_like(P.sqrt_p, False), block_scales=True)
    _register_builtin(P.rsqrt_p, _sqrt_like(P.rsqrt_p, True), block_scales=True)
    _register_builtin(P.pow_p, _pow)
    _register_builtin(P.log_p, _log, block_scales=True)
    _register_builtin(P.is_finite_p, _is_finite, block_scales=True)
    for name in NONLINEAR:
        prim = getattr(P, f"{name}_p", None)
        if prim is not None:  # not every primitive exists in every supported JAX version
            _register_builtin(prim, _nonlinear(prim), block_scales=True)
    for p in (P.max_p, P.min_p, P.clamp_p):
        _register_builtin(p, _in_common_scale(p), block_scales=True)
    _register_builtin(
        P.select_n_p, _in_common_scale(P.select_n_p, first_plain=1), block_scales=True
    )
    for p in (P.eq_p, P.ne_p, P.lt_p, P.le_p, P.gt_p, P.ge_p):
        _register_builtin(p, _compare(p), block_scales=True)
    _register_builtin(P.convert_element_type_p, _convert, block_scales=True)


_register()
