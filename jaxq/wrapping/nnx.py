"""Wrapping Flax NNX models: module surgery on a copy, recipe state as NNX variables.

:func:`quantize_model` copies the model (``nnx.clone``), finds every ``nnx.Linear``,
``nnx.LinearGeneral`` (so also ``nnx.MultiHeadAttention``'s projections), ``nnx.Einsum``
and ``nnx.Conv``, and gives each layer that a rule selects:

* its recipe (a static attribute) and, if the recipe has state, a :class:`QuantState`
  variable holding the :class:`jaxq.ops.OpState` (stacked over the leading axes of a
  kernel made by ``nnx.vmap``, so ``nnx.scan`` over layers slices it like the weights);
* learned step sizes for ``learned_step`` recipes, one array-valued ``nnx.Param`` per
  operand that learns one (``jaxq_step_lhs``, ``jaxq_step_rhs``; :func:`learned_steps_of`
  reads them), so that ``nnx.Optimizer`` updates them like any weight;
* a subclass of its own class whose ``__call__`` hands the layer's ``dot_general`` /
  ``einsum_op`` / ``conv_general_dilated`` slot the jaxq op with that state for the
  duration of the call. A mixture-of-experts layer takes part by holding its grouped
  matmul in a ``ragged_dot`` attribute (default ``jax.lax.ragged_dot``), the slot that
  :func:`jaxq.ops.ragged_dot` fills. Parameters keep their paths, objects and values; the original
  model is untouched; nothing in jax or flax is patched.

A train step differentiates with respect to ``nnx.Param`` *and* :class:`QuantState`; the
state's "gradient" is what the ops observed, which :func:`update_state` rolls into the
histories (see :mod:`jaxq.recipes.state`). :func:`value_and_grad` does both:

.. code-block:: python

    qmodel = jaxq.quantize_model(model, [jaxq.Rule(".*", recipe=jaxq.recipes.FP8Delayed())])
    optimizer = nnx.Optimizer(qmodel, optax.adamw(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(qmodel, optimizer, x, y):
        loss, grads = jaxq.wrapping.value_and_grad(loss_fn)(qmodel, x, y)  # updates state
        optimizer.update(qmodel, grads)
        return loss
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxq import ops, recipes
from jaxq.ops.spec import OpState, Recipe
from jaxq.wrapping.rules import Rule, match, unused_among

__all__ = ["QuantState", "quantize_nnx", "layers", "learned_steps_of", "value_and_grad",
           "update_state", "unused_rules"]  # fmt: skip


class QuantState(nnx.Variable):
    """An NNX variable holding a wrapped layer's recipe state (:class:`jaxq.ops.OpState`).

    ``nnx.state(model, jaxq.QuantState)`` selects all of them.
    """


_SLOTS = {"dot_general": "dot_general", "einsum": "einsum_op", "conv": "conv_general_dilated",
          "ragged_dot": "ragged_dot"}
_OPS = {"dot_general": ops.dot_general, "einsum": ops.einsum, "conv": ops.conv_general_dilated,
        "ragged_dot": ops.ragged_dot}


def _op_of(module) -> str | None:
    if isinstance(module, nnx.Einsum):
        return "einsum"
    if isinstance(module, nnx.Conv):
        return "conv"
    if isinstance(module, (nnx.Linear, nnx.LinearGeneral)):
        return "dot_general"
    if callable(vars(module).get("ragged_dot")):  # a mixture-of-experts layer's slot
        return "ragged_dot"
    return None


def layers(model: nnx.Module) -> list[tuple[str, nnx.Module, str]]:
    """``(path, layer, op)`` of every layer :func:`quantize_model` can wrap, in graph order."""
    out = []
    for path, node in nnx.iter_graph(model):
        op = _op_of(node) if isinstance(node, nnx.Module) else None
        if op is not None:
            out.append(("/".join(map(str, path)), node, op))
    return out


def _get(v):
    return v.get_value() if hasattr(v, "get_value") else v.value


STEP_ATTRS = {"lhs": "jaxq_step_lhs", "rhs": "jaxq_step_rhs"}


def learned_steps_of(layer) -> dict | None:
    """A wrapped layer's learned step sizes as ``{"lhs": ..., "rhs": ...}`` (``None`` for an
    operand that learns none), or ``None`` when the layer learns no steps.

    Example:
        >>> import jaxq
        >>> from flax import nnx
        >>> q = jaxq.quantize_model(nnx.Linear(64, 8, rngs=nnx.Rngs(0)),
        ...                         [jaxq.Rule(".*", recipe=jaxq.recipes.Int4(block_size=32))])
        >>> steps = learned_steps_of(q)
        >>> steps["lhs"] is None, steps["rhs"].shape  # int4 g32 weights: one step per group
        (True, (1, 8, 2, 1))
    """
    attrs = vars(layer)
    if not any(name in attrs for name in STEP_ATTRS.values()):
        return None
    return {role: _get(attrs[name]) if name in attrs else None
            for role, name in STEP_ATTRS.items()}  # fmt: skip


def _quantized_call(base: type):
    def __call__(self, *args, **kwargs):
        """Runs the layer with its slot bound to the jaxq op, its recipe and its state."""
        op = self.jaxq_op
        slot = _SLOTS[op]
        kw = {"recipe": self.jaxq_recipe}
        if "jaxq_state" in vars(self):
            kw["state"] = _get(self.jaxq_state)
        steps = learned_steps_of(self)
        if steps is not None:
            kw["steps"] = steps
        return call_with(self, base, {slot: functools.partial(_OPS[op], **kw)}, args, kwargs)

    return __call__


def call_with(layer, base: type, replacements: dict, args, kwargs):
    """``base.__call__(layer, ...)`` with some of the layer's attributes replaced for the
    duration of the call (nothing outside the layer changes)."""
    previous = {name: vars(layer)[name] for name in replacements}
    for name, value in replacements.items():
        object.__setattr__(layer, name, value)
    try:
        return base.__call__(layer, *args, **kwargs)
    finally:
        for name, value in previous.items():
            object.__setattr__(layer, name, value)


def subclass(cls: type, prefix: str, call, module: str) -> type:
    """A subclass of a layer's class (same object layout) whose ``__call__`` is ``call``."""
    namespace = {"__call__": call, "__slots__": (), "__module__": module}
    return type(f"{prefix}{cls.__name__}", (cls,), namespace)


