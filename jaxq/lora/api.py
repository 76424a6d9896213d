"""``jaxq.lora.adapt`` and ``jaxq.lora.merge``: the entry points for NNX and Linen models."""

from __future__ import annotations

import re
import typing

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxq.lora import core as C
from jaxq.lora import linen as L
from jaxq.lora import nnx as N
from jaxq.ptq.convert import calibrates_activations, calibration_batches, check_rules, convert
from jaxq.wrapping import nnx as wn
from jaxq.wrapping.rules import Rule, match

__all__ = ["Adapted", "adapt", "merge", "adapters", "optimizer"]


class Adapted(typing.NamedTuple):
    """What :func:`adapt` returns.

    Attributes:
        model: the adapted model (NNX: a copy of the module with adapters; Linen: a module
            whose ``apply`` takes ``{"params": ..., "lora": ...}``).
        params: NNX: ``nnx.state(model)``; Linen: the variables, ``"params"`` holding the
            (packed) base and ``"lora"`` the adapters.
        adapters: one :class:`AdapterInfo` per adapted layer, in call order.
    """

    model: typing.Any
    params: typing.Any
    adapters: tuple


def _sample(batches):
    if not batches:
        return None
    return tuple((tuple(x.shape), str(np.dtype(x.dtype))) for x in batches[0])


def _zeros(sample):
    return [tuple(jnp.zeros(shape, dtype) for shape, dtype in sample)]


def adapt(model, params, rules, config: C.LoRA | None = None, *, calibration=None,
          key: jax.Array | None = None) -> Adapted:  # fmt: skip
    """Adds LoRA adapters to the layers that ``rules`` select, over a frozen base.

    For each dense or einsum layer, the first :class:`jaxq.Rule` whose regex fully
    matches its path decides, by its ``recipe``:

    * ``None``: no adapter (the layer stays as it is, frozen);
    * :data:`jaxq.lora.FLOAT`: LoRA over the layer's own float kernel;
    * a weight-only scheme of :mod:`jaxq.ptq` (``NF4(64)``, ``W4(128)``, ``W8()``...): QLoRA,
      the base stored packed by :func:`jaxq.ptq.convert` (two 4-bit codes per byte);
    * :func:`jaxq.lora.L4Q` (``L4Q(128)``): the forward ``x · Q_s(W_0 + ΔW)`` with learned
      steps ``s`` starting at the round-to-nearest scales of ``W_0``; the base stored
      packed by that quantizer, or as ``L4Q(..., base=...)`` says (``NF4(64)``, ``FLOAT``).

    Args:
        model: an ``nnx.Module`` (pass ``params=None``) or a Linen module.
        params: ``None`` for NNX; the Linen variables (``{"params": ...}``).
        rules: the :class:`jaxq.Rule` list.
        config: :class:`LoRA` (rank, alpha, dropout); default ``LoRA()``.
        calibration: batches (arrays or tuples of the model's positional arguments); the
            first is enough. Needed for packed bases (their products are found by running
            the model) and for any Linen model; its shape is kept so that :func:`merge`
            needs no batches for weight-only schemes.
        key: PRNG key for ``A``'s initialization and the dropout streams (default key 0).

    Returns:
        :class:`Adapted` ``(model, params, adapters)``. The original model is untouched.

    Raises:
        ValueError: no layer selected; a rank above ``min(K, N)`` of a layer (naming its
            path and shapes); a conv or mixture-of-experts layer selected; an
            activation-quantizing recipe; an already adapted, QAT-wrapped or converted
            model.
        TypeError: a model that is not Flax, rules that are not ``jaxq.Rule``.

    Example:
        >>> import jax.numpy as jnp, jaxq
        >>> from flax import nnx
        >>> model = nnx.Linear(128, 64, rngs=nnx.Rngs(0))
        >>> out = jaxq.lora.adapt(model, None, [jaxq.Rule(".*", recipe=jaxq.ptq.NF4(64))],
        ...                       jaxq.lora.LoRA(rank=4), calibration=[jnp.ones((2, 128))])
        >>> out.model.lora_a.shape, out.model.lora_b.shape   # A (K, r), B (r, N)
        ((128, 4), (4, 64))
        >>> out.model.kernel.get_value().weight.codes.shape   # NF4: two codes a byte
        (1, 64, 64)
    """
    rules = check_rules(rules)
    config = C.LoRA() if config is None else config
    if not isinstance(config, C.LoRA):
        raise TypeError(f"jaxq.lora.adapt: config must be a jaxq.lora.LoRA, got {config!r}")
    key = jax.random.key(0) if key is None else key
    batches = calibration_batches(calibration, "jaxq.lora.adapt")
    conv_rules = [Rule(r.module_path, r.op, C.base_recipe(r.recipe)) for r in rules]
    if isinstance(model, nnx.Module):
        if params is not None:
            raise TypeError("jaxq.lora.adapt: an NNX model holds its parameters; pass "
                            "params=None")  # fmt: skip
        infos = N.select(model, rules, config)
        _some(infos, model, rules)

        def to_base(m):
            return convert(m, None, conv_rules, calibration=batches).model

        adapted = N.adapt_nnx(model, rules, config, infos, to_base, key)
        adapted.jaxq_lora_sample = _sample(batches)
        return Adapted(adapted, nnx.state(adapted), tuple(infos.values()))
    if not isinstance(model, nn.Module):
        raise TypeError(f"jaxq.lora.adapt: model must be a Flax NNX or Linen module, "
                        f"got {model!r}")  # fmt: skip
    if L.is_adapted(model) or L.plain_class(model) is not type(model):
        raise ValueError("jaxq.lora.adapt: this module is already adapted, QAT-wrapped or "
                         "converted; adapt the float model")  # fmt: skip
    if not batches:
        raise ValueError("jaxq.lora.adapt: Linen models need calibration=[sample batch] (the "
                         "adapters are created by running the model once)")  # fmt: skip
    if not hasattr(params, "items") or "params" not in params:
        raise TypeError("jaxq.lora.adapt: Linen models need params={'params': ...}, the "
                        "variables of model.init")  # fmt: skip
    base = {k: v for k, v in params.items() if k != L.COLLECTION}
    if any(C.base_recipe(r.recipe) is not None for r in rules):
        base = convert(model, base, conv_rules, calibration=batches).params
    lora, infos, seen = L.init_adapters(model, base, rules, config, batches[0], key)
    _some({i.path: i for i in infos}, model, rules, seen)
    root = L.lora_root(type(model))(
        **L.plain_fields(model), jaxq_lora=infos, jaxq_lora_rules=rules,
        jaxq_lora_config=config, jaxq_lora_sample=_sample(batches), jaxq_lora_layers=seen,
    )  # fmt: skip
    return Adapted(root, {**base, L.COLLECTION: lora}, infos)


