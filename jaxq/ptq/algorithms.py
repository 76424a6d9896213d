"""The post-training algorithms on a whole model: rotation, SmoothQuant, AWQ and GPTQ.

Each one runs the float model over calibration batches (through the transforms the given
:class:`~jaxq.ptq.plan.Plan` already holds), works layer by layer on what it recorded, and
returns a new plan; :func:`jaxq.ptq.convert` applies it. They compose in order::

    plan = jaxq.ptq.rotate(model, params, rules, batches)
    plan = jaxq.ptq.smoothquant(model, params, rules, batches, plan=plan)   # or awq(...)
    plan = jaxq.ptq.gptq(model, params, rules, batches, plan=plan)
    served = jaxq.ptq.convert(model, params, rules, calibration=batches, plan=plan)

* :func:`rotate`: a random block Hadamard transform ``Q`` (QuaRot / QuIP#-style
  incoherence processing) of each selected layer's input along its contraction, with the
  weight rotated by the same ``Q``; ``(x Qᵀ)(w Qᵀ)ᵀ = x wᵀ``, so the float model is unchanged
  while outliers spread over the block. The activation rotation runs online at serving
  time (``O(K log K)`` per token).
* :func:`smoothquant`: per-channel ``s_k = max|x_k|^α / max|w_k|^(1−α)``.
* :func:`awq`: AWQ's activation-aware scale search, then (optionally) its clipping search.
* :func:`gptq`: GPTQ on each layer's proxy Hessian ``H = 2/T Σ x xᵀ`` of its float inputs.

Smoothing divisors are applied to the activations at serving time (one multiply per
element of the layer's input), unless :func:`jaxq.ptq.fold` folds them into the norm that
produces that input (the layers after one norm then share a divisor: ``groups=``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxq.ops import operand as O
from jaxq.ptq import smoothing
from jaxq.ptq.convert import calibrate, unflatten_stack
from jaxq.ptq.gptq_solver import gptq as gptq_solve
from jaxq.ptq.plan import Plan
from jaxq.ptq.weights import rotation_block, stacked

__all__ = ["rotate", "smoothquant", "awq", "gptq"]


def _layers(model, params, rules, calibration, plan, stats):
    layers, _ = calibrate(model, params, rules, calibration, plan=plan, stats=stats)
    return layers


def _per_call(stack, values):
    """Stacks per-call arrays into the stack's leading axes (unstacked: the one value)."""
    if not stack:
        return values[0]
    return unflatten_stack(stacked(values), stack)


def rotate(model, params, rules, calibration, *, plan: Plan | None = None,
           key: jax.Array | None = None, max_block: int = 256) -> Plan:  # fmt: skip
    """Adds a random block Hadamard rotation to every layer the rules quantize.

    Args:
        model, params, rules, calibration: as for :func:`jaxq.ptq.convert` (one batch is
            enough: it only finds the layers' products).
        plan: the plan to extend (a layer rotated already is an error).
        key: PRNG key of the sign vectors (default ``key(0)``); each layer (and each slice
            of a stacked layer) gets its own.
        max_block: the largest Hadamard block (the block is the largest power of two
            dividing the contraction, up to this).

    Returns:
        The new :class:`Plan`.
    """
    plan = Plan() if plan is None else plan
    key = jax.random.key(0) if key is None else key
    batches = list(calibration)[:1]
    new = Plan(plan)
    for j, (path, run) in enumerate(_layers(model, params, rules, batches, plan, ()).items()):
        lp, calls, stack = plan.layer(path), run.calls, run.stack
        if lp.rotation is not None:
            raise ValueError(f"jaxq.ptq.rotate: layer {path!r} is rotated already")
        if lp.in_scale is not None or lp.weight is not None:
            raise ValueError(f"jaxq.ptq.rotate: layer {path!r} was smoothed or quantized "
                             "already; rotate first")  # fmt: skip
        k = calls[0].w3.shape[-1]
        keys = [jax.random.key_data(jax.random.fold_in(jax.random.fold_in(key, j), i))
                for i in range(len(calls))]  # fmt: skip
        new = new.with_layer(path, rotation=_per_call(stack, keys),
                             rotation_block=rotation_block(k, max_block),
                             algorithm=lp.algorithm + ("rotate",))  # fmt: skip
    return new