@functools.cache
def _quantized_class(cls: type) -> type:
    return subclass(cls, "Quantized", _quantized_call(cls), __name__)


def _contraction(layer, op) -> int | None:
    """The size a block quantizer tiles along the forward contraction, if known."""
    if op == "ragged_dot":
        return None
    k = _get(layer.kernel)
    if isinstance(layer, nnx.Linear):
        return k.shape[-2]
    if isinstance(layer, nnx.LinearGeneral):
        return math.prod(layer.in_features)
    if isinstance(layer, nnx.Einsum):
        ins, out = layer.einsum_str.split("->")
        x_term, k_term = ins.split(",")
        shape = k.shape[k.ndim - len(k_term):]  # without the axes of stacked layers
        return math.prod(d for c, d in zip(k_term, shape, strict=True)
                         if c in x_term and c not in out)  # fmt: skip
    return None


def _stack_shape(layer) -> tuple[int, ...]:
    """Leading axes of a kernel created under ``nnx.vmap`` (layers stacked for scan)."""
    if "kernel" not in vars(layer):
        return ()
    k = _get(layer.kernel)
    if isinstance(layer, nnx.Linear):
        return tuple(k.shape[:-2])
    if isinstance(layer, nnx.Einsum):
        return tuple(k.shape[: k.ndim - len(layer.kernel_shape)])
    return ()


