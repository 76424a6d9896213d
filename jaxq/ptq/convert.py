"""``jaxq.ptq.convert``: a trained Flax model → a serving model with packed weights.

For every layer that a rule selects (first matching :class:`jaxq.Rule`, as in
:func:`jaxq.quantize_model`), the kernel is quantized once with the rule's recipe's ``rhs``
quantizer, in the canonical orientation of the layer's product, and stored packed (two
4-bit codes per byte along the contraction); activations are quantized at serving time by
the recipe's ``lhs`` quantizer, with a static scale calibrated on the given batches where
that quantizer's scaling is ``"delayed"``. Serving then computes exactly the forward pass
of the same recipe: ``Q_a(x) · Q_w(w)`` through the same quantizers and the same matmul
dispatch, so the converted model's output equals the quantization-aware forward of
:func:`jaxq.quantize_model` with the same rules (and the calibrated amax as the
activation history) bit for bit.

Layers that match no rule, or a rule with ``recipe=None``, stay in float and are listed in
the result. Convolutions and ``ragged_dot`` (mixture-of-experts) layers have no serving
path yet: they stay in float and are listed too.
"""

from __future__ import annotations

import math
import typing

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxq.ops import operand as O
from jaxq.ops.spec import Recipe
from jaxq.ptq import serving as S
from jaxq.ptq.calibrate import Recorder, finalize
from jaxq.ptq.plan import LayerPlan, Plan
from jaxq.ptq.weights import QuantizedWeight, lsq_weight, stacked
from jaxq.wrapping.rules import Rule, match

__all__ = ["convert", "Converted", "calibrate", "calibration_batches", "check_rules",
           "calibrates_activations"]  # fmt: skip


class Converted(typing.NamedTuple):
    """What :func:`convert` returns.

    Attributes:
        model: the serving model (NNX: the module; Linen: a module whose ``apply`` takes
            ``params``).
        params: the serving variables (NNX: ``nnx.state(model)``; Linen: the variables
            dict with :class:`QuantizedWeight` kernels).
        float_layers: paths of the layers kept in float (no rule, ``recipe=None``, or no
            serving path), in call order.
    """

    model: typing.Any
    params: typing.Any
    float_layers: tuple[str, ...]


def calibration_batches(calibration, where: str = "jaxq.ptq.convert") -> list[tuple]:
    """The calibration batches as a list of argument tuples, checked: every argument an
    array, every batch with the arguments of the first (only the leading axis may differ).
    ``where`` names the caller in the errors. ``None`` gives no batches.

    Example:
        >>> import numpy as np
        >>> [len(b) for b in calibration_batches([np.zeros((2, 3)), (np.ones((5, 3)),)])]
        [1, 1]
    """
    if calibration is None:
        return []
    out = []
    for i, b in enumerate(calibration):
        b = tuple(b) if isinstance(b, (tuple, list)) else (b,)
        for j, x in enumerate(b):
            if not hasattr(x, "shape") or not hasattr(x, "dtype"):
                raise TypeError(f"{where}: calibration batch {i} argument {j} is {type(x)!r}; "
                                "batches are arrays or tuples of arrays")  # fmt: skip
        if out:
            first = out[0]
            if len(b) != len(first) or any(
                x.ndim != y.ndim or x.shape[1:] != y.shape[1:] or x.dtype != y.dtype
                for x, y in zip(b, first, strict=False)
            ):
                got = [(tuple(x.shape), str(x.dtype)) for x in b]
                want = [(tuple(x.shape), str(x.dtype)) for x in first]
                raise ValueError(f"{where}: calibration batch {i} has arguments {got}; batch 0 "
                                 f"had {want} (only the first axis may differ)")  # fmt: skip
        out.append(b)
    return out


def check_rules(rules) -> tuple[Rule, ...]:
    """``rules`` as a tuple, each one a :class:`jaxq.Rule` (else ``TypeError``)."""
    rules = tuple(rules)
    for r in rules:
        if not isinstance(r, Rule):
            raise TypeError(f"jaxq.ptq: rules must be jaxq.Rule objects, got {r!r}")
    return rules


def calibrates_activations(recipe: Recipe) -> bool:
    """Whether serving ``recipe`` needs a calibrated (static) activation scale."""
    return recipe.lhs is not None and recipe.lhs.scaling == "delayed"


