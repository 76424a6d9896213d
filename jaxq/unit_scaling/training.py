"""A minimal functional training loop for language models (used by tests and benchmarks).

The step and the evaluation are compiled once per model shape and take every array
(parameters, optimiser state, key) as an argument, so sweeps over hyperparameters held
in the optimiser state (``optax.inject_hyperparams``) reuse one compilation.

Example:
    >>> from flax import nnx
    >>> from jaxq import data
    >>> from jaxq.unit_scaling import TransformerDecoder, optim, training
    >>> tokens = data.load_tokens(max_bytes=50_000)
    >>> train, val = data.split(tokens)
    >>> model = TransformerDecoder(features=16, layers=1, heads=2, rngs=nnx.Rngs(0))
    >>> out = training.train_lm(model, optim.adamw(0.1, tags=model), train, val,
    ...                         steps=2, batch_size=2, seq_len=16)
    >>> sorted(out)
    ['train_losses', 'val_loss']
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxq import data

__all__ = ["make_train_step", "make_eval", "run_steps", "train_lm"]


def make_train_step(
    graphdef,
    rest,
    tx: optax.GradientTransformation,
    *,
    batch_size: int,
    seq_len: int,
    train_tokens,
) -> Callable:
    """A jitted ``step(params, opt_state, key) -> (params, opt_state, loss)``.

    The model (``graphdef``, ``rest`` from ``nnx.split(model, nnx.Param, ...)``) must have
    a ``loss(tokens, targets)`` method. The batch is drawn inside the step from ``key``.
    """
    train_tokens = jnp.asarray(train_tokens)

    @jax.jit
    def step(params, opt_state, key):
        x, y = data.batch(train_tokens, key, batch_size=batch_size, seq_len=seq_len)

        def loss_fn(p):
            return nnx.merge(graphdef, p, rest).loss(x, y)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def make_eval(
    graphdef, rest, val_tokens, *, batch_size: int, seq_len: int, batches: int = 4,
    seed: int = 1234,
) -> Callable:  # fmt: skip
    """A jitted ``evaluate(params) -> mean loss`` over ``batches`` fixed validation windows."""
    val_tokens = jnp.asarray(val_tokens)
    keys = jax.random.split(jax.random.key(seed), batches)

    @jax.jit
    def evaluate(params):
        def one(key):
            x, y = data.batch(val_tokens, key, batch_size=batch_size, seq_len=seq_len)
            return nnx.merge(graphdef, params, rest).loss(x, y)

        return jax.lax.map(one, keys).mean()

    return evaluate


def run_steps(step, params, opt_state, *, steps: int, seed: int = 0):
    """Runs ``steps`` steps; returns ``(params, opt_state, [float losses])``."""
    losses = []
    for k in jax.random.split(jax.random.key(seed), steps):
        params, opt_state, loss = step(params, opt_state, k)
        losses.append(loss)
    return params, opt_state, [float(v) for v in losses]


def train_lm(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    train_tokens,
    val_tokens,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    eval_batches: int = 4,
) -> dict:
    """Trains ``model`` in place for ``steps`` steps.

    Returns:
        ``{"train_losses": [...], "val_loss": float}``; ``val_loss`` is NaN if any
        training loss was non-finite (diverged).
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    kw = dict(batch_size=batch_size, seq_len=seq_len)
    step = make_train_step(graphdef, rest, tx, train_tokens=train_tokens, **kw)
    params, _, losses = run_steps(step, params, tx.init(params), steps=steps, seed=seed)
    val = float("nan")
    if np.all(np.isfinite(losses)):
        val = float(make_eval(graphdef, rest, val_tokens, batches=eval_batches, **kw)(params))
    nnx.update(model, params)
    return {"train_losses": losses, "val_loss": val}
