"""Scalify rules for higher-order primitives: calls, remat, custom derivatives, loops.

* ``jit``/``closed_call``/``custom_jvp_call``/``custom_vjp_call``: the inner jaxpr is
  interpreted inline (the primal function of a custom-derivative call; derivatives are
  taken *before* scalify, e.g. ``scalify(jax.grad(f))``, where they are plain equations).
* ``checkpoint`` (remat): the inner jaxpr is interpreted under ``jax.checkpoint`` with the
  same ``policy`` and ``prevent_cse``, so rematerialisation survives.
* ``scan``/``while``/``cond``: the body is interpreted inside ``lax.scan``/
  ``lax.while_loop``/``lax.switch``. A loop-carried value is scaled if it is scaled on
  entry or becomes scaled in the body (found by abstract evaluation, to a fixed point);
  scaled carries and branch results use a scalar scale. ``scan`` outputs stacked over
  iterations keep one scale per iteration: a per-block scale of shape ``(length, 1, ...)``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import primitives as P

from jaxq.scaled.array import ScaledArray, is_scaled, scaled, to_scalar_scale
from jaxq.scaled.interpreter import eval_closed, eval_jaxpr
from jaxq.scaled.rules import _register_builtin

__all__ = ["scan_counts"]


def _coerce(x: Any, want_scaled: bool) -> Any:
    """``x`` as a scalar-scaled ScaledArray when ``want_scaled``, else unchanged."""
    if not want_scaled:
        return x
    if is_scaled(x):
        x = to_scalar_scale(x)
        return ScaledArray.tree_unflatten(None, (x.data, jnp.reshape(x.scale, ())))
    return scaled(x, jnp.float32(1.0))


def _trivial_to_scalar(x: Any) -> Any:
    """A step's slice of a per-step scale, ``(1, 1, ...)``, as the scalar scale it is."""
    if is_scaled(x) and jnp.ndim(x.scale) > 0 and jnp.size(x.scale) == 1:
        return ScaledArray.tree_unflatten(None, (x.data, jnp.reshape(x.scale, ())))
    return x


def _fixpoint_carry(raw_body, init: list[Any], *extra: Any) -> list[bool]:
    """Which carries are scaled: scaled on entry, or made scaled by the body."""
    flags = [is_scaled(c) for c in init]
    for _ in range(len(init) + 1):
        carry = [_coerce(c, f) for c, f in zip(init, flags, strict=True)]
        outs = jax.eval_shape(raw_body, carry, *extra)
        new = [f or is_scaled(o) for f, o in zip(flags, outs, strict=True)]
        if new == flags:
            return flags
        flags = new
    return flags  # pragma: no cover - monotone, so the loop always converges


def _call(key: str):
    def rule(*args, **params):
        return eval_closed(params[key], *args)

    return rule


def _remat(*args, jaxpr, prevent_cse=True, policy=None, **params):
    fn = jax.checkpoint(
        lambda *a: eval_jaxpr(jaxpr, (), *a), prevent_cse=prevent_cse, policy=policy
    )
    return fn(*args)


def _shape(x: Any) -> tuple[int, ...]:
    shape = getattr(x, "shape", None)  # arrays, avals, ScaledArrays; literals are scalars
    return tuple(np.shape(x) if shape is None else shape)


def _leading_matches(got: Any, want: Any) -> int:
    """Number of leading positions where the shapes in ``got`` and ``want`` agree."""
    n = 0
    for g, w in zip(got, want, strict=False):
        if _shape(g) != _shape(w):
            break
        n += 1
    return n


