"""Wrapping Flax Linen models: ``nn.intercept_methods`` fills each layer's op slot.

:func:`quantize_linen` returns a copy of the root module of a subclass whose ``__call__``
runs the original under ``nn.intercept_methods`` (a thread-local interceptor stack, so
code outside the wrapped model is untouched). When a ``Dense``, ``DenseGeneral``,
``Einsum`` or ``Conv`` is called, the interceptor finds the first rule matching its path
(``"/".join(module.path)``) and, for that call only, fills the layer's ``dot_general`` /
``conv_general_dilated`` slot with a jaxq op (``MultiHeadDotProductAttention``'s
projections are ``DenseGeneral``). Linen's ``Einsum`` calls ``jnp.einsum`` with no slot to
fill: its call is computed by jaxq from the layer's public fields, with the same
parameters, promotion and bias. The op runs
inside the layer's own compact method, so it can keep its state where Flax keeps state:

* recipe state (:class:`jaxq.ops.OpState`) in the collection ``"jaxq"`` at the layer's
  scope (made by ``init``, then threaded by the user like ``batch_stats``); under
  ``nn.scan`` add ``"jaxq": 0`` to ``variable_axes``;
* learned step sizes as the param ``"jaxq_steps"`` at the layer's scope.

The ``params`` tree is otherwise unchanged, so float checkpoints load as they are. The
state's "gradient" is what the ops observed: differentiate the loss with respect to
``variables["jaxq"]`` and roll it in with :func:`jaxq.recipes.update`.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxq import ops, recipes
from jaxq.ops.einsum import _parse as _parse_einsum
from jaxq.ops.einsum import einsum_with
from jaxq.wrapping.rules import Rule, match

__all__ = ["quantize_linen", "COLLECTION"]

COLLECTION = "jaxq"
_SLOT = {nn.Conv: "conv", nn.DenseGeneral: "dot_general", nn.Dense: "dot_general",
         nn.Einsum: "einsum"}


def _op_of(module) -> str | None:
    for cls, op in _SLOT.items():
        if isinstance(module, cls):
            return op
    fields = getattr(module, "__dataclass_fields__", {})
    if "ragged_dot" in fields and callable(getattr(module, "ragged_dot", None)):
        return "ragged_dot"  # a mixture-of-experts layer's slot
    return None


class _Bound:
    """The op a layer's slot gets for one call: creates/reads the layer's jaxq variables."""

    def __init__(self, module, recipe, op, key):
        self.module, self.recipe, self.op, self.key = module, recipe, op, key

    def _state(self):
        r = self.recipe
        if not (r.delayed_roles or r.needs_key):  # what makes Recipe.init return a state
            return None
        v = self.module.variable(COLLECTION, "state",
                                 lambda: r.init(self.key if r.needs_key else None))  # fmt: skip
        return v.value

    def _steps(self, lhs, rhs, dn):
        if not self.recipe.learned_step:
            return None
        def init(_):
            return recipes.init_steps(self.recipe, lhs, rhs, dn)

        return self.module.param("jaxq_steps", init)

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                 **kwargs):  # fmt: skip
        if self.op == "conv":
            raise AssertionError("conv layers use conv()")
        steps = self._steps(lhs, rhs, dimension_numbers)
        return ops.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                               recipe=self.recipe, state=self._state(), steps=steps)  # fmt: skip

    def ragged(self, lhs, rhs, group_sizes, *args, **kwargs):
        return ops.ragged_dot(lhs, rhs, group_sizes, *args, **kwargs, recipe=self.recipe,
                              state=self._state())  # fmt: skip

    def conv(self, lhs, rhs, *args, **kwargs):
        return ops.conv_general_dilated(lhs, rhs, *args, **kwargs, recipe=self.recipe,
                                        state=self._state())  # fmt: skip


def _einsum(module: nn.Einsum, bound: _Bound, inputs, einsum_str=None):
    """``nn.Einsum.__call__`` with its product through ``bound`` (Linen's Einsum calls
    ``jnp.einsum`` directly, so it has no slot): the same parameters (names, shapes,
    initializers), dtype promotion and bias broadcasting, from the layer's public fields."""
    if (module.einsum_str is None) == (einsum_str is None):
        raise ValueError("nn.Einsum needs einsum_str either as a field or as a call argument")
    spec = (module.einsum_str if einsum_str is None else einsum_str).replace(" ", "")
    if "->" not in spec or spec.count(",") != 1:
        raise ValueError(f"nn.Einsum einsum_str {spec!r} must be explicit with two operands")
    kernel = module.param("kernel", module.kernel_init, module.shape, module.param_dtype)
    bias = broadcast = None
    if module.use_bias:
        a, b, out = _parse_einsum(spec, jnp.ndim(inputs), len(module.shape))
        features = [c for c in b if c in out]
        shape = tuple(module.shape[b.index(c)] for c in features)
        broadcast = tuple(module.shape[b.index(c)] if c in features else 1 for c in out)
        bias = module.param("bias", module.bias_init, shape, module.param_dtype)
    inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
    y = einsum_with(bound, spec, inputs, kernel, precision=module.precision,
                    preferred_element_type=module.preferred_element_type)  # fmt: skip
    if bias is not None:
        y = y + jnp.reshape(bias, broadcast)
    return y


