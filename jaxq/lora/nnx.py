"""Adapters on Flax NNX models: layer surgery on a copy, adapters as ``nnx.LoRAParam``.

:func:`adapt_nnx` converts the layers whose base is quantized with
:func:`jaxq.ptq.convert` (their kernel becomes a :class:`jaxq.ptq.PackedKernel`, an
``nnx.Variable`` that is not a ``Param``), then gives every selected layer

* ``lora_a`` / ``lora_b``: ``nnx.LoRAParam`` adapters (stacked like the kernel for layers
  made by ``nnx.vmap``, so ``nnx.scan`` slices them);
* for L4Q, ``lora_log_steps``: the learned step sizes as ``log s`` (:class:`LearnedStep`,
  a ``LoRAParam``);
* with dropout, ``lora_dropout``: an ``nnx.Dropout`` with its own stream (``model.eval()``
  turns it off);
* a subclass of its own class whose ``__call__`` fills the layer's ``dot_general`` /
  ``einsum_op`` slot for the call (:func:`jaxq.wrapping.nnx.call_with`).

``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` then keeps optimizer state for the
adapters (and steps) only; the base has no gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxq.lora import core as C
from jaxq.ptq import serving as S
from jaxq.ptq.plan import LayerPlan, Plan
from jaxq.ptq.weights import QuantizedWeight, lsq_weight
from jaxq.wrapping import nnx as wn
from jaxq.wrapping.rules import match

__all__ = ["LearnedStep", "adapt_nnx", "nnx_adapters", "merged_float_nnx", "lora_params"]

_SLOTS = {"dot_general": "dot_general", "einsum": "einsum_op"}
_ATTRS = ("lora_a", "lora_b", "lora_log_steps", "lora_dropout", "jaxq_lora", "jaxq_op",
          "jaxq_param_shape")  # fmt: skip


class LearnedStep(nnx.LoRAParam):
    """L4Q's learned step sizes, as ``log s`` (see :func:`jaxq.lora.core.steps`): trained
    with the adapters (``wrt=nnx.LoRAParam``)."""


def _get(v):
    return v.get_value() if hasattr(v, "get_value") else v.value


def _lora_call(base: type):
    def __call__(self, *args, **kwargs):
        """Runs the layer with its adapter (module docstring of :mod:`jaxq.lora.core`)."""
        info = self.jaxq_lora
        slot = _SLOTS[info.op]
        kvar = vars(self)["kernel"]
        a, b = _get(self.lora_a), _get(self.lora_b)
        drop = vars(self).get("lora_dropout")
        lora_dot = functools.partial(_term, a=a, b=b, info=info, dropout=drop)
        replacements = {}
        if isinstance(kvar, S.PackedKernel):
            qw = kvar.get_value()
            replacements["kernel"] = nnx.Param(jnp.zeros(self.jaxq_param_shape, qw.kernel_dtype))
            if info.kind == "l4q":
                dot = functools.partial(C.l4q_dot, qw=qw, a=a, b=b, info=info,
                                        log_steps=_get(self.lora_log_steps))  # fmt: skip
                replacements[slot] = C.as_slot(info.op, dot)
            else:
                replacements[slot] = C.with_lora(info.op, S._slot_fn(info.op, qw), lora_dot)
        else:
            own = vars(self)[slot] or jax.lax.dot_general
            replacements[slot] = C.with_lora(info.op, own, lora_dot)
        return wn.call_with(self, base, replacements, args, kwargs)

    return __call__


def _term(lhs, rhs, dims, *, a, b, info, dropout):
    return C.lora_term(lhs, dims, a, b, info, dropout=dropout)


@functools.cache
def _lora_class(cls: type) -> type:
    return wn.subclass(cls, "LoRA", _lora_call(cls), __name__)


def is_adapted(layer) -> bool:
    return type(layer).__module__ == __name__ and "jaxq_lora" in vars(layer)


def _einsum_axes(layer, path):
    spec = layer.einsum_str
    where = f"jaxq.lora: layer {path!r} (nnx.Einsum)"
    if not isinstance(spec, str) or "->" not in spec:
        raise ValueError(f"{where}: adapters need an explicit einsum_str with '->' given at "
                         f"construction, got {spec!r}")  # fmt: skip
    ins, out = spec.replace(" ", "").split("->")
    x_term, k_term = ins.split(",")
    if "." in k_term or len(k_term) != len(layer.kernel_shape):
        raise ValueError(f"{where}: kernel subscripts {k_term!r} do not name the kernel's "
                         f"{len(layer.kernel_shape)} axes")  # fmt: skip
    bad = [c for c in k_term if (c in x_term) == (c in out)]
    if bad:
        raise ValueError(f"{where}: kernel labels {bad} of {spec!r} are batch or summed-out "
                         "axes; adapters cover kernels whose axes are contracted or "
                         "outputs")  # fmt: skip
    return tuple(i for i, c in enumerate(k_term) if c in x_term)


def geometry(layer, op: str, path: str):
    """``(kernel_shape, in_axes, stack)`` of one NNX layer (before conversion)."""
    k = wn._get(layer.kernel)
    where = f"jaxq.lora: layer {path!r} ({type(layer).__name__})"
    if op == "dot_general" and getattr(layer, "dot_general_cls", None) is not None:
        raise ValueError(f"{where}: the layer uses dot_general_cls; jaxq fills dot_general")
    if isinstance(layer, nnx.Linear):
        stack = tuple(k.shape[:-2])
        return tuple(k.shape[-2:]), (0,), stack
    if isinstance(layer, nnx.LinearGeneral):
        if layer.batch_axis:
            raise ValueError(f"{where}: batch_axis {dict(layer.batch_axis)} makes batch "
                             "dimensions; adapters cover products without them")  # fmt: skip
        n_in = len(layer.in_features)
        if k.ndim != n_in + len(layer.out_features):
            raise ValueError(f"{where}: kernel {k.shape} is stacked; stacked LinearGeneral "
                             "layers have no adapter path (use nnx.Linear or "
                             "nnx.Einsum)")  # fmt: skip
        return tuple(k.shape), tuple(range(n_in)), ()
    if isinstance(layer, nnx.Einsum):
        shape = tuple(layer.kernel_shape)
        return shape, _einsum_axes(layer, path), tuple(k.shape[: k.ndim - len(shape)])
    raise ValueError(f"{where}: op {op!r} has no adapter path (dense and einsum layers have)")


def select(model: nnx.Module, rules, config: C.LoRA) -> dict:
    """``{path: AdapterInfo}`` of the layers the rules give an adapter."""
    infos = {}
    for path, layer, op in wn.layers(model):
        m = match(rules, path, op)
        if m is None or m[1].recipe is None:
            continue
        where = f"jaxq.lora: layer {path!r} matched rule {m[1].module_path!r}"
        if is_adapted(layer) or type(layer).__module__ in (wn.__name__, S.__name__):
            raise ValueError(f"{where}, but it is already adapted, quantized or converted; "
                             "adapt the float model")  # fmt: skip
        if op not in _SLOTS:
            raise ValueError(f"{where}: {op} layers have no adapter path; exclude them with "
                             f"jaxq.Rule({path!r}, recipe=None)")  # fmt: skip
        kind = C.kind_of(m[1].recipe, where)
        shape, in_axes, stack = geometry(layer, op, path)
        C.check_geometry(path, shape, in_axes, config.rank)
        infos[path] = C.AdapterInfo(path, op, kind, m[1].module_path, m[1].recipe, shape,
                                    in_axes, stack, config)  # fmt: skip
    return infos


def attach(layer, info: C.AdapterInfo, key: jax.Array) -> None:
    """Turns one layer of a (converted) clone into its adapted form, in place."""
    plain = type(layer).__mro__[1] if S.is_serving(layer) else type(layer)
    object.__setattr__(layer, "__class__", _lora_class(plain))
    layer.jaxq_op = info.op
    layer.jaxq_lora = info
    cfg = info.config
    ka, kd = jax.random.split(key)
    layer.lora_a = nnx.LoRAParam(C.init_a(ka, info.a_shape, cfg.dtype))
    layer.lora_b = nnx.LoRAParam(jnp.zeros(info.b_shape, cfg.dtype))
    if info.kind == "l4q":
        qw = _get(vars(layer)["kernel"])
        layer.lora_log_steps = LearnedStep(C.log_steps_from(qw, info.recipe.rhs, len(info.stack)))
    if cfg.dropout > 0:
        drop = nnx.Dropout(cfg.dropout)
        keys = jax.random.split(kd, info.stack) if info.stack else kd
        drop.rngs = nnx.RngStream(keys, tag="dropout")
        layer.lora_dropout = drop


def adapt_nnx(model: nnx.Module, rules, config: C.LoRA, infos: dict, convert, key) -> nnx.Module:
    """The adapted copy: ``convert(model)`` (a clone with packed bases) plus adapters."""
    served = convert(model) if any(i.kind != "lora" for i in infos.values()) else None
    served = nnx.clone(model) if served is None else served
    for i, (path, layer, _) in enumerate(wn.layers(served)):
        if path in infos:
            attach(layer, infos[path], jax.random.fold_in(key, i))
    return served


def nnx_adapters(model: nnx.Module) -> dict:
    """``{path: AdapterInfo}`` of an adapted NNX model's layers."""
    return {p: layer.jaxq_lora for p, layer, _ in wn.layers(model) if is_adapted(layer)}