def _some(infos, model, rules, seen=None) -> None:
    if infos:
        return
    if seen is None:
        seen = [(p, op) for p, _, op in wn.layers(model)]
    raise ValueError(f"jaxq.lora.adapt: the rules {[r.module_path for r in rules]} give no layer "
                     f"an adapter; the model's layers are {[p for p, _ in seen]}")  # fmt: skip


def adapters(model) -> tuple:
    """The :class:`AdapterInfo` of every adapted layer of a model made by :func:`adapt`.

    Example:
        >>> import jax.numpy as jnp, jaxq
        >>> from flax import nnx
        >>> model = nnx.Sequential(nnx.Linear(32, 32, rngs=nnx.Rngs(0)), nnx.relu,
        ...                        nnx.Linear(32, 8, rngs=nnx.Rngs(1)))
        >>> out = jaxq.lora.adapt(model, None, [jaxq.Rule("layers/0", recipe=jaxq.lora.FLOAT)])
        >>> [(i.path, i.kind, i.k, i.n) for i in jaxq.lora.adapters(out.model)]
        [('layers/0', 'lora', 32, 32)]
    """
    if isinstance(model, nnx.Module):
        return tuple(N.nnx_adapters(model).values())
    if isinstance(model, nn.Module):
        return tuple(L.linen_adapters(model).values())
    raise TypeError(f"jaxq.lora.adapters: model must be a Flax NNX or Linen module, got {model!r}")


