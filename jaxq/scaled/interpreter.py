"""``scalify``: run a JAX function with ``ScaledArray`` inputs by interpreting its jaxpr.

The function is traced once with ``jax.make_jaxpr`` on the *abstract values* of its
inputs (a ``ScaledArray`` is seen as an array of its data's shape and dtype). The
interpreter then walks the equations: an equation with no scaled operand is bound as is
and yields ordinary arrays; one with a scaled operand runs the primitive's rule from
:mod:`jaxq.scaled.rules`. Control flow (``jit``, ``scan``, ``while``, ``cond``,
``checkpoint``, ``custom_jvp_call``, ``custom_vjp_call``) is interpreted recursively.

Scale safety: a zero, infinite or NaN scale never propagates silently. A concrete bad
scale on an input raises ``ValueError`` before anything runs; a traced one (and
``set_scaling``'s) goes through :func:`jaxq.scaled.scales.poison`, and every scale that a
rule forms by multiplying or dividing scales (``mul``, ``div``, ``square``,
``integer_pow``, ``pow``, ``dot_general``, ``conv_general_dilated``, ``sqrt``/``rsqrt``,
renormalization) through :func:`jaxq.scaled.scales.poison_product`; both turn a scale
that underflowed to 0 or overflowed to inf into NaN. Every other rule keeps NaN scales NaN
(``max``, ``pow2_round`` and the add-scale formula propagate NaN), so the tensor's value
becomes NaN instead of silently zero or saturated.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import core as jcore
from jax import lax
from jax.extend import core as jex

from jaxq.scaled.array import (
    block_shape,
    install_operator_transform,
    is_scaled,
    scaled,
    to_scalar_scale,
)
from jaxq.scaled.rules import ScalifyRuleError, get_rule
from jaxq.scaled.scales import on_host, poison

__all__ = ["scalify", "eval_jaxpr", "eval_closed"]


def _aval_of(x: Any) -> Any:
    if is_scaled(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jcore.Tracer | jax.Array | np.ndarray | np.generic):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype)
    if isinstance(x, bool | int | float | complex):
        return jax.ShapeDtypeStruct((), jnp.asarray(x).dtype, weak_type=True)
    raise TypeError(
        f"scalify arguments must be arrays, ScaledArrays or Python scalars; got {type(x).__name__}"
    )


def _guard_input(x: Any, where: str) -> Any:
    if not is_scaled(x):
        return x
    if not isinstance(x.scale, jcore.Tracer):
        s = np.asarray(x.scale)
        if not np.all(np.isfinite(s) & (s > 0)):
            raise ValueError(f"{where}: ScaledArray scale must be positive and finite, got {s!r}")
    return scaled(x.data, poison(x.scale))


def scalify(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Transforms ``fn`` to propagate ``ScaledArray`` inputs through every primitive.

    Rules follow the Scalify paper (Graphcore, 2024): scales are powers of two; ``a + b``
    gets ``r(sqrt(sa^2 + sb^2))``; products multiply scales; ``dot_general`` gets
    ``sa * sb * r(sqrt(K))`` with the data divided by ``r(sqrt(K))`` (``K`` = contracted
    size); sums grow the scale by ``r(sqrt(N))``; non-linear functions (exp, log, tanh,
    logistic, erf, ...) see the unscaled value and give a unit-scale output; casts change
    the data's dtype only. ``r(x) = 2^round(log2 x)``. Outputs of equations with no
    scaled operand are ordinary arrays, so ``scalify(fn)`` on plain inputs equals ``fn``.
    Where data enters float16 or an FP8 format (matmul and sum results, FP8 casts,
    narrowing conversions), the result is renormalized to unit RMS before the cast, and a
    plain array multiplying a scaled one brings its magnitude into the scale (see
    :mod:`jaxq.scaled`).

    The returned function is traceable (use it under ``jit``, ``grad``, ``vmap``). Inputs
    must be arrays, ``ScaledArray``s or Python scalars (in any pytree); values that affect
    shapes must be closed over, as with ``jit``. Differentiate *inside* for the
    Scalify workflow: ``scalify(jax.value_and_grad(loss))`` propagates scales through the
    backward pass too.

    Raises:
        NotImplementedError: an equation with a scaled operand has no rule (the message
            names the primitive).
        ScalifyRuleError: a rule returned outputs of the wrong shape or dtype.
        ValueError: a concrete input scale is zero, negative or non-finite; per-block
            operands of an elementwise op have mismatched block shapes.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxq.scaled import as_scaled_array, asarray
        >>> x = as_scaled_array(jnp.full((8, 8), 2.0**10, jnp.float16))
        >>> bool(jnp.isinf(x.data @ x.data * 2.0**20).any())  # plain float16 overflows
        True
        >>> y = scalify(jnp.matmul)(x, x)  # 8 * 2^20, renormalized to data 1, scale 2^23
        >>> float(y.data[0, 0]), float(y.scale), float(asarray(y, jnp.float32)[0, 0])
        (1.0, 8388608.0, 8388608.0)
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs), is_leaf=is_scaled)
        leaves = [_guard_input(x, f"scalify({_fn_name(fn)}) argument") for x in leaves]
        avals = [_aval_of(x) for x in leaves]

        def flat_fn(*flat):
            a, k = jax.tree_util.tree_unflatten(treedef, flat)
            return fn(*a, **k)

        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)
        out_leaves, out_tree = jax.tree_util.tree_flatten(out_shape)
        outs = eval_closed(closed, *leaves)
        if len(outs) != len(out_leaves):  # pragma: no cover - make_jaxpr guarantees this
            raise RuntimeError("scalify: output count mismatch")
        return jax.tree_util.tree_unflatten(out_tree, [_device_scale(o) for o in outs])

    return wrapper


def _device_scale(x: Any) -> Any:
    """An output whose scale a rule computed on the host (a constant) with a JAX scale."""
    if is_scaled(x) and on_host(x.scale):
        return scaled(x.data, jnp.asarray(x.scale, jnp.float32))
    return x


def _fn_name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def eval_closed(closed: Any, *args: Any) -> list[Any]:
    """Interprets a ``ClosedJaxpr`` on (possibly scaled) arguments; returns its outputs."""
    return eval_jaxpr(closed.jaxpr, closed.consts, *args)


def _check_outputs(eqn: Any, outs: Sequence[Any], barriered: dict[int, Any]) -> list[Any]:
    name = eqn.primitive.name
    if len(outs) != len(eqn.outvars):
        raise ScalifyRuleError(
            f"scalify rule for primitive {name!r} returned {len(outs)} outputs, "
            f"expected {len(eqn.outvars)}"
        )
    checked = []
    for i, (o, v) in enumerate(zip(outs, eqn.outvars, strict=True)):
        aval = v.aval
        shape, dtype = (o.shape, o.dtype) if is_scaled(o) else (np.shape(o), jnp.result_type(o))
        want_shape = tuple(getattr(aval, "shape", ()))
        want_dtype = getattr(aval, "dtype", None)
        if tuple(shape) != want_shape or (want_dtype is not None and dtype != want_dtype):
            raise ScalifyRuleError(
                f"scalify rule for primitive {name!r} returned output {i} with shape "
                f"{tuple(shape)} and dtype {dtype}; the primitive produces shape "
                f"{want_shape} and dtype {want_dtype}"
            )
        if is_scaled(o):
            try:
                block_shape(o.shape, jnp.shape(o.scale))
            except ValueError as e:
                raise ScalifyRuleError(f"scalify rule for primitive {name!r}: {e}") from None
            if isinstance(o.scale, jcore.Tracer) and id(o.scale) not in barriered:
                # Scales form long chains of cheap scalar ops; without a barrier XLA
                # duplicates each chain into every consumer fusion (compile time measured
                # 7x the plain step's on a small GPT; 2x with the barrier). A scale that
                # is already a barrier's output (a rule that kept its operand's scale)
                # needs no second one.
                s = lax.optimization_barrier(o.scale)
                barriered[id(s)] = s
                o = scaled(o.data, s)
        checked.append(o)
    return checked


def eval_jaxpr(jaxpr: Any, consts: Sequence[Any], *args: Any) -> list[Any]:
    """Interprets an open ``Jaxpr`` with ``consts`` bound to its constvars.

    Arguments and results may be ``ScaledArray``s; see :func:`scalify`.
    """
    env: dict[Any, Any] = {}
    barriered: dict[int, Any] = {}  # id -> scale tracers that are barrier outputs

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jex.Literal) else env[v]

    def write(v: Any, val: Any) -> None:
        if not isinstance(v, jex.DropVar):
            env[v] = val

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        write(v, c)
    for v, a in zip(jaxpr.invars, args, strict=True):
        write(v, a)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        ctx = getattr(eqn, "ctx", None)
        with ctx.manager if ctx is not None else contextlib.nullcontext():
            if any(is_scaled(x) for x in invals):
                outs = _apply_rule(eqn, invals, barriered)
            else:
                bind_params = eqn.primitive.get_bind_params(eqn.params)
                subfuns: Sequence[Any] = ()
                if isinstance(bind_params, tuple):  # older jax: (subfuns, params)
                    subfuns, bind_params = bind_params
                ans = eqn.primitive.bind(*subfuns, *invals, **bind_params)
                outs = ans if eqn.primitive.multiple_results else [ans]
        for v, o in zip(eqn.outvars, outs, strict=True):
            write(v, o)
    return [read(v) for v in jaxpr.outvars]


def _apply_rule(eqn: Any, invals: list[Any], barriered: dict[int, Any]) -> list[Any]:
    prim = eqn.primitive
    rule = get_rule(prim)
    if rule is None:
        raise NotImplementedError(
            f"scalify has no rule for primitive {prim.name!r}, which received a ScaledArray "
            f"operand; register one with jaxq.scaled.rules.register({prim.name!r}, rule), or "
            "unscale the operand first with jaxq.scaled.stop_scaling"
        )
    if not rule.block_scales:
        invals = [to_scalar_scale(x) if is_scaled(x) else x for x in invals]
    extra = {"out_avals": tuple(v.aval for v in eqn.outvars)} if rule.out_avals else {}
    ans = rule.fn(*invals, **extra, **eqn.params)
    outs = list(ans) if prim.multiple_results else [ans]
    return _check_outputs(eqn, outs, barriered)


install_operator_transform(scalify)
