"""Serving models for Flax NNX and Linen, and the calibration runs that precede them.

A serving model is the float model whose converted layers hold a
:class:`~jaxq.ptq.weights.QuantizedWeight` instead of their kernel and compute with
:func:`~jaxq.ptq.weights.serving_dot_general`. The layer's own code runs unchanged: for the
duration of a call its kernel is replaced by a placeholder of the kernel's shape (zeros,
dead code under ``jit``: nothing but the packed weight reaches the product) and its
``dot_general`` / ``einsum_op`` slot by the serving product.

* NNX: the layer's class becomes a subclass (same object layout) whose ``__call__`` does
  the above; the weight is a :class:`PackedKernel` variable under the kernel's name, so
  ``nnx.state`` / orbax see codes and scales, and ``nnx.scan`` slices stacked layers.
* Linen: the serving module's ``apply`` takes variables whose converted kernels are
  ``QuantizedWeight`` leaves; it moves each one to ``jaxq_kernel`` beside a placeholder
  ``kernel`` (so ``nn.scan`` slices it with the params) and runs the module under
  ``nn.intercept_methods``, which fills the layers' ``dot_general`` slots.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxq.ops.einsum import einsum_with
from jaxq.ptq.weights import QuantizedWeight, serving_dot_general
from jaxq.wrapping import linen as wl
from jaxq.wrapping import nnx as wn

__all__ = ["PackedKernel", "nnx_layers", "serve_nnx", "ServingInterceptor", "serving_linen",
           "is_serving"]  # fmt: skip

_SLOTS = {"dot_general": "dot_general", "einsum": "einsum_op"}
JAXQ_KERNEL = "jaxq_kernel"


class PackedKernel(nnx.Variable):
    """An NNX variable holding a converted layer's :class:`QuantizedWeight`."""


def _placeholder(qw: QuantizedWeight, shape) -> jax.Array:
    return jnp.zeros(shape, qw.kernel_dtype)


def _slot_fn(op: str, qw: QuantizedWeight):
    dot = functools.partial(serving_dot_general, weight=qw)
    if op == "dot_general":
        return dot

    def einsum_op(subscripts, lhs, rhs, precision=None, preferred_element_type=None, **_):
        return einsum_with(dot, subscripts, lhs, rhs, precision=precision,
                           preferred_element_type=preferred_element_type)  # fmt: skip

    return einsum_op


# ---------------------------------------------------------------------------- NNX


def nnx_layers(model: nnx.Module):
    """``(path, layer, op)`` of the NNX layers conversion handles (dense and einsum)."""
    return [(p, layer, op) for p, layer, op in wn.layers(model) if op in _SLOTS]


def _serving_call(base: type):
    def __call__(self, *args, **kwargs):
        """Runs the layer on its packed weight (module docstring)."""
        qw = wn._get(vars(self)["kernel"])
        slot = _SLOTS[self.jaxq_op]
        placeholder = nnx.Param(_placeholder(qw, self.jaxq_param_shape))
        replacements = {"kernel": placeholder, slot: _slot_fn(self.jaxq_op, qw)}
        return wn.call_with(self, base, replacements, args, kwargs)

    return __call__


@functools.cache
def _serving_class(cls: type) -> type:
    return wn.subclass(cls, "Serving", _serving_call(cls), __name__)


def is_serving(layer) -> bool:
    return type(layer).__name__.startswith("Serving") and type(layer).__module__ == __name__


_QAT_ATTRS = ("jaxq_op", "jaxq_recipe", "jaxq_state", *wn.STEP_ATTRS.values())


def unwrap_nnx(model: nnx.Module) -> nnx.Module:
    """Gives the layers of a model made by :func:`jaxq.quantize_model` (a clone) back
    their own class, without recipe state or learned steps; returns the model."""
    for _, layer, _ in wn.layers(model):
        if type(layer).__module__ == wn.__name__:
            object.__setattr__(layer, "__class__", type(layer).__mro__[1])
            for name in _QAT_ATTRS:
                if name in vars(layer):
                    delattr(layer, name)
    return model


def learned_steps(model, params) -> dict:
    """``{path: steps}`` of the layers with learned step sizes (QAT with LSQ)."""
    out = {}
    if isinstance(model, nnx.Module):
        for path, layer, _ in wn.layers(model):
            steps = wn.learned_steps_of(layer)
            if steps is not None:
                out[path] = steps
        return out

    def walk(node, prefix):
        if not hasattr(node, "items"):
            return
        for k, v in node.items():
            if k == "jaxq_steps":
                out["/".join(prefix)] = v
            else:
                walk(v, prefix + [str(k)])

    walk((params or {}).get("params", {}), [])
    return out


def serve_nnx(layer: nnx.Module, op: str, qw: QuantizedWeight, param_shape) -> None:
    """Turns one NNX layer (in a clone) into its serving form, in place."""
    object.__setattr__(layer, "__class__", _serving_class(type(layer)))
    layer.jaxq_op = op
    layer.jaxq_param_shape = tuple(param_shape)
    layer.kernel = PackedKernel(qw)


