"""Training :class:`~jaxq.models.GPT` with a low-precision recipe on every hidden matmul.

The hidden projections (``qkv``, ``out``, ``up``, ``down`` of every block) run through
:func:`jaxq.ops.dot_general` with the recipe; the embedding, the readout and the
activation-by-activation products of attention stay in float. Each projection has its own
recipe state (:class:`jaxq.ops.OpState`) and, for ``learned_step`` recipes, its own step
sizes. The train step threads the state functionally:

.. math::

    (\\ell, g_\\theta, o) = \\nabla_{(\\theta, s)} \\mathcal{L}(\\theta, s), \\qquad
    s' = \\mathrm{update}(s, o), \\qquad \\theta' = \\theta + \\mathrm{optimizer}(g_\\theta)

Example:
    >>> import optax, jaxq
    >>> from jaxq.models import GPTConfig, train
    >>> r = train(GPTConfig(d_model=32, n_heads=2, n_layers=1, seq_len=32), optax.adamw(3e-3),
    ...           steps=2, max_bytes=100_000, eval_windows=8,
    ...           recipe=jaxq.recipes.FP8Delayed(history_length=4))
    >>> sorted(r.recipe_state)[:2]
    ['blocks/0/attn/out', 'blocks/0/attn/qkv']
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxq import ops, recipes
from jaxq.models.gpt import GPT

__all__ = ["hidden_linears", "init_recipe_state", "quantized_apply", "make_quantized_train_step"]


def hidden_linears(model: GPT) -> dict[str, nnx.Linear]:
    """The ``nnx.Linear`` projections inside the transformer blocks, by path."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear) and path and path[0] == "blocks":
            out["/".join(map(str, path))] = node
    return dict(sorted(out.items()))


def _capture_inputs(model: GPT, inputs) -> dict[str, jax.Array]:
    seen = {}
    for path, lin in hidden_linears(model).items():

        def record(lhs, rhs, dn, *args, _path=path, **kwargs):
            seen[_path] = lhs
            return jax.lax.dot_general(lhs, rhs, dn, *args, **kwargs)

        lin.dot_general = record
    model(inputs)
    for lin in hidden_linears(model).values():
        lin.dot_general = jax.lax.dot_general
    return seen


def init_recipe_state(model: GPT, recipe: ops.Recipe, key: jax.Array, sample_inputs=None):
    """``(state, steps)``: per-projection recipe state and learned steps (``None`` if unused).

    ``sample_inputs`` (token ids) initialise learned activation steps (LSQ's data init).
    """
    linears = hidden_linears(model)
    keys = jax.random.split(key, len(linears))
    state = {
        p: recipe.init(k if recipe.needs_key else None)
        for p, k in zip(linears, keys, strict=True)
    }
    steps = None
    if recipe.learned_step:
        if recipe.lhs is not None and sample_inputs is None:
            raise ValueError("init_recipe_state: learned activation steps need sample_inputs")
        acts = _capture_inputs(model, sample_inputs) if recipe.lhs is not None else {}
        dn = (((1,), (0,)), ((), ()))
        steps = {}
        for p, lin in linears.items():
            k = lin.kernel.value
            x = acts.get(p, jnp.zeros((1, k.shape[0]), k.dtype))
            steps[p] = recipes.init_steps(recipe, x.reshape(-1, x.shape[-1]), k, dn)
    return state, steps


def quantized_apply(graphdef, params, recipe, state, steps, inputs):
    """Logits of the model with every hidden projection quantized by ``recipe``."""
    model = nnx.merge(graphdef, nnx.State(params)) if not isinstance(params, nnx.State) else \
        nnx.merge(graphdef, params)  # fmt: skip
    for path, lin in hidden_linears(model).items():
        lin.dot_general = functools.partial(
            ops.dot_general, recipe=recipe, state=state[path],
            steps=None if steps is None else steps[path],
        )  # fmt: skip
    return model(inputs)


def make_quantized_train_step(graphdef, optimizer: optax.GradientTransformation, recipe,
                              *, donate: bool = True, compiler_options=None):  # fmt: skip
    """A jitted ``(trainable, opt_state, state, inputs, targets) -> (trainable, opt_state,
    state, loss)`` where ``trainable = {"params": ..., "steps": ...}``.

    The optimizer sees the learned steps like any parameter: exclude them from weight
    decay (e.g. ``optax.adamw(..., mask=...)``) where that matters.
    """
    from jaxq.models.train import cross_entropy

    def loss_fn(trainable, state, inputs, targets):
        logits = quantized_apply(graphdef, trainable["params"], recipe, state,
                                 trainable["steps"], inputs)  # fmt: skip
        return cross_entropy(logits, targets)

    vg = recipes.value_and_grad(loss_fn)

    def step(trainable, opt_state, state, inputs, targets):
        loss, grads, state = vg(trainable, state, inputs, targets)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, state, loss

    return jax.jit(step, donate_argnums=(0, 1, 2) if donate else (),
                   compiler_options=compiler_options)  # fmt: skip


def quantized_window_losses(graphdef, params, recipe, state, steps) -> Any:
    """A ``(inputs, targets) -> per-window mean loss`` of the quantized model (jitted, with
    the parameters as arguments rather than constants)."""

    @jax.jit
    def f(params, state, steps, inputs, targets):
        logits = quantized_apply(graphdef, params, recipe, state, steps, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), targets
        ).mean(axis=-1)

    return functools.partial(f, params, state, steps)
