"""Explicit scaled-world operations: set/stop scaling, dynamic rescaling, FP8 casts.

Each operation is a small JAX primitive so that it survives ``jax.grad``/``jit``/``vmap``
and is recognised by :func:`jaxq.scaled.scalify` in the traced program. Outside scalify
(or on plain arrays) they act on values: ``set_scaling``, ``dynamic_rescale_*`` and the
``*_grad`` twins are identities, ``stop_scaling`` is a dtype cast and ``cast_on_forward``
rounds values to the format. Under scalify they act on the representation:

* ``set_scaling(x, s)``: same value, re-expressed with scale ``s`` (data ``= value / s``).
* ``stop_scaling(x, dtype)``: the plain value ``data * scale`` (an ordinary array).
* ``dynamic_rescale_{l1,l2,max}(x)``: data divided by ``r(norm(data))`` and the scale
  multiplied by it, with ``norm`` the mean absolute value, the RMS or the max absolute
  value of the data, so the data returns to unit range; a zero or non-finite norm leaves
  ``x`` unchanged. ``dynamic_rescale_*_grad(x)`` is the identity forward and applies the
  same rescaling to the gradient.
* ``cast_on_forward(x, fmt)``: rounds the *data* onto ``fmt``'s grid (``jaxq.cast``,
  round-to-nearest-even, saturating) after renormalizing it to unit RMS (the scale takes
  ``r(rms)``, the value is unchanged), so nothing flushes or saturates because an earlier
  rule left the data off unit range; gradient passes straight through.
  ``cast_on_backward(x, fmt)``: identity forward, the gradient's data is cast.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxq.scaled import as_scaled_array, scalify
    >>> x = as_scaled_array(jnp.array([3.0e6, 1.0e6]))
    >>> y = scalify(lambda a: cast_on_forward(a, "e4m3"))(x)  # no overflow at 3e6
    >>> y.scale == x.scale
    Array(True, dtype=bool)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import core as jcore
from jax import lax
from jax.extend import core as jex
from jax.interpreters import batching, mlir

from jaxq import formats as F
from jaxq.quantization import cast as _cast_values
from jaxq.scaled.array import asarray, is_scaled, scaled
from jaxq.scaled.rules import _register_builtin
from jaxq.scaled.rules_elementwise import rescale
from jaxq.scaled.scales import poison, pow2_round, renormalize, scale_ok

__all__ = [
    "set_scaling",
    "stop_scaling",
    "dynamic_rescale_l1",
    "dynamic_rescale_l2",
    "dynamic_rescale_max",
    "dynamic_rescale_l1_grad",
    "dynamic_rescale_l2_grad",
    "dynamic_rescale_max_grad",
    "cast_on_forward",
    "cast_on_backward",
]


def _primitive(name: str, impl, out_dtype=None) -> jex.Primitive:
    p = jex.Primitive(name)
    p.def_impl(impl)

    def abstract(x, *rest, **params):
        dtype = out_dtype(x, **params) if out_dtype else x.dtype
        return jcore.ShapedArray(x.shape, dtype)

    p.def_abstract_eval(abstract)
    mlir.register_lowering(p, mlir.lower_fun(impl, multiple_results=False))

    def batch(args, dims, **params):
        return p.bind(*args, **params), dims[0]

    batching.primitive_batchers[p] = batch
    return p


# -- primitives ------------------------------------------------------------------------
def _set_scaling_impl(x, scale):
    return x


def _stop_scaling_impl(x, *, dtype):
    return x.astype(dtype)


def _rescale_impl(x, *, norm):
    return x


def _cast_impl(x, *, fmt):
    return _cast_values(x, fmt)


set_scaling_p = _primitive("jaxq_set_scaling", _set_scaling_impl)
stop_scaling_p = _primitive("jaxq_stop_scaling", _stop_scaling_impl, lambda x, dtype: dtype)
dynamic_rescale_p = _primitive("jaxq_dynamic_rescale", _rescale_impl)
cast_p = _primitive("jaxq_cast", _cast_impl)


# -- scalify rules ---------------------------------------------------------------------
def _set_scaling_rule(x, scale):
    s = asarray(scale, jnp.float32) if is_scaled(scale) else jnp.asarray(scale, jnp.float32)
    s = poison(s)
    return scaled(rescale(x, s), s)


def _stop_scaling_rule(x, *, dtype):
    return asarray(x, dtype)


def _norm(d: jax.Array, norm: str) -> jax.Array:
    a = jnp.abs(d.astype(jnp.float32))
    if norm == "l1":
        return jnp.mean(a)
    if norm == "l2":
        return jnp.sqrt(jnp.mean(a * a))
    return jnp.max(a)


def _rescale_rule(x, *, norm):
    r = pow2_round(_norm(x.data, norm)) if x.size else jnp.float32(0)
    r = lax.select(scale_ok(r), r, lax.full_like(r, 1))  # zero/inf/NaN norm: keep x as is
    return scaled(_div_data(x.data, r), x.scale * r)


def _div_data(d: jax.Array, r: jax.Array) -> jax.Array:
    if d.dtype == jnp.float32:
        return d / r
    w = jnp.promote_types(d.dtype, jnp.float32)
    return (d.astype(w) / r).astype(d.dtype)


def _cast_rule(x, *, fmt):
    # the format's range is narrow: bring the data to unit RMS first (value unchanged)
    d, s = renormalize(x.data, x.scale, x.dtype)
    return scaled(_cast_values(d, fmt), s)


_register_builtin(set_scaling_p, _set_scaling_rule)
_register_builtin(stop_scaling_p, _stop_scaling_rule, block_scales=True)
_register_builtin(dynamic_rescale_p, _rescale_rule)
_register_builtin(cast_p, _cast_rule, block_scales=True)


# -- user-facing functions with their gradients ------------------------------------------
@jax.custom_vjp
def _set_scaling(x, scale):
    return set_scaling_p.bind(x, scale)


def _set_scaling_fwd(x, scale):
    return set_scaling_p.bind(x, scale), scale


def _set_scaling_bwd(scale, g):
    return g, jnp.zeros_like(scale)


_set_scaling.defvjp(_set_scaling_fwd, _set_scaling_bwd)


def set_scaling(x: Any, scale: Any) -> Any:
    """Re-expresses ``x`` with scale ``scale`` (same value); identity on plain arrays.

    Under scalify the result is ``scaled(value / scale, scale)``; the gradient is
    passed through unchanged.

    Args:
        x: array (ScaledArray under scalify).
        scale: positive float32 scalar (a zero or non-finite one poisons the result).

    Example:
        >>> from jaxq.scaled import as_scaled_array, scalify
        >>> y = scalify(lambda a: set_scaling(a, 4.0))(as_scaled_array(jnp.ones(2)))
        >>> y.data, y.scale
        (Array([0.25, 0.25], dtype=float32), Array(4., dtype=float32))
    """
    return _set_scaling(x, jnp.asarray(scale, jnp.float32))


def stop_scaling(x: Any, dtype: Any = None) -> Any:
    """Leaves the scaled world: returns the plain value ``data * scale`` (cast to ``dtype``).

    Outside scalify it only casts. Its gradient is the identity (cast back).

    Example:
        >>> from jaxq.scaled import as_scaled_array, scalify
        >>> scalify(stop_scaling)(as_scaled_array(jnp.full(2, 8.0)))
        Array([8., 8.], dtype=float32)
    """
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(x)
    return _stop_scaling(x, dtype)


def _stop_scaling(x, dtype):
    @jax.custom_vjp
    def f(x):
        return stop_scaling_p.bind(x, dtype=dtype)

    f.defvjp(
        lambda x: (stop_scaling_p.bind(x, dtype=dtype), None),
        lambda _, g: (g.astype(jnp.result_type(x)),),
    )
    return f(x)


def _rescale_fn(norm: str):
    @jax.custom_vjp
    def f(x):
        return dynamic_rescale_p.bind(x, norm=norm)

    f.defvjp(lambda x: (dynamic_rescale_p.bind(x, norm=norm), None), lambda _, g: (g,))
    return f


def _rescale_grad_fn(norm: str):
    @jax.custom_vjp
    def f(x):
        return x

    f.defvjp(lambda x: (x, None), lambda _, g: (dynamic_rescale_p.bind(g, norm=norm),))
    return f


_R = {n: _rescale_fn(n) for n in ("l1", "l2", "max")}
_RG = {n: _rescale_grad_fn(n) for n in ("l1", "l2", "max")}


def dynamic_rescale_l1(x: Any) -> Any:
    """Rescales data to unit mean absolute value: ``s' = s * r(mean|d|)`` (value unchanged).

    Identity on plain arrays and in the backward pass.

    Example:
        >>> from jaxq.scaled import ScaledArray, scalify
        >>> y = scalify(dynamic_rescale_l1)(ScaledArray(jnp.full(4, 64.0), 1.0))
        >>> y.data[0], y.scale
        (Array(1., dtype=float32), Array(64., dtype=float32))
    """
    return _R["l1"](x)


def dynamic_rescale_l2(x: Any) -> Any:
    """Rescales data to unit RMS: ``s' = s * r(sqrt(mean d^2))`` (value unchanged).

    Example:
        >>> from jaxq.scaled import ScaledArray, scalify
        >>> scalify(dynamic_rescale_l2)(ScaledArray(jnp.full(4, 0.01), 1.0)).scale
        Array(0.0078125, dtype=float32)
    """
    return _R["l2"](x)


def dynamic_rescale_max(x: Any) -> Any:
    """Rescales data to unit max absolute value: ``s' = s * r(max|d|)`` (value unchanged).

    Example:
        >>> from jaxq.scaled import ScaledArray, scalify
        >>> scalify(dynamic_rescale_max)(ScaledArray(jnp.array([300.0, 1.0]), 1.0)).scale
        Array(256., dtype=float32)
    """
    return _R["max"](x)


def dynamic_rescale_l1_grad(x: Any) -> Any:
    """Identity forward; the gradient is rescaled as by :func:`dynamic_rescale_l1`.

    Example:
        >>> import jax
        >>> jax.grad(lambda a: dynamic_rescale_l1_grad(a).sum())(jnp.ones(2))
        Array([1., 1.], dtype=float32)
    """
    return _RG["l1"](x)


def dynamic_rescale_l2_grad(x: Any) -> Any:
    """Identity forward; the gradient is rescaled as by :func:`dynamic_rescale_l2`.

    Example:
        >>> import jax
        >>> jax.grad(lambda a: dynamic_rescale_l2_grad(a).sum())(jnp.ones(2))
        Array([1., 1.], dtype=float32)
    """
    return _RG["l2"](x)


def dynamic_rescale_max_grad(x: Any) -> Any:
    """Identity forward; the gradient is rescaled as by :func:`dynamic_rescale_max`.

    Example:
        >>> import jax
        >>> jax.grad(lambda a: dynamic_rescale_max_grad(a).sum())(jnp.ones(2))
        Array([1., 1.], dtype=float32)
    """
    return _RG["max"](x)


def _element_format(fmt: Any) -> F.FloatFormat:
    f = F.get(fmt)
    if isinstance(f, F.BlockFormat):
        raise TypeError(
            f"fmt must be an element format (e.g. 'e4m3'), got block format {f!r}; represent "
            "block scales with a per-block ScaledArray scale instead"
        )
    return f


def cast_on_forward(x: Any, fmt: Any) -> Any:
    """Rounds onto ``fmt``'s grid in the forward pass; straight-through gradient.

    Plain arrays: ``jaxq.cast(x, fmt)`` (RNE, saturating to ``±fmt.max``). Under scalify
    only the data is cast, so the value's magnitude never over- or underflows the format.

    Args:
        x: floating array (ScaledArray under scalify).
        fmt: element format or its name, e.g. ``"e4m3"``.

    Example:
        >>> cast_on_forward(jnp.array([1000.0, 0.3]), "e4m3").tolist()
        [448.0, 0.3125]
    """
    return _cast_fwd(_element_format(fmt))(x)


def cast_on_backward(x: Any, fmt: Any) -> Any:
    """Identity forward; the gradient is rounded onto ``fmt``'s grid (its data, under scalify).

    Example:
        >>> import jax
        >>> jax.grad(lambda a: (cast_on_backward(a, "e5m2") * 0.3).sum())(jnp.ones(1))
        Array([0.3125], dtype=float32)
    """
    return _cast_bwd(_element_format(fmt))(x)


def _cast_fwd(fmt):
    @jax.custom_vjp
    def f(x):
        return cast_p.bind(x, fmt=fmt)

    f.defvjp(lambda x: (cast_p.bind(x, fmt=fmt), None), lambda _, g: (g,))
    return f


def _cast_bwd(fmt):
    @jax.custom_vjp
    def f(x):
        return x

    f.defvjp(lambda x: (x, None), lambda _, g: (cast_p.bind(g, fmt=fmt),))
    return f