@dataclasses.dataclass(frozen=True)
class _Interceptor:
    rules: tuple[Rule, ...]
    key: jax.Array

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        op = _op_of(module)
        if op is None or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = "/".join(map(str, module.path))
        m = match(self.rules, path, op)
        if m is None or m[1].recipe is None:
            return next_fun(*args, **kwargs)
        recipe = m[1].recipe
        key = jax.random.fold_in(self.key, zlib.crc32(path.encode()) % (2**31))
        bound = _Bound(module, recipe, op, key)
        if op == "einsum":
            return _einsum(module, bound, *args, **kwargs)
        slot = {"conv": "conv_general_dilated", "ragged_dot": "ragged_dot"}.get(op, "dot_general")
        fill = {"conv": bound.conv, "ragged_dot": bound.ragged}.get(op, bound)
        if getattr(module, "dot_general_cls", None) is not None:
            raise ValueError(f"quantize_model: layer {path!r} uses dot_general_cls; "
                             "jaxq fills dot_general")  # fmt: skip
        previous = getattr(module, slot)
        object.__setattr__(module, slot, fill)
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(module, slot, previous)


def quantize_linen(module: nn.Module, rules, *, key: jax.Array | None = None) -> nn.Module:
    """A Linen module with the same ``init``/``apply`` whose selected layers run jaxq ops.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxq
        >>> model = nn.Dense(32)
        >>> q = jaxq.quantize_model(model, [jaxq.Rule(".*", recipe=jaxq.recipes.FP8Delayed())])
        >>> v = q.init(jax.random.key(0), jnp.ones((2, 64)))
        >>> sorted(v), v["jaxq"]["state"].lhs_history.shape
        (['jaxq', 'params'], (1024,))
    """
    rules = tuple(rules)
    for r in rules:
        if not isinstance(r, Rule):
            raise TypeError(f"quantize_model: rules must be jaxq.Rule objects, got {r!r}")
    interceptor = _Interceptor(rules, jax.random.key(0) if key is None else key)
    cls = type(module)
    return _quantized_root(cls)(**_fields(module), jaxq_interceptor=interceptor)


def _fields(module) -> dict:
    return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
            if f.init and f.name not in ("parent", "name")}  # fmt: skip


@functools.cache
def _quantized_root(cls: type) -> type:
    def __call__(self, *args, **kwargs):
        with nn.intercept_methods(self.jaxq_interceptor):
            return cls.__call__(self, *args, **kwargs)

    namespace = {
        "__call__": __call__,
        "__module__": __name__,
        "__annotations__": {"jaxq_interceptor": _Interceptor},
        "jaxq_interceptor": None,
    }
    return type(f"Quantized{cls.__name__}", (cls,), namespace)