def _compose_scale(lp, stack, scales):
    s = _per_call(stack, scales)
    return s if lp.in_scale is None else lp.in_scale * s


def _groups(groups, layers, name) -> dict[str, tuple[str, ...]]:
    """``{path: its group}`` for layers that share their input (and so their divisors)."""
    out = {}
    for g in groups:
        g = tuple(g)
        for p in g:
            if p not in layers:
                raise ValueError(f"jaxq.ptq.{name}: group {g} names {p!r}, which no rule "
                                 "converts (or the batches never reach)")  # fmt: skip
            if p in out:
                raise ValueError(f"jaxq.ptq.{name}: layer {p!r} is in two groups")
            out[p] = g
        runs = [layers[q] for q in g]
        if any(len(r.calls) != len(runs[0].calls) or r.calls[0].w3.shape[-1]
               != runs[0].calls[0].w3.shape[-1] for r in runs):  # fmt: skip
            raise ValueError(f"jaxq.ptq.{name}: the layers of group {g} do not share "
                             "their input (different call counts or input sizes)")  # fmt: skip
    return out


def _group_weight(layers, group, i):
    """The ``(N, K)`` weights of the ``i``-th call of every layer in ``group``, stacked
    along ``N``: a shared divisor sees them as one layer."""
    return jnp.concatenate([layers[p].calls[i].w3.reshape(-1, layers[p].calls[i].w3.shape[-1])
                            for p in group], axis=0)  # fmt: skip


def smoothquant(model, params, rules, calibration, *, alpha: float = 0.5,
                plan: Plan | None = None, groups=()) -> Plan:  # fmt: skip
    """SmoothQuant: per-channel smoothing of each selected layer (module docstring).

    ``groups``: sequences of layer paths that read the same input (the q/k/v projections
    after one norm); each group gets one divisor, from the maxima over all its weights, so
    that :func:`jaxq.ptq.fold` can fold it into the norm.

    Returns:
        The new :class:`Plan` (divisors compose with earlier ones).
    """
    plan = Plan() if plan is None else plan
    new = Plan(plan)
    layers = _layers(model, params, rules, calibration, plan, ("absmax_k",))
    group_of = _groups(groups, layers, "smoothquant")
    shared: dict = {}
    for path, run in layers.items():
        lp, calls, stack, stats = plan.layer(path), run.calls, run.stack, run.stats
        _no_weight_yet(lp, path, "smoothquant")
        scales = []
        for i, (call, st) in enumerate(zip(calls, stats, strict=True)):
            g = group_of.get(path)
            if g is None:
                a = jnp.max(st["absmax_k"], axis=0)
                scales.append(smoothing.smoothquant_scales(
                    a, jnp.max(jnp.abs(call.w3), axis=0), alpha))  # fmt: skip
                continue
            if (g, i) not in shared:  # once per group and call
                a = jnp.max(jnp.stack([jnp.max(layers[p].stats[i]["absmax_k"], axis=0)
                                       for p in g]), axis=0)  # fmt: skip
                shared[g, i] = smoothing.smoothquant_scales(a, _group_weight(layers, g, i),
                                                            alpha)  # fmt: skip
            scales.append(shared[g, i])
        new = new.with_layer(path, in_scale=_compose_scale(lp, stack, scales),
                             algorithm=lp.algorithm + ("smoothquant",))  # fmt: skip
    return new


