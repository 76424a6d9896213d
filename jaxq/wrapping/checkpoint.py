"""What a wrapped model's checkpoint was written under, and a check on restore.

Orbax restores arrays by path and shape. State written under other rules can still fit:
an FP8 history of the same length under another recipe, a model whose rules now skip a
layer, learned steps of another block size that happen to have the same shape. Restoring
such a checkpoint silently mixes incompatible scales. :func:`signature` describes what each
wrapped layer computes with (op, recipe, shapes and dtypes of its state and learned steps)
as plain JSON-able data, to be saved beside the arrays; :func:`check_signature` compares a
model with a saved signature and raises a ``ValueError`` that lists every difference.
:func:`save` and :func:`restore` do both around orbax's ``StandardCheckpointer``.

Example:
    >>> import jaxq
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(64, 64, rngs=nnx.Rngs(0)))
    >>> q8 = jaxq.quantize_model(model, [jaxq.Rule(".*", recipe=jaxq.recipes.FP8Delayed())])
    >>> q4 = jaxq.quantize_model(model, [jaxq.Rule(".*", recipe=jaxq.recipes.MXFP8())])
    >>> try:
    ...     jaxq.wrapping.check_signature(q4, jaxq.wrapping.signature(q8))
    ... except ValueError as e:
    ...     print(str(e).split(": ", 1)[1].split(";")[0])
    layers/0: recipe grad.block_size None in the checkpoint, 32 in the model
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxq.wrapping.nnx import layers, learned_steps_of

__all__ = ["signature", "check_signature", "save", "restore"]


def _describe_tree(tree) -> list[str]:
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        out.append(f"{name}: {np.dtype(leaf.dtype).name}{list(np.shape(leaf))}")
    return out


def _fields(obj, prefix="") -> dict[str, str]:
    """A recipe's settings flattened to ``{"lhs.fmt": "float8_e4m3fn", ...}``."""
    if not dataclasses.is_dataclass(obj):
        return {prefix.rstrip("."): str(getattr(obj, "name", obj))}
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not hasattr(value, "itemsize"):
            out.update(_fields(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = str(getattr(value, "name", value))
    return out


def signature(model) -> dict:
    """``{layer path: {"op", "recipe", "state", "steps"}}`` of a wrapped NNX model (a Linen
    module's variables: ``{"jaxq": shapes of the recipe-state collection}``).

    Layers that no rule wraps appear with ``recipe: None``.
    """
    if not isinstance(model, nnx.Module):
        return {"jaxq": _describe_tree(model.get("jaxq", {}))} if isinstance(model, dict) \
            else {}  # fmt: skip
    sig = {}
    for path, layer, op in layers(model):
        entry = {"op": op, "recipe": None, "state": [], "steps": []}
        attrs = vars(layer)
        if "jaxq_recipe" in attrs:
            entry["recipe"] = _fields(attrs["jaxq_recipe"])
        if "jaxq_state" in attrs:
            entry["state"] = _describe_tree(attrs["jaxq_state"].get_value())
        entry["steps"] = _describe_tree(learned_steps_of(layer))
        sig[path] = entry
    return sig


def _recipe_name(fields: dict | None) -> str:
    return "no recipe" if fields is None else f"recipe {fields.get('name')}"


def check_signature(model, saved: dict) -> None:
    """Raises ``ValueError`` listing how ``model`` differs from a saved :func:`signature`.

    Args:
        model: the wrapped model (NNX) or variables dict (Linen) about to receive the state.
        saved: the signature stored with the checkpoint.
    """
    now = signature(model)
    diffs = []
    for path in sorted(set(saved) | set(now)):
        if path not in now:
            diffs.append(f"{path}: in the checkpoint, not in the model")
            continue
        if path not in saved:
            diffs.append(f"{path}: in the model, not in the checkpoint")
            continue
        a, b = saved[path], now[path]
        if isinstance(a, list) or isinstance(b, list):
            if a != b:
                diffs.append(f"{path}: state {a} in the checkpoint, {b} in the model")
            continue
        ra, rb = a.get("recipe"), b.get("recipe")
        if ra is None or rb is None:
            if ra != rb:
                diffs.append(f"{path}: {_recipe_name(ra)} in the checkpoint, "
                             f"{_recipe_name(rb)} in the model")  # fmt: skip
            continue
        for key in sorted(set(ra) | set(rb)):
            if ra.get(key) != rb.get(key):
                diffs.append(f"{path}: recipe {key} {ra.get(key)} in the checkpoint, "
                             f"{rb.get(key)} in the model")  # fmt: skip
        for field in ("op", "state", "steps"):
            if a.get(field) != b.get(field):
                diffs.append(f"{path}: {field} {a.get(field)} in the checkpoint, "
                             f"{b.get(field)} in the model")  # fmt: skip
    if diffs:
        raise ValueError("the checkpoint was written under other rules or formats: "
                         + "; ".join(diffs))  # fmt: skip


def save(directory: str | Path, model: nnx.Module, *, extra=None) -> None:
    """Saves a wrapped NNX model's state (parameters, recipe state, learned steps) and its
    :func:`signature` with orbax, plus an optional pytree ``extra`` (e.g. the optimizer
    state, ``jaxq.optim``'s 8-bit states included). ``directory`` must not exist."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(directory / "state", {"model": nnx.state(model), "extra": extra})
    ckpt.wait_until_finished()
    (directory / "jaxq_signature.json").write_text(json.dumps(signature(model), indent=1))


def restore(directory: str | Path, model: nnx.Module, *, extra=None, shardings=None):
    """Restores :func:`save`'s checkpoint into ``model`` (in place) after checking that the
    model was wrapped under the same rules and formats.

    Args:
        directory: what :func:`save` wrote.
        model: a wrapped model of the same structure (e.g. freshly wrapped, any values).
        extra: a pytree like the saved ``extra`` (its values are ignored), or ``None``.
        shardings: an optional pytree of ``jax.sharding.Sharding`` like
            ``{"model": nnx.state(model), "extra": extra}`` to restore onto another
            layout (default: the layout of ``model``'s and ``extra``'s arrays).

    Returns:
        The restored ``extra`` (``None`` if none was given).

    Raises:
        ValueError: the model's rules or formats differ from the checkpoint's (every
            difference listed).
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    check_signature(model, json.loads((directory / "jaxq_signature.json").read_text()))
    target = {"model": nnx.state(model), "extra": extra}

    def abstract(x, s=None):
        sharding = s if s is not None else getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    if shardings is None:
        target = jax.tree.map(abstract, target)
    else:
        target = jax.tree.map(abstract, target, shardings)
    restored = ocp.StandardCheckpointer().restore(directory / "state", target)
    nnx.update(model, restored["model"])
    return restored["extra"]