class LayerRun(typing.NamedTuple):
    """What :func:`calibrate` found for one converted layer."""

    rule: Rule
    recipe: Recipe
    calls: list
    stack: tuple[int, ...]
    stats: list
    steps: typing.Any = None


def _check_recipe(recipe: Recipe, path: str, steps) -> None:
    where = f"jaxq.ptq: layer {path!r} with recipe {recipe.name!r}"
    if recipe.learned_step and steps is None:
        raise ValueError(f"{where}: the recipe learns its step sizes, but the layer has none; "
                         "convert the model jaxq.quantize_model returned after training "
                         "(its learned steps become the serving scales)")  # fmt: skip
    if recipe.lhs is not None and recipe.lhs.rounding == "stochastic":
        raise ValueError(f"{where}: serving does not round activations stochastically")


def _index(i: int, stack: tuple[int, ...]):
    return tuple(int(j) for j in np.unravel_index(i, stack)) if stack else ()


def _slice(tree, idx):
    return tree if not idx else jax.tree.map(lambda a: a[idx], tree)


def layer_transforms(lp: LayerPlan, stack: tuple[int, ...]):
    """``i -> (x_transform, w_transform)`` of a layer's plan, for its ``i``-th call."""

    def at(i):
        if lp.in_scale is None and lp.rotation is None:
            return None, None
        idx = _index(i, stack)
        probe = QuantizedWeight(
            None, None, _slice(lp.in_scale, idx), _slice(lp.rotation, idx),
            rotation_block=lp.rotation_block,
        )  # fmt: skip
        return probe.transform_input, probe.transform_weight

    return at


def _nnx_stack(layer, kernel_ndim: int) -> tuple[int, ...]:
    k = S.wn._get(vars(layer)["kernel"])
    return tuple(k.shape[: k.ndim - kernel_ndim])


def _linen_kernel(variables, path: str):
    node = variables["params"]
    for part in path.split("/") if path else []:
        node = node[part]
    return node["kernel"]


def calibrate(model, params, rules, calibration, *, plan: Plan | None = None,
              stats=("amax",), max_samples: int = 512):  # fmt: skip
    """Runs the float model over the batches and returns, per converted layer, a
    :class:`LayerRun` (its ``stats`` holds one dict of finalized statistics per call, see
    :mod:`jaxq.ptq.calibrate`), and the ``(path, op)`` of every layer the batches reached.

    This is the run every algorithm and :func:`convert` start from.
    """
    rules = check_rules(rules)
    plan = Plan() if plan is None else plan
    batches = calibration_batches(calibration)
    nnx_model = isinstance(model, nnx.Module)
    if not nnx_model and not isinstance(model, nn.Module):
        raise TypeError(f"jaxq.ptq: model must be a Flax NNX or Linen module, got {model!r}")
    _reject_converted(model, params)
    want, transforms, stacks = {}, {}, {}
    steps = S.learned_steps(model, params)

    def plan_for(path, op, stack):
        m = match(rules, path, op)
        recipe = None if m is None else m[1].recipe
        if recipe is not None:
            _check_recipe(recipe, path, steps.get(path))
            names = tuple(s for s in stats if s != "amax" or calibrates_activations(recipe))
            want[path] = (recipe.lhs, names)
        transforms[path] = layer_transforms(plan.layer(path), stack)
        stacks[path] = stack
        return recipe

    recorder = Recorder(want, transforms, max_samples)
    if nnx_model:
        if params is not None:
            raise TypeError("jaxq.ptq: an NNX model holds its parameters; pass params=None")
        for path, layer, op in S.nnx_layers(model):
            nd = _layer_kernel_ndim(layer, op)
            plan_for(path, op, _nnx_stack(layer, nd))
        if not batches:
            _no_batches(model, rules)
        S.calibrate_nnx(model, recorder, batches)
    else:
        if not batches:
            raise ValueError("jaxq.ptq: Linen models need calibration batches (the layers and "
                             "their products are found by running the model)")  # fmt: skip
        # Stacks are known once a layer has been called: record first, then plan.
        probe = Recorder({}, {}, 0)
        S.calibrate_linen(model, params, probe, batches[:1])
        for path in probe.calls:
            kernel = _linen_kernel(params, path)
            nd = len(probe.calls[path][0].kernel_shape)
            stack = tuple(jnp.shape(kernel)[: jnp.ndim(kernel) - nd])
            plan_for(path, probe.ops[path], stack)
        S.calibrate_linen(model, params, recorder, batches)
    missed = [p for p in want if p not in recorder.calls]
    if missed:
        raise ValueError(f"jaxq.ptq: the calibration batches never reach the layers {missed}, "
                         "which rules select for conversion")  # fmt: skip
    out = {}
    for path, calls in recorder.calls.items():
        op = recorder.ops[path]
        m = match(rules, path, op)
        recipe = None if m is None else m[1].recipe
        if recipe is None:
            continue
        stack = stacks[path]
        n = math.prod(stack)
        if stack and len(calls) != n:
            raise ValueError(f"jaxq.ptq: stacked layer {path!r} has {n} slices but was called "
                             f"{len(calls)} times per batch")  # fmt: skip
        if not stack and len(calls) > 1:  # a shared layer: merge its calls
            calls = [_merge(calls)]
        stats_ = [finalize(c, recipe.lhs) for c in calls]
        out[path] = LayerRun(m[1], recipe, calls, stack, stats_,
                             steps.get(path) if recipe.learned_step else None)  # fmt: skip
    reached = [(p, recorder.ops[p]) for p in recorder.calls]
    if nnx_model:
        recorder.unserved.update({p: op for p, _, op in S.wn.layers(model) if op not in S._SLOTS})
    reached += [(p, op) for p, op in recorder.unserved.items() if p not in recorder.calls]
    return out, reached


