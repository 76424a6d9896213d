"""Adapters on Flax Linen models: an interceptor fills each selected layer's product slot.

The adapted root module's ``apply`` takes ``{"params": base, "lora": adapters, ...}``:

* ``params``: the base, as :func:`jaxq.ptq.convert` left it (packed
  :class:`jaxq.ptq.QuantizedWeight` kernels for QLoRA / L4Q layers, float kernels
  elsewhere);
* ``lora``: the adapters, a tree with the same nesting as ``params`` holding ``lora_a``,
  ``lora_b`` (and L4Q's ``lora_log_steps``) at each adapted layer's scope. Differentiate and
  optimize this tree only: the base has no gradient and no optimizer state.

For the call, ``apply`` grafts the ``lora`` leaves into ``params`` (so ``nn.scan`` slices
them with the parameters, with no change to its ``variable_axes``), moves packed kernels
beside placeholders as :mod:`jaxq.ptq.serving` does, and runs the module under
``nn.intercept_methods``: the interceptor hands each adapted ``Dense`` / ``DenseGeneral`` /
``Einsum`` a product computing the base plus the adapter (or L4Q's quantized sum). Dropout
of the adapters' input is on when a ``"dropout"`` PRNG stream is given to ``apply``.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxq.lora import core as C
from jaxq.ops.dims import normalize_dimension_numbers
from jaxq.ptq import serving as S
from jaxq.ptq.plan import Plan
from jaxq.ptq.weights import QuantizedWeight, serving_dot_general
from jaxq.wrapping import linen as wl
from jaxq.wrapping.rules import match

__all__ = ["COLLECTION", "lora_root", "linen_adapters", "init_adapters", "merged_float_linen"]

COLLECTION = "lora"
_NAMES = ("lora_a", "lora_b", "lora_log_steps")
_FIELDS = ("jaxq_lora", "jaxq_lora_rules", "jaxq_lora_config", "jaxq_lora_sample",
           "jaxq_lora_layers")
_SKIP = ("parent", "name", "jaxq_interceptor", *_FIELDS)


@dataclasses.dataclass
class _Interceptor:
    rules: tuple
    config: C.LoRA
    record: dict | None = None  # the init pass records each adapter's AdapterInfo here
    seen: dict | None = None  # and the (path: op) of every dense/einsum layer

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        op = S._linen_op(module)
        if context.method_name == "__call__" and op is None and wl._op_of(module) is not None:
            self._unsupported(module, wl._op_of(module))
        if op is None or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = "/".join(map(str, module.path))
        if self.seen is not None:
            self.seen[path] = op
        m = match(self.rules, path, op)
        if m is None or m[1].recipe is None:
            return next_fun(*args, **kwargs)
        where = f"jaxq.lora: layer {path!r} matched rule {m[1].module_path!r}"
        if getattr(module, "dot_general_cls", None) is not None:
            raise ValueError(f"{where}: the layer uses dot_general_cls; jaxq fills dot_general")
        own = getattr(module, "dot_general", None) if op == "dot_general" else None
        dot = _Dot(module, path, op, m[1], self.config, own or jax.lax.dot_general, self.record)
        return S._linen_call(module, op, dot, next_fun, args, kwargs)

    def _unsupported(self, module, op):
        path = "/".join(map(str, module.path))
        m = match(self.rules, path, op)
        if m is not None and m[1].recipe is not None:
            raise ValueError(f"jaxq.lora: layer {path!r} matched rule {m[1].module_path!r}: "
                             f"{op} layers have no adapter path; exclude them with "
                             f"jaxq.Rule({path!r}, recipe=None)")  # fmt: skip


class _Dot:
    """The product an adapted Linen layer gets for one call (creates adapters at init)."""

    def __init__(self, module, path, op, rule, config, base, record):
        self.module, self.path, self.op, self.rule = module, path, op, rule
        self.config, self.base, self.record = config, base, record

    def info(self, rhs, dims) -> C.AdapterInfo:
        where = f"jaxq.lora: layer {self.path!r}"
        (_, rc), (_, rb) = dims
        if rb:
            raise ValueError(f"{where}: the product has batch dimensions {dims}; adapters "
                             "cover products without them")  # fmt: skip
        shape = tuple(jnp.shape(rhs))
        C.check_geometry(self.path, shape, tuple(sorted(rc)), self.config.rank)
        kind = C.kind_of(self.rule.recipe, where)
        return C.AdapterInfo(self.path, self.op, kind, self.rule.module_path, self.rule.recipe,
                             shape, tuple(sorted(rc)), (), self.config)  # fmt: skip

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                 **kwargs):  # fmt: skip
        module, cfg = self.module, self.config
        dims = normalize_dimension_numbers(dimension_numbers, f"jaxq.lora {self.path!r}")
        info = self.info(rhs, dims)
        if self.record is not None:
            self.record[self.path] = info
        a = module.param("lora_a", lambda k: C.init_a(k, info.a_shape, cfg.dtype))
        b = module.param("lora_b", lambda _: jnp.zeros(info.b_shape, cfg.dtype))
        packed = module.has_variable("params", S.JAXQ_KERNEL)
        qw = module.get_variable("params", S.JAXQ_KERNEL) if packed else None
        if info.kind == "l4q":
            log_s = module.param("lora_log_steps",
                                 lambda _: C.log_steps_from(qw, info.recipe.rhs))
            return C.l4q_dot(lhs, rhs, dims, precision, preferred_element_type, qw=qw, a=a, b=b,
                             log_steps=log_s, info=info, **kwargs)  # fmt: skip
        drop = None
        if cfg.dropout > 0 and module.has_rng("dropout"):
            drop = C.dropout_fn(cfg.dropout, module.make_rng("dropout"))
        base = self.base if qw is None else functools.partial(serving_dot_general, weight=qw)
        y = base(lhs, rhs, dims, precision, preferred_element_type, **kwargs)
        return y + C.lora_term(lhs, dims, a, b, info, dropout=drop).astype(y.dtype)


def _graft(params, lora):
    """``params`` with the ``lora`` leaves added at their scopes (new dicts only)."""
    out = dict(params)
    for k, v in lora.items():
        if k in _NAMES:
            out[k] = v
        else:
            if k not in out:
                raise ValueError(f"jaxq.lora: the adapters hold a scope {k!r} that the "
                                 "parameters do not have")  # fmt: skip
            out[k] = _graft(out[k], v)
    return out


def _extract(params, prefix=()) -> dict:
    out = {}
    for k, v in params.items():
        if k in _NAMES:
            out[k] = v
        elif hasattr(v, "items") and not isinstance(v, QuantizedWeight):
            sub = _extract(v, prefix + (k,))
            if sub:
                out[k] = sub
    return out


def _copy(tree):
    """Nested ``dict`` copies of a params tree (leaves shared)."""
    if hasattr(tree, "items") and not isinstance(tree, QuantizedWeight):
        return {k: _copy(v) for k, v in tree.items()}
    return tree


def _at(tree, path: str):
    node = tree
    for part in path.split("/") if path else []:
        node = node[part]
    return node


def _paths(tree, prefix=()) -> dict:
    """``{path: {name: leaf}}`` of the adapter leaves of a ``lora`` tree."""
    out = {}
    here = {k: v for k, v in tree.items() if k in _NAMES}
    if here:
        out["/".join(prefix)] = here
    for k, v in tree.items():
        if k not in _NAMES and hasattr(v, "items"):
            out.update(_paths(v, prefix + (k,)))
    return out


def check_tree(infos, lora) -> None:
    """Raises ``ValueError`` when a ``lora`` tree does not hold what the module's adapters
    were made with (other paths, kinds or shapes)."""
    if not hasattr(lora, "items"):
        raise ValueError(f"jaxq.lora: variables[{COLLECTION!r}] must be the adapter tree "
                         f"jaxq.lora.adapt returned, got {type(lora).__name__}")  # fmt: skip
    got = _paths(lora)
    want = {i.path: i for i in infos}
    problems = [f"{p!r} has adapters the module was not adapted with" for p in got
                if p not in want]  # fmt: skip
    for p, info in want.items():
        leaves = got.get(p)
        if leaves is None:
            problems.append(f"{p!r} has a {info.describe()} but no adapter arrays")
            continue
        names = {"lora_a", "lora_b"} | ({"lora_log_steps"} if info.kind == "l4q" else set())
        if set(leaves) != names:
            problems.append(f"{p!r} holds {sorted(leaves)}, its {info.describe()} needs "
                            f"{sorted(names)}")  # fmt: skip
            continue
        for name, want_shape in (("lora_a", info.a_shape), ("lora_b", info.b_shape)):
            if tuple(jnp.shape(leaves[name])) != want_shape:
                problems.append(f"{p!r} {name} has shape {tuple(jnp.shape(leaves[name]))}, "
                                f"its {info.describe()} has {want_shape}")  # fmt: skip
    if problems:
        raise ValueError("jaxq.lora: the adapters do not match the rules the model was adapted "
                         "with: " + "; ".join(problems))  # fmt: skip


@functools.cache
def lora_root(cls: type) -> type:
    """The adapted subclass of a Linen module class (see the module docstring)."""

    def apply(self, variables, *args, **kwargs):
        variables = dict(variables)
        if COLLECTION not in variables:
            raise ValueError(f"jaxq.lora: an adapted module's variables need the {COLLECTION!r} "
                             "collection that jaxq.lora.adapt returned")  # fmt: skip
        lora = variables.pop(COLLECTION)
        check_tree(self.jaxq_lora, lora)
        variables["params"] = S._split_serving(_graft(variables["params"], lora))
        with nn.intercept_methods(_Interceptor(self.jaxq_lora_rules, self.jaxq_lora_config)):
            return cls.apply(self, variables, *args, **kwargs)

    namespace = {
        "apply": apply,
        "__module__": __name__,
        "__annotations__": {f: object for f in _FIELDS},
        **{f: None for f in _FIELDS},
    }
    return type(f"LoRA{cls.__name__}", (cls,), namespace)


def plain_fields(module: nn.Module) -> dict:
    return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
            if f.init and f.name not in _SKIP}  # fmt: skip


def plain_class(module: nn.Module) -> type:
    cls = type(module)
    return cls.__mro__[1] if cls.__module__ in (__name__, wl.__name__, S.__name__) else cls


def is_adapted(module) -> bool:
    return type(module).__module__ == __name__


def init_adapters(module: nn.Module, variables, rules, config: C.LoRA, batch, key):
    """Runs the model once on ``batch`` creating the adapters; returns ``(lora tree,
    infos, ((path, op) of every dense/einsum layer called))``. ``variables`` are the
    converted base's."""
    record: dict = {}
    seen: dict = {}
    params = S._split_serving(variables["params"])
    rest = {k: v for k, v in variables.items() if k != "params"}
    plain = plain_class(module)(**plain_fields(module))
    with nn.intercept_methods(_Interceptor(tuple(rules), config, record, seen)):
        _, mutated = plain.apply({**rest, "params": params}, *batch, mutable=["params"],
                                 rngs={"params": key})  # fmt: skip
    lora = _extract(mutated["params"])
    leaves = _paths(lora)
    infos = tuple(dataclasses.replace(info, stack=tuple(leaves[p]["lora_a"].shape[:-2]))
                  for p, info in record.items())  # fmt: skip
    return lora, infos, tuple(seen.items())


def linen_adapters(module: nn.Module) -> dict:
    return {i.path: i for i in (module.jaxq_lora or ())}


def merged_float_linen(module: nn.Module, variables, merged_weights):
    """``(plain module, float variables with W_0 + ΔW, L4Q plan)`` of an adapted module."""
    infos = module.jaxq_lora
    lora = variables.get(COLLECTION)
    if lora is None:
        raise ValueError(f"jaxq.lora.merge: the variables have no {COLLECTION!r} collection")
    check_tree(infos, lora)
    params = _copy(variables["params"])
    plan = Plan()
    for info in infos:
        leaves = _at(lora, info.path)
        lp = {"a": leaves["lora_a"], "b": leaves["lora_b"],
              "log_steps": leaves.get("lora_log_steps")}
        node = _at(params, info.path)
        w, layer_plan = merged_weights(info, node["kernel"], lp)
        node["kernel"] = w
        if layer_plan is not None:
            plan[info.path] = layer_plan
    out = {k: v for k, v in variables.items() if k != COLLECTION}
    out["params"] = params
    return plain_class(module)(**plain_fields(module)), out, plan