def optimizer(adapters: optax.GradientTransformation,
              steps: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """One optax transformation for an adapted model's trainable state: ``adapters`` updates
    ``A`` and ``B``, ``steps`` L4Q's learned ``log s`` (default: ``adapters`` too).

    The steps usually want a larger learning rate than the adapters (Adam moves ``log s``
    by about its learning rate per update, a relative change of the step). Leaves are told
    apart by their name, ``lora_log_steps``, so this works on an NNX model's
    ``nnx.LoRAParam`` state and on a Linen ``"lora"`` tree alike.

    Example:
        >>> import optax, jaxq
        >>> tx = jaxq.lora.optimizer(jaxq.optim.adamw_8bit(1e-3), steps=optax.adam(1e-2))
        >>> state = tx.init({"up": {"lora_a": jnp.ones((64, 4)), "lora_log_steps": jnp.zeros(8)}})
        >>> sorted(state.inner_states)
        ['adapters', 'steps']
    """
    if steps is None:
        return adapters

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "steps" if "lora_log_steps" in jax.tree_util.keystr(path)
            else "adapters", params)  # fmt: skip

    return optax.multi_transform({"adapters": adapters, "steps": steps}, labels)


def _requant(recipe):
    """A merge rule's recipe as :func:`jaxq.ptq.convert` takes it (L4Q: the plan carries
    the weights quantized with the learned steps)."""
    return C.serving_recipe(recipe)


def _merge_rules(infos: dict, rules, layers) -> list[Rule]:
    if rules is None:
        out = [Rule(re.escape(p), i.op, _requant(i.recipe)) for p, i in infos.items()]
        return out + [Rule(".*", recipe=None)]
    rules = check_rules(rules)
    problems = []
    for path, op in layers:
        m = match(rules, path, op)
        recipe = None if m is None else m[1].recipe
        by = "no rule" if m is None else f"rule {m[1].module_path!r}"
        info = infos.get(path)
        if info is None:
            if recipe is not None:
                problems.append(f"{path!r} has no adapter, but {by} now gives it recipe "
                                f"{recipe.name!r}")  # fmt: skip
        elif recipe is None:
            problems.append(f"{path!r} has a {info.describe()}, but {by} now gives it none")
        elif info.kind == "l4q" and (recipe.rhs != info.recipe.rhs or recipe.lhs is not None):
            problems.append(f"{path!r} learned its steps for {info.recipe.rhs}, but {by} now "
                            f"asks for recipe {recipe.name!r} ({recipe.rhs})")  # fmt: skip
        elif info.kind != "l4q" and recipe.learned_step:
            problems.append(f"{path!r} has a {info.describe()} with no learned steps, but {by} "
                            f"asks for learned-step recipe {recipe.name!r}")  # fmt: skip
    if problems:
        raise ValueError("jaxq.lora.merge: the rules differ from those the adapters were made "
                         "with: " + "; ".join(problems))  # fmt: skip
    return [Rule(r.module_path, r.op, _requant(r.recipe)) for r in rules]


def _check_finite(path: str, arrays: dict) -> None:
    for name, x in arrays.items():
        if x is None:
            continue
        name = name if name.startswith("lora_") else f"lora_{name}"
        x = np.asarray(x, np.float32)
        if name == "lora_log_steps":  # the steps themselves must be finite and nonzero
            with np.errstate(over="ignore"):
                s = np.exp(x)
            x = np.where((s > 0) & np.isfinite(s), x, np.nan)
        bad = int(np.sum(~np.isfinite(x)))
        if bad:
            raise ValueError(f"jaxq.lora.merge: layer {path!r} {name} holds {bad} non-finite "
                             f"values (of {np.size(x)}); they would turn the merged weights "
                             "into NaN. Train with optax.apply_if_finite (or an optimizer that "
                             "skips non-finite gradients, as jaxq.optim does)")  # fmt: skip