def _merge(calls):
    first = calls[0]
    for c in calls[1:]:
        for k, v in c.stats.items():
            if k == "amax":
                first.stats[k] = first.stats[k] + v
            elif k == "absmax_k":
                first.stats[k] = jnp.maximum(first.stats[k], v)
            elif k == "sample":
                first.stats[k] = jnp.concatenate([first.stats[k], v], axis=1)
            else:
                first.stats[k] = first.stats[k] + v
    return first


def _layer_kernel_ndim(layer, op) -> int:
    if isinstance(layer, nnx.Linear):
        return 2
    if isinstance(layer, nnx.Einsum):
        return len(layer.kernel_shape)
    return S.wn._get(vars(layer)["kernel"]).ndim  # LinearGeneral keeps its full shape


def _no_batches(model, rules):
    for path, _, op in S.nnx_layers(model):
        m = match(rules, path, op)
        if m is not None and m[1].recipe is not None:
            raise ValueError("jaxq.ptq.convert: calibration batches are required: the layers' "
                             "products (and static activation scales) are found by running "
                             "the model on them")  # fmt: skip


def _reject_converted(model, params) -> None:
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    converted = any(isinstance(x, QuantizedWeight) for x in leaves)
    if isinstance(model, nnx.Module):
        converted = converted or any(S.is_serving(layer) for _, layer, _ in S.wn.layers(model))
    else:
        converted = converted or getattr(type(model), "jaxq_serving", False)
    if converted:
        raise ValueError("jaxq.ptq: this model is already converted for serving (its layers "
                         "hold packed weights); convert the float model instead")  # fmt: skip


def quantize_weight(recipe: Recipe, call, stats: dict, lp: LayerPlan, idx, path: str,
                    steps=None):  # fmt: skip
    """The :class:`QuantizedWeight` of one call of a layer."""
    w3 = call.w3
    steps = None if steps is None else _slice(steps, idx)
    act_step = None if steps is None else steps.get("lhs")
    if steps is not None:
        if lp.weight is not None or lp.in_scale is not None or lp.rotation is not None:
            raise ValueError(f"jaxq.ptq: layer {path!r} has learned steps; the algorithms "
                             "do not apply to it")  # fmt: skip
        wq = w3 if recipe.rhs is None else lsq_weight(w3, recipe.rhs, steps["rhs"])
    elif lp.weight is not None:
        wq = _slice(lp.weight, idx)
    elif recipe.rhs is None:
        wq = w3
    else:
        q = recipe.rhs
        amax = O.observe_amax(w3) if q.scaling == "delayed" else None
        wq = O.quantize_operand(w3, q, amax=amax, where=f"jaxq.ptq layer {path!r} weight")
    amax = None
    if calibrates_activations(recipe) and act_step is None:
        amax = jnp.asarray(stats["amax"], jnp.float32)
    return QuantizedWeight(
        wq, amax, _slice(lp.in_scale, idx), _slice(lp.rotation, idx), act_step, path=path,
        recipe=recipe, kernel_shape=call.kernel_shape, kernel_dtype=np.dtype(call.kernel_dtype),
        dimension_numbers=call.dims, rotation_block=lp.rotation_block,
    )  # fmt: skip


