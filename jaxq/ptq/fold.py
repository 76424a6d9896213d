"""Folding smoothing divisors into the norm before the layers.

SmoothQuant and AWQ serve a layer as ``(x / s) · (w · s)ᵀ``, which leaves one division per
activation element at serving time. When ``x`` is the output of a norm with an affine
scale ``γ`` and bias ``β`` (LayerNorm, RMSNorm), the division belongs to the norm::

    x / s = (n(h) · γ + β) / s = n(h) · (γ / s) + β / s

so :func:`fold` divides the norm's ``scale`` and ``bias`` by ``s``, multiplies each
layer's kernel by ``s`` along its contraction axis, and drops the divisor from the plan.
The float model computes the same function (up to the rounding of the new parameters) and
serving applies no divisor. Every layer that reads the norm's output must have the same
``s``: compute them together with ``groups=`` in :func:`jaxq.ptq.smoothquant` or
:func:`jaxq.ptq.awq`. A layer after a nonlinearity (an MLP's down projection) cannot be
folded and keeps its serving-time divisor.

Example::

    qkv = ("blocks/attn/q", "blocks/attn/k", "blocks/attn/v")
    plan = jaxq.ptq.smoothquant(model, None, rules, batches, groups=[qkv])
    model, _, plan = jaxq.ptq.fold(model, None, rules, batches, plan=plan,
                                   into={"blocks/ln1": qkv})
    served = jaxq.ptq.convert(model, None, rules, calibration=batches, plan=plan)
"""

from __future__ import annotations

import typing

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxq.ptq.convert import calibrate
from jaxq.ptq.plan import Plan
from jaxq.wrapping.nnx import _get

__all__ = ["fold", "Folded"]


class Folded(typing.NamedTuple):
    """What :func:`fold` returns: the float model (NNX: a new module; Linen: the same
    module), its variables (Linen; ``None`` for NNX) and the plan without the folded
    divisors."""

    model: typing.Any
    params: typing.Any
    plan: Plan


def _nnx_node(model, path: str):
    for p, node in nnx.iter_graph(model):
        if "/".join(map(str, p)) == path:
            return node
    raise ValueError(f"jaxq.ptq.fold: the model has no module at {path!r}")


def _set(v, value):
    if hasattr(v, "set_value"):
        v.set_value(value)
    else:
        v.value = value


def _linen_node(params, path: str) -> dict:
    node = params["params"]
    for part in path.split("/") if path else []:
        if not hasattr(node, "get") or part not in node:
            raise ValueError(f"jaxq.ptq.fold: the parameters have no module at {path!r}")
        node = node[part]
    return node


def _linen_set(tree, path: str, name: str, value):
    parts = (path.split("/") if path else []) + [name]

    def put(node, parts):
        node = dict(node)
        node[parts[0]] = value if len(parts) == 1 else put(node[parts[0]], parts[1:])
        return node

    return {**tree, "params": put(tree["params"], parts)}


def _kernel_scale(s, stack, call, path):
    """``s`` (``stack + (K,)``) laid along the kernel's contraction axis."""
    (_, rc), _ = call.dims
    if len(rc) != 1:
        raise ValueError(f"jaxq.ptq.fold: layer {path!r} contracts over axes {rc} of its "
                         f"kernel {call.kernel_shape}; fold needs one contraction axis")
    shape = tuple(n if i == rc[0] else 1 for i, n in enumerate(call.kernel_shape))
    return jnp.reshape(s, tuple(stack) + shape)


def fold(model, params, rules, calibration, *, plan: Plan, into: dict) -> Folded:
    """Folds the smoothing divisors of the layers after each norm into that norm.

    Args:
        model, params, rules, calibration: as for :func:`jaxq.ptq.convert` (one batch is
            enough: it finds the layers' products).
        plan: a plan from :func:`jaxq.ptq.smoothquant` or :func:`jaxq.ptq.awq` in which the
            layers of each group share their divisors.
        into: ``{norm path: layer paths}``; the norm module has a ``scale`` parameter (and
            optionally ``bias``) of the layers' contraction size.

    Returns:
        :class:`Folded` ``(model, params, plan)``: convert that model with that plan.

    Raises:
        ValueError: a layer without a divisor, rotated or already quantized; divisors that
            differ within a group; a norm without a ``scale`` of the right shape; a kernel
            contracted over several axes.
    """
    nnx_model = isinstance(model, nnx.Module)
    if not nnx_model and not isinstance(model, nn.Module):
        raise TypeError(f"jaxq.ptq.fold: model must be a Flax NNX or Linen module, got {model!r}")
    layers, _ = calibrate(model, params, rules, list(calibration)[:1], plan=plan, stats=())
    if nnx_model:
        model = nnx.clone(model)
    new_plan = Plan(plan)
    for norm, paths in into.items():
        paths = (paths,) if isinstance(paths, str) else tuple(paths)
        s = None
        for path in paths:
            lp = plan.layer(path)
            if path not in layers:
                raise ValueError(f"jaxq.ptq.fold: no rule converts layer {path!r}")
            if lp.in_scale is None or lp.rotation is not None or lp.weight is not None:
                raise ValueError(f"jaxq.ptq.fold: layer {path!r} has no smoothing divisor, or "
                                 "is rotated or quantized already; fold right after "
                                 "smoothquant/awq")  # fmt: skip
            if s is None:
                s = lp.in_scale
            elif lp.in_scale.shape != s.shape or not np.array_equal(lp.in_scale, s):
                raise ValueError(f"jaxq.ptq.fold: the layers {paths} after {norm!r} have "
                                 "different divisors; compute them with groups=")  # fmt: skip
        for path in paths:
            run = layers[path]
            sk = _kernel_scale(s, run.stack, run.calls[0], path)
            if nnx_model:
                v = vars(_nnx_node(model, path))["kernel"]
                k = _get(v)
                _set(v, (k.astype(jnp.float32) * sk).astype(k.dtype))
            else:
                k = _linen_node(params, path)["kernel"]
                params = _linen_set(params, path, "kernel",
                                    (k.astype(jnp.float32) * sk).astype(k.dtype))  # fmt: skip
            trail = plan.layer(path).algorithm + ("fold",)
            new_plan = new_plan.with_layer(path, in_scale=None, algorithm=trail)
        node = vars(_nnx_node(model, norm)) if nnx_model else _linen_node(params, norm)
        scale = node.get("scale")
        if scale is None:
            raise ValueError(f"jaxq.ptq.fold: module {norm!r} has no 'scale' parameter to fold "
                             "the divisors into")  # fmt: skip
        for name in ("scale", "bias"):
            v = node.get(name)
            if v is None:
                continue
            a = _get(v) if nnx_model else v
            if a.shape != s.shape:
                raise ValueError(f"jaxq.ptq.fold: {norm!r}.{name} has shape {a.shape}; the "
                                 f"divisors of {paths} have shape {s.shape}")  # fmt: skip
            new = (a.astype(jnp.float32) / s).astype(a.dtype)
            if nnx_model:
                _set(v, new)
            else:
                params = _linen_set(params, norm, name, new)
    return Folded(model, None if nnx_model else params, new_plan)