def lora_params(layer) -> dict:
    """One adapted layer's ``{"a", "b", "log_steps"}`` arrays (``log_steps``: L4Q only)."""
    log_s = vars(layer).get("lora_log_steps")
    return {"a": _get(layer.lora_a), "b": _get(layer.lora_b),
            "log_steps": None if log_s is None else _get(log_s)}  # fmt: skip


def merged_weights(info: C.AdapterInfo, kernel, lp: dict):
    """``(W_0 + ΔW in the kernel's layout and dtype, L4Q LayerPlan or None)``.

    ``kernel`` is the layer's float kernel or its packed :class:`QuantizedWeight`.
    """
    n = len(info.stack)
    delta = C.delta_kernel(lp["a"], lp["b"], info)
    if isinstance(kernel, QuantizedWeight):
        qw = kernel

        def w0_of(q):
            return C.to_kernel(C.base_values(q), q.kernel_shape, q.dimension_numbers)

        w = C.map_stack(w0_of, qw, n=n) + delta
        dtype = qw.kernel_dtype
    else:
        w, dtype = kernel.astype(jnp.float32) + delta, kernel.dtype
    plan = None
    if info.kind == "l4q":
        dims, q = qw.dimension_numbers, info.recipe.rhs

        def requant(w1, log_s):
            return lsq_weight(C.to_canonical(w1, dims), q, C.steps(log_s))

        plan = LayerPlan(weight=C.map_stack(requant, w, lp["log_steps"], n=n),
                         algorithm=("l4q",))  # fmt: skip
    return w.astype(dtype), plan


def merged_float_nnx(model: nnx.Module) -> tuple[nnx.Module, Plan]:
    """A float copy of an adapted model with ``W_0 + ΔW`` in the adapted layers' kernels
    (their own classes, no adapters), and the L4Q layers' plan."""
    clone = nnx.clone(model)
    if "jaxq_lora_sample" in vars(clone):
        delattr(clone, "jaxq_lora_sample")
    plan = Plan()
    for path, layer, _ in wn.layers(clone):
        if not is_adapted(layer):
            continue
        info = layer.jaxq_lora
        w, lp = merged_weights(info, _get(vars(layer)["kernel"]), lora_params(layer))
        if lp is not None:
            plan[path] = lp
        object.__setattr__(layer, "__class__", type(layer).__mro__[1])
        for name in _ATTRS:
            if name in vars(layer):
                delattr(layer, name)
        layer.kernel = nnx.Param(w)
    return clone, plan