def convert(model, params, rules, *, calibration=None, plan: Plan | None = None) -> Converted:
    """Converts a float Flax model into a serving model with packed quantized weights.

    Args:
        model: an ``nnx.Module`` (with its parameters; pass ``params=None``) or a Linen
            module (with ``params``, its variables dict).
        params: ``None`` for NNX; the Linen variables (``{"params": ...}``).
        rules: :class:`jaxq.Rule` list; the recipes come from :mod:`jaxq.ptq.schemes`
            (``W4(128)``, ``W8A8("e4m3")``...) or :mod:`jaxq.recipes`.
        calibration: an iterable of batches (each an array or a tuple of positional
            arguments of the model's call). Every converted layer must be reached by them;
            static activation scales are calibrated on them.
        plan: the result of :func:`rotate` / :func:`smoothquant` / :func:`awq` /
            :func:`gptq` (default: plain round-to-nearest).

    Returns:
        :class:`Converted` ``(model, params, float_layers)``.

    Raises:
        ValueError: an already-converted model; calibration batches that disagree with
            each other or with a layer (naming the layer); a recipe with no serving form.
        TypeError: a model that is not Flax, or batches that are not arrays.

    Example:
        >>> import jax, jax.numpy as jnp, jaxq
        >>> from flax import nnx
        >>> model = nnx.Sequential(nnx.Linear(64, 128, rngs=nnx.Rngs(0)), nnx.relu,
        ...                        nnx.Linear(128, 8, rngs=nnx.Rngs(1)))
        >>> x = jax.random.normal(jax.random.key(0), (16, 64))
        >>> out = jaxq.ptq.convert(model, None, [jaxq.Rule("layers/0", recipe=jaxq.ptq.W4(32))],
        ...                        calibration=[x])
        >>> out.float_layers
        ('layers/2',)
        >>> bool(jnp.allclose(out.model(x), model(x), atol=0.2))
        True
    """
    plan = Plan() if plan is None else plan
    layers, reached = calibrate(model, params, rules, calibration, plan=plan)
    weights = {}
    for path, run in layers.items():
        lp, stack = plan.layer(path), run.stack
        per_call = [quantize_weight(run.recipe, c, s, lp, _index(i, stack), path, run.steps)
                    for i, (c, s) in enumerate(zip(run.calls, run.stats, strict=True))]  # fmt: skip
        if stack:
            qw = unflatten_stack(stacked(per_call), stack)
        else:
            qw = per_call[0]
        weights[path] = qw
    float_layers = tuple(p for p, _ in reached if p not in weights)
    if isinstance(model, nnx.Module):
        serving = S.unwrap_nnx(nnx.clone(model))
        for path, layer, op in S.nnx_layers(serving):
            if path in weights:
                qw = weights[path]
                k = S.wn._get(vars(layer)["kernel"])
                stack = layers[path].stack
                S.serve_nnx(layer, op, qw, k.shape[len(stack):])
        return Converted(serving, nnx.state(serving), float_layers)
    new_params = _replace_kernels(params, weights)
    serving = S.serving_linen(S.plain_linen_class(model))(**S.linen_fields(model))
    return Converted(serving, new_params, float_layers)


def unflatten_stack(tree, stack: tuple[int, ...]):
    """Reshapes the leading axis of every leaf (one entry per call) to ``stack``."""
    return jax.tree.map(lambda a: a.reshape(stack + a.shape[1:]), tree)


def _strip_qat(node):
    """A Linen params tree without the learned steps a QAT wrapper added."""
    if not hasattr(node, "items"):
        return node
    return {k: _strip_qat(v) for k, v in node.items() if k != "jaxq_steps"}


def _replace_kernels(variables, weights: dict):
    out = {k: v for k, v in variables.items() if k != S.wl.COLLECTION}
    out["params"] = _strip_qat(out["params"])

    def put(node, parts, qw):
        node = dict(node)
        if not parts:
            node["kernel"] = qw
            return node
        node[parts[0]] = put(node[parts[0]], parts[1:], qw)
        return node

    params = out["params"]
    for path, qw in weights.items():
        params = put(params, path.split("/") if path else [], qw)
    out["params"] = params
    return out