def _check(rule: Rule, recipe: Recipe, layer, op: str, path: str) -> None:
    where = f"quantize_model: layer {path!r} ({type(layer).__name__}) matched rule " \
            f"{rule.module_path!r} with recipe {recipe.name!r}"  # fmt: skip
    slot = _SLOTS[op]
    if op == "dot_general" and getattr(layer, "dot_general_cls", None) is not None:
        raise ValueError(f"{where}: the layer uses dot_general_cls; jaxq fills dot_general")
    if slot not in vars(layer):
        raise ValueError(f"{where}: the layer has no {slot!r} slot to fill")
    if op in ("conv", "ragged_dot"):
        for role, q in recipe.quantizers().items():
            if q is not None and q.granularity not in ("tensor", "row"):
                raise ValueError(
                    f"{where}: {role} granularity {q.granularity!r} has no {op} path "
                    f"({op} takes 'tensor' or, for the weight, 'row')"
                )
        if recipe.learned_step or recipe.hadamard_wgrad:
            raise ValueError(f"{where}: learned steps and Hadamard rotations have no {op} path")
    k = _contraction(layer, op)
    for role in ("lhs", "rhs"):
        q = getattr(recipe, role)
        if q is not None and q.granularity in ("block", "block2d") and k and k % q.block_size:
            raise ValueError(
                f"{where}: {role} block size {q.block_size} does not divide the contraction "
                f"dimension {k} of the kernel {tuple(_get(layer.kernel).shape)}"
            )
    if recipe.learned_step and not isinstance(layer, nnx.Linear):
        raise ValueError(f"{where}: learned step sizes are supported on nnx.Linear layers")


def _init_state(recipe: Recipe, key, stack: tuple[int, ...]):
    if not recipe.needs_key:
        s = recipe.init()
        return None if s is None else jax.tree.map(lambda a: jnp.broadcast_to(a, stack + a.shape),
                                                   s)  # fmt: skip
    n = math.prod(stack)
    keys = jax.random.split(key, max(n, 1))
    s = jax.vmap(recipe.init)(keys)
    return jax.tree.map(lambda a: a.reshape(stack + a.shape[1:]), s)


def _init_steps(recipe: Recipe, layer):
    k = _get(layer.kernel)
    stack = k.shape[:-2]
    # Activation steps start from unit-scale inputs (mean |x| = sqrt(2/pi)).
    x = jnp.full((1, k.shape[-2]), math.sqrt(2 / math.pi), k.dtype)

    def one(kernel):
        return recipes.init_steps(recipe, x, kernel, (((1,), (0,)), ((), ())))

    if not stack:
        steps = one(k)
    else:  # stacked layers (nnx.vmap)
        steps = jax.vmap(one)(k.reshape((-1,) + k.shape[-2:]))
        steps = jax.tree.map(lambda a: a.reshape(stack + a.shape[1:]), steps)
    return {role: s for role, s in steps.items() if s is not None}


def quantize_nnx(model: nnx.Module, rules, *, key: jax.Array | None = None) -> nnx.Module:
    """A copy of an NNX model whose selected layers compute with jaxq recipes.

    Args:
        model: any ``nnx.Module``; it is not modified.
        rules: a sequence of :class:`jaxq.Rule`; the first rule whose regex fully matches a
            layer's path (and op) applies.
        key: PRNG key for recipes that round stochastically or rotate (default key 0).

    Returns:
        The wrapped copy: same parameter tree, plus :class:`QuantState` variables (and
        ``jaxq_step_lhs``/``jaxq_step_rhs`` params for learned steps) on the wrapped layers.

    Raises:
        ValueError: at wrap time, naming the layer path and the reason (a block size that
            does not divide the contraction, a format with no conv path...).

    Example:
        >>> import jax.numpy as jnp, jaxq
        >>> from flax import nnx
        >>> model = nnx.Sequential(nnx.Linear(64, 64, rngs=nnx.Rngs(0)), nnx.relu,
        ...                        nnx.Linear(64, 8, rngs=nnx.Rngs(1)))
        >>> q = jaxq.quantize_model(model, [jaxq.Rule("layers/2", recipe=None),
        ...                                 jaxq.Rule(".*", recipe=jaxq.recipes.FP8Current())])
        >>> [type(layer).__name__ for _, layer, _ in jaxq.wrapping.layers(q)]
        ['QuantizedLinear', 'Linear']
    """
    rules = list(rules)
    for r in rules:
        if not isinstance(r, Rule):
            raise TypeError(f"quantize_model: rules must be jaxq.Rule objects, got {r!r}")
    key = jax.random.key(0) if key is None else key
    model = nnx.clone(model)
    for i, (path, layer, op) in enumerate(layers(model)):
        m = match(rules, path, op)
        if m is None or m[1].recipe is None:
            continue
        rule, recipe = m[1], m[1].recipe
        _check(rule, recipe, layer, op, path)
        object.__setattr__(layer, "__class__", _quantized_class(type(layer)))
        layer.jaxq_op = op
        layer.jaxq_recipe = recipe
        state = _init_state(recipe, jax.random.fold_in(key, i), _stack_shape(layer))
        if state is not None:
            layer.jaxq_state = QuantState(state)
        if recipe.learned_step:
            for role, steps in _init_steps(recipe, layer).items():
                setattr(layer, STEP_ATTRS[role], nnx.Param(steps))
    return model


