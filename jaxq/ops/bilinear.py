"""Quantized convolutions and grouped (ragged) matmuls.

Both are bilinear ``y = f(x, w)`` with a transpose that JAX derives from ``f``. Their
quantized version follows :mod:`jaxq.ops.dot_general`'s recipe semantics:

.. math::

    y = f(Q_l(x), Q_r(w)), \\qquad
    (\\partial x, \\partial w) = f^\\top_{Q_l(x), Q_r(w)}(Q_g(g))

with the forward operands saved quantized (codes and scales), or saved as they are and
used unquantized in the backward under ``backward_operands="float"``. Granularity here is
``"tensor"`` for every operand, or ``"row"`` for the weight: one scale per output feature
(conv) or per (group, output column) (ragged dot). The products run on the dequantized
values in float32 (the dequantize path of :mod:`jaxq.ops.operand`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.ops import operand as O
from jaxq.ops.spec import OpState, Quantizer, Recipe
from jaxq.ops.vjp_state import Bits, check_operands, check_state, state_cotangent
from jaxq.ops.vjp_state import history_amax as _amax
from jaxq.quantization.qdq import quantize

__all__ = ["conv_general_dilated", "ragged_dot"]


@dataclasses.dataclass(frozen=True)
class _Bilinear:
    fn: Callable  # hashable: a functools.partial of static arguments
    recipe: Recipe
    rhs_row_axes: tuple[int, ...]
    lhs_dtype: object
    rhs_dtype: object
    op: str


def _quantize(x, q: Quantizer | None, row_axes, amax, key, where):
    if q is None:
        return x
    if q.granularity not in ("tensor", "row") or (q.granularity == "row" and row_axes is None):
        allowed = "'tensor'" + (" or 'row'" if row_axes is not None else "")
        raise ValueError(f"{where}: granularity {q.granularity!r} is not supported here; "
                         f"use {allowed}")  # fmt: skip
    axis = None if q.granularity == "tensor" else row_axes
    rounding = q.rounding
    k = key if rounding == "stochastic" else None
    given = O.scaling_amax(x, q, amax)
    if given is not None:
        return quantize(x, q.fmt, axis=axis, amax=given, rounding=rounding, key=k)
    cal = q.calibration if not isinstance(q.calibration, str) else None
    kw = {} if cal is None else {"calibration": cal}
    return quantize(x, q.fmt, axis=axis, rounding=rounding, key=k, **kw)


def _keys(state, recipe):
    if not recipe.needs_key:
        return (None, None, None)
    return tuple(jax.random.split(state.key(), 3))


def _fwd(lhs, rhs, state, aux, cfg: _Bilinear):
    r = cfg.recipe
    kl, kr, _ = _keys(state, r)
    xq = _quantize(lhs, r.lhs, None, _amax(state, r, "lhs"), kl, f"{cfg.op} lhs")
    wq = _quantize(rhs, r.rhs, cfg.rhs_row_axes, _amax(state, r, "rhs"), kr, f"{cfg.op} rhs")
    y = cfg.fn(O.to_float(xq), O.to_float(wq), aux)
    observed = {
        "lhs": O.observe_amax(lhs) if "lhs" in r.delayed_roles else None,
        "rhs": O.observe_amax(rhs) if "rhs" in r.delayed_roles else None,
    }
    if r.backward_operands == "float":
        xq, wq = lhs, rhs
    return y, (Bits.wrap((xq, wq)), state, aux, observed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _qbilinear(lhs, rhs, state, aux, cfg):
    return _fwd(lhs, rhs, state, aux, cfg)[0]


def _bwd(cfg: _Bilinear, res, g):
    saved, state, aux, observed = res
    xq, wq = saved.unwrap()
    r = cfg.recipe
    _, _, kg = _keys(state, r)
    gq = _quantize(g, r.grad, None, _amax(state, r, "grad"), kg, f"{cfg.op} grad")
    _, vjp = jax.vjp(lambda a, b: cfg.fn(a, b, aux), O.to_float(xq), O.to_float(wq))
    dx, dw = vjp(O.to_float(gq).astype(jnp.float32))
    observed = dict(observed)
    if "grad" in r.delayed_roles:
        observed["grad"] = O.observe_amax(g)
    aux_ct = jax.tree.map(lambda a: np.zeros(jnp.shape(a), jax.dtypes.float0), aux)
    dx, dw = dx.astype(cfg.lhs_dtype), dw.astype(cfg.rhs_dtype)
    return dx, dw, state_cotangent(state, observed), aux_ct


_qbilinear.defvjp(_fwd, _bwd)
_qbilinear_jit = jax.jit(_qbilinear, static_argnums=(4,))  # one program per eager call


def _apply(fn, lhs, rhs, aux, recipe, state, rhs_row_axes, op, out_dtype):
    if not isinstance(recipe, Recipe):
        raise TypeError(f"{op}: recipe must be a jaxq.ops.Recipe or None, got {recipe!r}")
    if recipe.learned_step or recipe.hadamard_wgrad:
        raise ValueError(f"{op}: recipe {recipe.name!r} uses learned steps or Hadamard "
                         "rotations, which only jaxq.ops.dot_general/einsum support")  # fmt: skip
    check_operands(op, lhs, rhs)
    check_state(recipe, state, op)
    cfg = _Bilinear(fn, recipe, rhs_row_axes, lhs.dtype, rhs.dtype, op)
    return _qbilinear_jit(lhs, rhs, state, aux, cfg).astype(out_dtype)


def _conv(lhs, rhs, aux, *, kwargs):
    return jax.lax.conv_general_dilated(
        lhs, rhs, **dict(kwargs), precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )  # fmt: skip


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
    *,
    recipe: Recipe | None,
    state: OpState | None = None,
) -> jax.Array:
    """``jax.lax.conv_general_dilated`` with operands quantized by ``recipe``.

    ``functools.partial(jaxq.ops.conv_general_dilated, recipe=r)`` fits the ``conv_general_dilated``
    slot of ``flax.linen.Conv`` / ``nnx.Conv``. Weight ``"row"`` granularity gives one scale
    per output feature.

    Example:
        >>> import jax, jax.numpy as jnp, jaxq
        >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
        >>> w = jax.random.normal(jax.random.key(1), (3, 3, 4, 16))
        >>> y = jaxq.ops.conv_general_dilated(x, w, (1, 1), "SAME",
        ...     dimension_numbers=("NHWC", "HWIO", "NHWC"), recipe=jaxq.recipes.FP8Current())
        >>> y.shape
        (2, 8, 8, 16)
    """
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    kwargs = {
        "window_strides": tuple(window_strides),
        "padding": padding if isinstance(padding, str) else tuple(map(tuple, padding)),
        "lhs_dilation": None if lhs_dilation is None else tuple(lhs_dilation),
        "rhs_dilation": None if rhs_dilation is None else tuple(rhs_dilation),
        "dimension_numbers": dimension_numbers,
        "feature_group_count": feature_group_count,
        "batch_group_count": batch_group_count,
    }
    if recipe is None:
        out = jax.lax.conv_general_dilated(
            lhs, rhs, **kwargs, precision=precision, preferred_element_type=preferred_element_type
        )
    else:
        dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        out_axis = dn.rhs_spec[0]  # the kernel's output-feature axis
        fn = functools.partial(_conv, kwargs=tuple(kwargs.items()))
        out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
        op = f"jaxq.ops.conv_general_dilated[{recipe.name}]"
        out = _apply(fn, lhs, rhs, (), recipe, state, (out_axis,), op, out_dtype)
    if out_sharding is not None:
        out = jax.lax.with_sharding_constraint(out, out_sharding)
    return out


def _ragged(lhs, rhs, group_sizes):
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, precision=jax.lax.Precision.HIGHEST,
                              preferred_element_type=jnp.float32)  # fmt: skip


def ragged_dot(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    precision=None,
    preferred_element_type=None,
    group_offset=None,
    *,
    recipe: Recipe | None,
    state: OpState | None = None,
) -> jax.Array:
    """``jax.lax.ragged_dot`` (mixture-of-experts grouped matmul) with quantized operands.

    ``lhs`` is ``(M, K)`` tokens sorted by expert, ``rhs`` is ``(G, K, N)`` expert weights,
    ``group_sizes`` ``(G,)`` tokens per expert. Weight ``"row"`` granularity gives one scale
    per (expert, output column).

    Example:
        >>> import jax, jax.numpy as jnp, jaxq
        >>> x = jax.random.normal(jax.random.key(0), (12, 32))
        >>> w = jax.random.normal(jax.random.key(1), (3, 32, 16))
        >>> sizes = jnp.array([5, 0, 7], jnp.int32)
        >>> jaxq.ops.ragged_dot(x, w, sizes, recipe=jaxq.recipes.FP8Current()).shape
        (12, 16)
    """
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    if recipe is None:
        return jax.lax.ragged_dot(lhs, rhs, group_sizes, precision, preferred_element_type)
    if group_offset is not None:
        raise ValueError("jaxq.ops.ragged_dot: group_offset is not supported with a recipe")
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(
            f"jaxq.ops.ragged_dot: expected lhs (M, K) and rhs (G, K, N), got lhs "
            f"{lhs.shape} and rhs {rhs.shape}"
        )
    out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    op = f"jaxq.ops.ragged_dot[{recipe.name}]"
    group_sizes = jnp.asarray(group_sizes, jnp.int32)
    return _apply(_ragged, lhs, rhs, group_sizes, recipe, state, (0, 2), op, out_dtype)
