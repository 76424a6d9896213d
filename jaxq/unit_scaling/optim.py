"""u-muP optimisers: per-parameter learning rates from the parameter tags.

u-muP's Adam rules (Blake et al., 2024, Table 3), for a global learning rate ``eta``:

=============  ==============================================================
role           effective learning rate
=============  ==============================================================
``"weight"``   ``eta / sqrt(fan_in * depth)`` (hidden weights; the embedding
               table with ``fan_in`` = model width)
``"bias"``     ``eta / sqrt(depth)``
``"norm"``     ``eta / sqrt(depth)``
``"output"``   ``eta`` (the readout carries its ``1/fan_in`` in the forward pass)
=============  ==============================================================

``depth`` is the number of layers of the residual stack (1 outside it). Because all
weights have unit initial scale and each update's size is set by these rules, the best
``eta`` is (approximately) independent of width: it *transfers*.

Example:
    >>> import jax, optax
    >>> from flax import nnx
    >>> from jaxq.unit_scaling import TransformerDecoder, optim
    >>> model = TransformerDecoder(features=32, layers=2, heads=2, rngs=nnx.Rngs(0))
    >>> tx = optim.adamw(0.1, tags=model)
    >>> params = nnx.state(model, nnx.Param)
    >>> opt_state = tx.init(params)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxq.unit_scaling.params import ParamTag, param_tags, path_key

__all__ = ["lr_scale", "lr_scales", "scale_by_umup", "adamw"]


def lr_scale(tag: ParamTag) -> float:
    """The u-muP Adam learning-rate multiplier of one parameter (see the module table).

    Example:
        >>> lr_scale(ParamTag("weight", fan_in=256, depth=4))
        0.03125
    """
    depth = 1.0 if tag.depth is None else tag.depth**-0.5
    if tag.role == "weight":
        return depth * tag.fan_in**-0.5
    if tag.role in ("bias", "norm"):
        return depth
    return 1.0  # "output"


def _as_tags(tags) -> dict[tuple, ParamTag]:
    if isinstance(tags, (nnx.Module, nnx.State)):
        return param_tags(tags)
    if isinstance(tags, Mapping) and all(isinstance(v, ParamTag) for v in tags.values()):
        return {tuple(k): v for k, v in tags.items()}
    raise TypeError(
        "tags must be an nnx.Module, an nnx.State of tagged parameters, or a "
        f"{{path: ParamTag}} mapping from param_tags(); got {type(tags)}"
    )


def lr_scales(tags) -> dict[tuple, float]:
    """``{path: lr multiplier}`` for a model, a state or a ``{path: ParamTag}`` mapping."""
    return {k: lr_scale(t) for k, t in _as_tags(tags).items()}


def _scales_like(updates, scales, default):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    out = []
    for path, _ in leaves:
        key = path_key(path)
        if key not in scales:
            if default is None:
                raise ValueError(
                    f"parameter {'/'.join(map(str, key))} has no u-muP tag; tag it with "
                    "jaxq.unit_scaling.uparam or pass default_scale="
                )
            out.append(default)
        else:
            out.append(scales[key])
    return out, treedef, leaves


def scale_by_umup(tags, *, default_scale: float | None = None) -> optax.GradientTransformation:
    """Multiplies each update by its u-muP learning-rate multiplier (stateless).

    Args:
        tags: a model, a state of tagged parameters or ``param_tags(model)``.
        default_scale: multiplier for untagged parameters; ``None`` (default) raises
            ``ValueError`` naming the first untagged parameter.
    """
    scales = lr_scales(tags)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        factors, treedef, leaves = _scales_like(updates, scales, default_scale)
        new = [u * jnp.asarray(f, u.dtype) for (_, u), f in zip(leaves, factors, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, new), state

    return optax.GradientTransformation(init_fn, update_fn)


class _DecayState(NamedTuple):
    pass


def _independent_decay(weight_decay) -> optax.GradientTransformation:
    def init_fn(params):
        del params
        return _DecayState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("weight decay needs params: call tx.update(grads, state, params)")
        updates = jax.tree.map(lambda u, p: u - weight_decay * p, updates, params)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    tags,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    independent_weight_decay: bool = True,
    default_scale: float | None = None,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformation:
    """AdamW with u-muP per-parameter learning rates.

    .. math::
        p \\leftarrow p - \\eta_t\\, c_p\\, \\hat m / (\\sqrt{\\hat v} + \\epsilon)
                         - \\lambda\\, p

    with ``c_p`` from :func:`lr_scale`. With ``independent_weight_decay`` (u-muP's
    choice) the decay ``lambda p`` does not depend on the learning rate; otherwise it is
    AdamW's ``eta_t c_p lambda p``.

    Non-finite gradients: with ``skip_nonfinite`` (default) a step whose gradients contain
    NaN or inf leaves parameters and moments unchanged and is counted in the state
    (``optax.apply_if_finite``); the count is ``state.total_notfinite``.

    Args:
        learning_rate: global ``eta`` (float or optax schedule).
        tags: the model, its parameter state or ``param_tags(model)``.
        b1, b2, eps: Adam hyperparameters.
        weight_decay: ``lambda`` (>= 0).
        independent_weight_decay: see above.
        default_scale: multiplier for untagged parameters (``None``: they are an error).
        skip_nonfinite: see above.

    Under ``optax.inject_hyperparams`` pass ``static_args=("tags",
    "independent_weight_decay", "default_scale", "skip_nonfinite")``.

    Returns:
        An ``optax.GradientTransformation``.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxq.unit_scaling import ParamTag
        >>> tx = adamw(0.5, tags={("w",): ParamTag("weight", fan_in=4)})
        >>> params = {"w": jnp.ones(3)}
        >>> upd, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
        >>> [round(float(u), 4) for u in upd["w"]]
        [-0.25, -0.25, -0.25]
    """
    if isinstance(weight_decay, (int, float)):
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        use_decay = weight_decay != 0
    else:  # an array, e.g. under optax.inject_hyperparams
        use_decay = True
    parts = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
    if use_decay and not independent_weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts += [scale_by_umup(tags, default_scale=default_scale),
              optax.scale_by_learning_rate(learning_rate)]  # fmt: skip
    if use_decay and independent_weight_decay:
        parts.append(_independent_decay(weight_decay))
    tx = optax.chain(*parts)
    if skip_nonfinite:
        tx = optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)
    return tx