def unused_rules(model: nnx.Module, rules) -> list[Rule]:
    """The rules that match no layer of ``model`` (the first matching rule takes a layer).

    Example:
        >>> import jaxq
        >>> from flax import nnx
        >>> model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
        >>> jaxq.unused_rules(model, [jaxq.Rule("layers/0"), jaxq.Rule("head")])
        [Rule(module_path='head', op=None, recipe=None)]
    """
    return unused_among(rules, [(p, op) for p, _, op in layers(model)])


def _is_state(x) -> bool:
    return isinstance(x, OpState)


def update_state(model: nnx.Module, observations) -> None:
    """Rolls the observations (the :class:`QuantState` part of a gradient) into the model's
    recipe state, in place (see :func:`jaxq.recipes.update`)."""
    current = nnx.state(model, QuantState)
    new = jax.tree.map(
        lambda s, o: recipes.update(s, o), nnx.to_pure_dict(current),
        nnx.to_pure_dict(observations), is_leaf=_is_state,
    )  # fmt: skip
    nnx.replace_by_pure_dict(current, new)
    nnx.update(model, current)


def value_and_grad(loss_fn, *, has_aux: bool = False, update: bool = True):
    """``nnx.value_and_grad`` of ``loss_fn(model, *args)`` for a wrapped model.

    Returns ``f(model, *args) -> (value, grads)`` with ``grads`` the ``nnx.Param``
    gradients (ready for ``nnx.Optimizer.update``); the model's recipe state is updated
    in place from what the ops observed in this call.

    With ``update=False`` the state is left as it is and ``f`` returns ``(value, grads,
    observations)``: for gradient accumulation, combine the microbatches' observations
    with :func:`jaxq.recipes.merge` and apply them once per optimizer step with
    :func:`update_state`, so the history records the maximum over all microbatches and
    every microbatch of a step uses the same scales:

    .. code-block:: python

        vg = jaxq.wrapping.value_and_grad(loss_fn, update=False)
        optimizer = nnx.Optimizer(qmodel, optax.MultiSteps(tx, k), wrt=nnx.Param)
        seen = None
        for x in microbatches:
            loss, grads, obs = vg(qmodel, x)
            optimizer.update(qmodel, grads)
            seen = obs if seen is None else jaxq.recipes.merge(seen, obs)
        jaxq.wrapping.update_state(qmodel, seen)
    """
    diff = nnx.DiffState(0, nnx.Any(nnx.Param, QuantState))
    vg = nnx.value_and_grad(loss_fn, argnums=diff, has_aux=has_aux)

    def wrapped(model, *args, **kwargs):
        value, grads = vg(model, *args, **kwargs)
        param_grads, observations = nnx.split_state(grads, nnx.Param, QuantState)
        if not update:
            return value, param_grads, observations
        update_state(model, observations)
        return value, param_grads

    return wrapped