def merge(model, params=None, rules=None, *, calibration=None):
    """Folds the adapters into the base and quantizes it for serving: a plain
    :func:`jaxq.ptq.convert` serving model with no adapter left.

    Each adapted layer's kernel becomes ``W = W_0 + (alpha/r) A B`` (``W_0`` dequantized
    for a packed base). L4Q layers store ``round(clip(W / s))`` with their learned steps
    ``s`` as codes and ``s`` as scales, so the served layer computes exactly the forward
    they were trained with; QLoRA and LoRA layers are quantized by round-to-nearest in
    the merge rules' scheme (by default the base's own; :data:`FLOAT`: kept in float).

    Args:
        model, params: what :func:`adapt` returned (NNX: ``params=None``).
        rules: ``None`` (the rules the adapters were made with), or serving rules, which
            must select exactly the adapted layers; QLoRA/LoRA layers may take any scheme
            (e.g. ``jaxq.ptq.W4(128)``: QLoRA followed by RTN int4), L4Q layers the
            quantizer their steps were learned for.
        calibration: batches for schemes that calibrate activations; by default zeros of
            the shape :func:`adapt` saw (enough for weight-only schemes).

    Returns:
        :class:`jaxq.ptq.Converted` ``(model, params, float_layers)``.

    Raises:
        ValueError: a model without adapters; rules that select other layers than the
            adapted ones, or another quantizer for L4Q layers (each difference named);
            adapters or steps holding NaN/inf (naming the layer); Linen adapters that do
            not match the module.

    Example:
        >>> import jax.numpy as jnp, jaxq
        >>> from flax import nnx
        >>> out = jaxq.lora.adapt(nnx.Linear(128, 32, rngs=nnx.Rngs(0)), None,
        ...                       [jaxq.Rule(".*", recipe=jaxq.lora.FLOAT)])
        >>> served = jaxq.lora.merge(out.model, rules=[jaxq.Rule(".*", recipe=jaxq.ptq.W4(64))],
        ...                          calibration=[jnp.ones((2, 128))])   # LoRA, then RTN int4
        >>> served.model.kernel.get_value().weight.codes.shape, served.float_layers
        ((1, 32, 64), ())
    """
    if isinstance(model, nnx.Module):
        if params is not None:
            raise TypeError("jaxq.lora.merge: an NNX model holds its parameters; pass "
                            "params=None")  # fmt: skip
        infos = N.nnx_adapters(model)
        layers = [(p, op) for p, _, op in wn.layers(model)]
        sample = getattr(model, "jaxq_lora_sample", None)
    elif isinstance(model, nn.Module) and L.is_adapted(model):
        infos = L.linen_adapters(model)
        layers = list(model.jaxq_lora_layers or ())
        sample = model.jaxq_lora_sample
    else:
        raise TypeError(f"jaxq.lora.merge: model must be one jaxq.lora.adapt returned, "
                        f"got {type(model).__name__}")  # fmt: skip
    if not infos:
        raise ValueError("jaxq.lora.merge: the model has no adapters (make it with "
                         "jaxq.lora.adapt)")  # fmt: skip
    merge_rules = _merge_rules(infos, rules, layers)
    batches = calibration_batches(calibration, "jaxq.lora.merge")
    if not batches:
        needs = [r.recipe.name for r in merge_rules
                 if r.recipe is not None and calibrates_activations(r.recipe)]  # fmt: skip
        if needs or sample is None:
            raise ValueError(f"jaxq.lora.merge: pass calibration batches (recipes {needs} "
                             "calibrate activations, or adapt saw no sample)")  # fmt: skip
        batches = _zeros(sample)
    if isinstance(model, nnx.Module):
        for _, layer, _ in wn.layers(model):
            if N.is_adapted(layer):
                _check_finite(layer.jaxq_lora.path, N.lora_params(layer))
        floatm, plan = N.merged_float_nnx(model)
        return convert(floatm, None, merge_rules, calibration=batches, plan=plan)
    if not hasattr(params, "items") or L.COLLECTION not in params:
        raise ValueError(f"jaxq.lora.merge: pass the variables adapt returned, with their "
                         f"{L.COLLECTION!r} collection")  # fmt: skip
    L.check_tree(tuple(infos.values()), params[L.COLLECTION])
    for info in infos.values():
        _check_finite(info.path, dict(L._at(params[L.COLLECTION], info.path)))
    plain, variables, plan = L.merged_float_linen(model, params, N.merged_weights)
    return convert(plain, variables, merge_rules, calibration=batches, plan=plan)