def calibrate_nnx(model: nnx.Module, recorder, batches) -> None:
    """Calls a clone of ``model`` on each batch with the recorder's products in its slots."""
    clone = unwrap_nnx(nnx.clone(model))
    for path, layer, op in nnx_layers(clone):
        fn = recorder.dot(path) if op == "dot_general" else recorder.einsum(path)
        object.__setattr__(layer, _SLOTS[op], fn)
    with jax.disable_jit():
        for batch in batches:
            recorder.start_batch()
            clone(*batch)


# --------------------------------------------------------------------------- Linen


def _linen_op(module) -> str | None:
    op = wl._op_of(module)
    return op if op in _SLOTS else None


def _linen_call(module, op, dot, next_fun, args, kwargs):
    """Runs a Linen layer with ``dot`` as its product (Einsum through jaxq's own call)."""
    if op == "einsum":
        return wl._einsum(module, dot, *args, **kwargs)
    return _with_slot(module, dot, next_fun, args, kwargs)


@dataclasses.dataclass(frozen=True)
class _RecordingInterceptor:
    recorder: object

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and wl._op_of(module) not in (None, *_SLOTS):
            self.recorder.unserved["/".join(map(str, module.path))] = wl._op_of(module)
        if _linen_op(module) is None or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path, op = "/".join(map(str, module.path)), _linen_op(module)
        return _linen_call(module, op, self.recorder.dot(path, op), next_fun, args, kwargs)


def _with_slot(module, fn, next_fun, args, kwargs):
    if getattr(module, "dot_general_cls", None) is not None:
        path = "/".join(map(str, module.path))
        raise ValueError(f"jaxq.ptq: layer {path!r} uses dot_general_cls; jaxq fills "
                         "dot_general")  # fmt: skip
    previous = module.dot_general
    object.__setattr__(module, "dot_general", fn)
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(module, "dot_general", previous)


def plain_linen_class(module: nn.Module) -> type:
    """The module's class, or the class :func:`jaxq.quantize_model` wrapped."""
    cls = type(module)
    return cls.__mro__[1] if cls.__module__ == wl.__name__ else cls


def linen_fields(module: nn.Module) -> dict:
    """The constructor fields of a Linen module (without a QAT wrapper's interceptor)."""
    return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
            if f.init and f.name not in ("parent", "name", "jaxq_interceptor")}  # fmt: skip


def calibrate_linen(module: nn.Module, variables, recorder, batches) -> None:
    module = plain_linen_class(module)(**linen_fields(module))
    variables = {k: v for k, v in variables.items() if k != wl.COLLECTION}
    interceptor = _RecordingInterceptor(recorder)
    with jax.disable_jit():
        for batch in batches:
            recorder.start_batch()
            with nn.intercept_methods(interceptor):
                module.apply(variables, *batch)


@dataclasses.dataclass(frozen=True)
class ServingInterceptor:
    """Fills the slot of every Linen layer that holds a ``jaxq_kernel``."""

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        if _linen_op(module) is None or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if not module.has_variable("params", JAXQ_KERNEL):
            return next_fun(*args, **kwargs)
        qw = module.get_variable("params", JAXQ_KERNEL)
        dot = _slot_fn("dot_general", qw)
        return _linen_call(module, _linen_op(module), dot, next_fun, args, kwargs)


def _split_serving(tree):
    """Variables with each ``kernel: QuantizedWeight`` replaced by a placeholder and moved
    to ``jaxq_kernel``."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        out = {}
        for k, v in tree.items():
            if k == "kernel" and isinstance(v, QuantizedWeight):
                stack = _stack_of(v)
                out[k] = _placeholder(v, stack + tuple(v.kernel_shape))
                out[JAXQ_KERNEL] = v
            else:
                out[k] = _split_serving(v)
        return out
    return tree


def _stack_of(qw: QuantizedWeight) -> tuple[int, ...]:
    """Leading axes a stacked (scanned) weight has beyond its per-layer shape."""
    w = qw.weight
    ref = w.codes if hasattr(w, "codes") else w
    per_layer = w.expected_codes_shape() if hasattr(w, "codes") else None
    nd = len(per_layer) if per_layer is not None else 3
    return tuple(ref.shape[: ref.ndim - nd])


@functools.cache
def serving_linen(cls: type) -> type:
    """The serving subclass of a Linen module class (``apply`` takes packed variables)."""

    def apply(self, variables, *args, **kwargs):
        with nn.intercept_methods(ServingInterceptor()):
            return cls.apply(self, _split_serving(variables), *args, **kwargs)

    namespace = {"apply": apply, "__module__": __name__, "jaxq_serving": True}
    return type(f"Serving{cls.__name__}", (cls,), namespace)