def awq(model, params, rules, calibration, *, grid: int = 20, clip: bool = True,
        plan: Plan | None = None, max_samples: int = 512, groups=()) -> Plan:  # fmt: skip
    """AWQ: activation-aware scales searched per layer, then optionally the clipping search.

    The search runs on up to ``max_samples`` token rows per layer from the batches. With
    ``clip``, the plan also holds each layer's quantized clipped weight. ``groups`` as for
    :func:`smoothquant`: a group's scale is searched on all its weights at once (the first
    layer's recipe quantizes them), so :func:`jaxq.ptq.fold` can fold it into the norm.
    With ``clip`` the weights are quantized already, so fold needs ``clip=False`` (and
    quantizes them at conversion, or by GPTQ after the fold).
    """
    plan = Plan() if plan is None else plan
    new = Plan(plan)
    layers, _ = calibrate(model, params, rules, calibration, plan=plan, stats=("sample",),
                          max_samples=max_samples)  # fmt: skip
    group_of = _groups(groups, layers, "awq")
    shared: dict = {}
    for path, run in layers.items():
        lp, recipe, calls, stack, stats = (plan.layer(path), run.recipe, run.calls, run.stack,
                                           run.stats)  # fmt: skip
        _no_weight_yet(lp, path, "awq")
        if recipe.rhs is None:
            continue
        scales, weights = [], []
        for i, (call, st) in enumerate(zip(calls, stats, strict=True)):
            x, w = st["sample"][0], call.w3[0]
            g = group_of.get(path)
            if g is None:
                s, _ = smoothing.awq_scales(x, w, recipe.rhs, grid=grid)
            else:
                if (g, i) not in shared:
                    wg = _group_weight(layers, g, i)
                    shared[g, i] = smoothing.awq_scales(x, wg, layers[g[0]].recipe.rhs,
                                                        grid=grid)[0]  # fmt: skip
                s = shared[g, i]
            scales.append(s)
            if clip:
                wc, _ = smoothing.awq_clip(x / s, w * s, recipe.rhs, grid=grid)
                weights.append(O.quantize_operand(wc[None], recipe.rhs, where=path))
        changes = {"in_scale": _compose_scale(lp, stack, scales)}
        if clip:
            changes["weight"] = _per_call(stack, weights)
        new = new.with_layer(path, algorithm=lp.algorithm + ("awq",), **changes)
    return new


def gptq(model, params, rules, calibration, *, damp: float = 0.01, block_size: int = 128,
         act_order: bool = False, plan: Plan | None = None) -> Plan:  # fmt: skip
    """GPTQ on every selected layer: its weight (after the plan's rotation and smoothing)
    is quantized column by column with error compensation on the proxy Hessian of its
    float inputs.

    Returns:
        The new :class:`Plan` holding each layer's quantized weight.
    """
    plan = Plan() if plan is None else plan
    new = Plan(plan)
    for path, run in _layers(model, params, rules, calibration, plan, ("hessian",)).items():
        lp, recipe, calls, stack, stats = (plan.layer(path), run.recipe, run.calls, run.stack,
                                           run.stats)  # fmt: skip
        _no_weight_yet(lp, path, "gptq")
        if recipe.rhs is None:
            continue
        weights = []
        for call, st in zip(calls, stats, strict=True):
            if call.w3.shape[0] != 1:
                raise ValueError(f"jaxq.ptq.gptq: layer {path!r} has a batched weight "
                                 f"{call.kernel_shape}; GPTQ takes plain matrices")  # fmt: skip
            r = gptq_solve(call.w3[0], st["hessian"][0], recipe.rhs, damp=damp,
                           block_size=block_size, act_order=act_order)  # fmt: skip
            weights.append(r.qarray)
        new = new.with_layer(path, weight=_per_call(stack, weights),
                             algorithm=lp.algorithm + ("gptq",))  # fmt: skip
    return new


def _no_weight_yet(lp, path, name):
    if lp.weight is not None:
        raise ValueError(f"jaxq.ptq.{name}: layer {path!r} has a quantized weight already "
                         f"({'+'.join(lp.algorithm)}); run {name} before it")  # fmt: skip