def scan_counts(args: Any, out_avals: Any, jaxpr: Any) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a scan equation, from public structure only.

    A scan's operands are ``consts + carry + xs`` and its results ``carry + ys``; the body
    takes ``consts + carry + x`` and returns ``carry + y``. Consts and carries have the
    body's shapes, stacked ``xs``/``ys`` have one more (leading, ``length``) axis, so the
    leading operands whose shapes equal the body's inputs are ``consts + carry``, and the
    leading results whose shapes equal the body's outputs are the carries. Exact for
    every scan, and the same on every JAX version (JAX up to 0.10 also names the counts
    ``num_consts``/``num_carry``; later versions keep them in a private operand tree).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = lambda c, xs, k: jax.lax.scan(lambda c, x: (c * k + x, c), c, xs)
        >>> closed = jax.make_jaxpr(f)(1.0, jnp.ones(3), 2.0)
        >>> eqn = closed.jaxpr.eqns[-1]
        >>> scan_counts([v.aval for v in eqn.invars], [v.aval for v in eqn.outvars],
        ...             eqn.params["jaxpr"])
        (1, 1)
    """
    num_carry = _leading_matches(out_avals, jaxpr.out_avals)
    num_leading = _leading_matches(args, jaxpr.in_avals)
    if num_leading < num_carry:
        raise ValueError(
            f"scan equation with operand shapes {[_shape(a) for a in args]} does not match "
            f"its body's input shapes {[_shape(a) for a in jaxpr.in_avals]}"
        )
    return num_leading - num_carry, num_carry


def _scan(*args, jaxpr, length, reverse, unroll, out_avals, **params):
    num_consts, num_carry = scan_counts(args, out_avals, jaxpr)
    consts = args[:num_consts]
    init = list(args[num_consts : num_consts + num_carry])
    xs = args[num_consts + num_carry :]
    xs_scan, xs_scale = [], []
    for x in xs:
        if is_scaled(x) and jnp.ndim(x.scale) > 0 and x.scale.shape[0] == x.shape[0]:
            xs_scan.append(x), xs_scale.append(None)  # one scale row per step
        elif is_scaled(x) and jnp.ndim(x.scale) > 0 and x.scale.shape[0] == 1:
            xs_scan.append(x.data), xs_scale.append(jnp.squeeze(x.scale, 0))
        elif is_scaled(x):
            x = to_scalar_scale(x)
            xs_scan.append(x.data), xs_scale.append(x.scale)
        else:
            xs_scan.append(x), xs_scale.append(None)

    def step_inputs(xsl):
        return [
            _trivial_to_scalar(xv) if s is None else ScaledArray.tree_unflatten(None, (xv, s))
            for xv, s in zip(xsl, xs_scale, strict=True)
        ]

    def raw(carry, xsl):
        outs = eval_closed(jaxpr, *consts, *carry, *step_inputs(xsl))
        return outs[:num_carry]

    first = [jax.tree_util.tree_map(lambda leaf: leaf[0], x) for x in xs_scan]
    flags = _fixpoint_carry(raw, init, first) if length > 0 else [is_scaled(c) for c in init]

    def body(carry, xsl):
        outs = eval_closed(jaxpr, *consts, *carry, *step_inputs(xsl))
        new = [_coerce(o, f) for o, f in zip(outs[:num_carry], flags, strict=True)]
        ys = []
        for y in outs[num_carry:]:
            if is_scaled(y) and jnp.ndim(y.scale) == 0:
                y = ScaledArray.tree_unflatten(None, (y.data, jnp.reshape(y.scale, (1,) * y.ndim)))
            ys.append(y)
        return new, ys

    init = [_coerce(c, f) for c, f in zip(init, flags, strict=True)]
    carry, ys = lax.scan(body, init, xs_scan, length=length, reverse=reverse, unroll=unroll)
    return [*carry, *ys]


def _while(*args, cond_jaxpr, body_jaxpr, cond_nconsts, body_nconsts, **params):
    cconsts = args[:cond_nconsts]
    bconsts = args[cond_nconsts : cond_nconsts + body_nconsts]
    init = list(args[cond_nconsts + body_nconsts :])

    def raw(carry):
        return eval_closed(body_jaxpr, *bconsts, *carry)

    flags = _fixpoint_carry(raw, init)

    def body(carry):
        return [_coerce(o, f) for o, f in zip(raw(carry), flags, strict=True)]

    def cond(carry):
        (pred,) = eval_closed(cond_jaxpr, *cconsts, *carry)
        return pred

    init = [_coerce(c, f) for c, f in zip(init, flags, strict=True)]
    return lax.while_loop(cond, body, init)


def _cond(index, *ops, branches, **params):
    fns = [functools.partial(eval_closed, br) for br in branches]
    shapes = [jax.eval_shape(f, *ops) for f in fns]
    flags = [any(is_scaled(s[i]) for s in shapes) for i in range(len(shapes[0]))]

    def wrap(f):
        def g(*o):
            return [_coerce(out, fl) for out, fl in zip(f(*o), flags, strict=True)]

        return g

    return lax.switch(index, [wrap(f) for f in fns], *ops)


def _register() -> None:
    _register_builtin(P.jit_p, _call("jaxpr"), block_scales=True)
    _register_builtin("pjit", _call("jaxpr"), block_scales=True)  # name before jax 0.7
    _register_builtin(P.closed_call_p, _call("call_jaxpr"), block_scales=True)
    _register_builtin(P.custom_jvp_call_p, _call("call_jaxpr"), block_scales=True)
    _register_builtin(P.custom_vjp_call_p, _call("call_jaxpr"), block_scales=True)
    _register_builtin(P.remat_p, _remat, block_scales=True)
    _register_builtin(P.scan_p, _scan, block_scales=True, out_avals=True)
    _register_builtin(P.while_p, _while)
    _register_builtin(P.cond_p, _cond)


_register()
