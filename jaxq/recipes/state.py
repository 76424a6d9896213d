"""Threading recipe state through a train step.

The state of every quantized op (:class:`jaxq.ops.OpState`: amax histories, a PRNG key)
is an ordinary pytree argument of the loss. Statistics of a step reach the next step by
one mechanism: the op's gradient with respect to its state carries what it observed (the
amaxes of its forward operands and of its output gradient, which only the backward pass
sees). :func:`update` rolls those observations into the histories and advances the keys:

.. code-block:: python

    loss, (grads, obs) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, qstate, batch)
    qstate = jaxq.recipes.update(qstate, obs)          # never into the optimizer
    updates, opt_state = tx.update(grads, opt_state, params)

or, in one call, ``jaxq.recipes.value_and_grad(loss_fn)(params, qstate, batch)`` which
returns ``loss, grads, new_qstate``.

Gradient accumulation: combine the observations of the microbatches of one step with
:func:`merge` (an elementwise maximum), then call :func:`update` once per optimizer step;
the history then records the maximum over all microbatches, not the last one. Under
``jit`` with a batch sharded over devices the amax is already the global maximum, so every
device uses the same scale.

Non-finite values never enter a history: observations ignore non-finite elements, and an
observation that is not finite leaves its history unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.ops.dims import canonicalize
from jaxq.ops.spec import SEED_PERIOD, OpState, Recipe

__all__ = ["update", "merge", "value_and_grad", "init_steps"]


def _is_state(x) -> bool:
    return isinstance(x, OpState)


def _roll(hist, obs):
    if hist is None:
        return None
    new = obs[..., 0]
    ok = jnp.isfinite(new)
    rolled = jnp.concatenate([jnp.where(ok, new, 0.0)[..., None], hist[..., :-1]], axis=-1)
    return jnp.where(ok[..., None], rolled, hist)


def _advance(seed):
    """Counts the step of ``[stream, step]`` seeds on (a new stream after 2**24 steps)."""
    if seed is None:
        return None
    stream, step = seed[..., 0], seed[..., 1] + 1
    wrap = step >= SEED_PERIOD
    stream = jnp.where(wrap, jnp.mod(stream + 1, SEED_PERIOD), stream)
    return jnp.stack([stream, jnp.where(wrap, 0.0, step)], axis=-1)


def _update_one(state: OpState, obs: OpState) -> OpState:
    if not isinstance(obs, OpState):
        raise TypeError(
            f"update: observations must mirror the state (an OpState here), got {type(obs)!r}"
        )
    return OpState(
        lhs_history=_roll(state.lhs_history, obs.lhs_history),
        rhs_history=_roll(state.rhs_history, obs.rhs_history),
        grad_history=_roll(state.grad_history, obs.grad_history),
        seed=_advance(state.seed),
    )


def update(state, observations):
    """The next step's recipe state: observations rolled into the histories, keys advanced.

    Args:
        state: a pytree holding :class:`jaxq.ops.OpState` nodes (any nesting, stacked over
            layers or not).
        observations: the gradient of the loss with respect to ``state`` (same structure),
            or several merged with :func:`merge`.

    Returns:
        A pytree like ``state``.

    Example:
        >>> import jax, jax.numpy as jnp, jaxq
        >>> r = jaxq.recipes.FP8Delayed(history_length=4)
        >>> s = r.init()
        >>> x, w = jnp.full((4, 8), 3.0), jnp.ones((8, 2))
        >>> dn = (((1,), (0,)), ((), ()))
        >>> obs = jax.grad(lambda s: jaxq.ops.dot_general(x, w, dn, recipe=r, state=s).sum())(s)
        >>> jaxq.recipes.update(s, obs).lhs_history.tolist()
        [3.0, 0.0, 0.0, 0.0]
    """
    return jax.tree.map(
        lambda s, o: _update_one(s, o) if _is_state(s) else s, state, observations,
        is_leaf=_is_state,
    )  # fmt: skip


def merge(a, b):
    """Combines the observations of two microbatches of one step (elementwise maximum)."""

    def one(x, y):
        if x is None:
            return None
        return jnp.maximum(x, y)

    return jax.tree.map(one, a, b)


def value_and_grad(fn, *, has_aux: bool = False):
    """``jax.value_and_grad`` of ``fn(params, state, *args)`` that also returns the new state.

    Returns a function ``(params, state, *args) -> (value, grads, new_state)`` where
    ``grads`` are the parameter gradients and ``new_state = update(state, observations)``.
    With ``has_aux``, ``value`` is ``(loss, aux)``.

    Example:
        >>> import jax, jax.numpy as jnp, jaxq
        >>> r = jaxq.recipes.FP8Delayed(history_length=2)
        >>> dn = (((1,), (0,)), ((), ()))
        >>> def loss(w, s, x):
        ...     return jaxq.ops.dot_general(x, w, dn, recipe=r, state=s).sum()
        >>> val, g, s = jaxq.recipes.value_and_grad(loss)(jnp.ones((8, 2)), r.init(),
        ...                                               jnp.full((4, 8), 2.0))
        >>> s.lhs_history.tolist(), g.shape
        ([2.0, 0.0], (8, 2))
    """
    vg = jax.value_and_grad(fn, argnums=(0, 1), has_aux=has_aux)

    def wrapped(params, state, *args, **kwargs):
        value, (grads, obs) = vg(params, state, *args, **kwargs)
        return value, grads, update(state, obs)

    return wrapped


def _lsq_init(x3, q):
    """LSQ's initial step ``2 · mean|x| / sqrt(Q_p)`` per group of ``q``'s granularity."""
    a = jnp.abs(x3.astype(jnp.float32))
    qp = float(q.fmt.qmax)
    if q.granularity == "tensor":
        m = jnp.mean(a)
    elif q.granularity == "row":
        m = jnp.mean(a, axis=2, keepdims=True)
    else:
        b, r, k = x3.shape
        m = jnp.mean(a.reshape(b, r, k // q.block_size, q.block_size), axis=-1, keepdims=True)
    return jnp.maximum(2.0 * m / np.sqrt(qp), np.float32(np.finfo(np.float32).tiny))


def init_steps(recipe: Recipe, lhs, rhs, dimension_numbers) -> dict | None:
    """Initial learned step sizes of a ``learned_step`` recipe for one op (LSQ's init).

    ``lhs`` is a sample input batch and ``rhs`` the weight. Steps are per group of the
    quantizer's granularity, in the op's canonical ``(batch, rows, contraction)`` view:
    ``()`` per tensor, ``(B, R, 1)`` per row, ``(B, R, K // block, 1)`` per block.

    Returns:
        ``{"lhs": ..., "rhs": ...}`` (``None`` for an unquantized operand), or ``None`` for a
        recipe without learned steps.

    Example:
        >>> import jax.numpy as jnp, jaxq
        >>> s = init_steps(jaxq.recipes.Int4(), jnp.ones((4, 256)), jnp.ones((256, 8)),
        ...                (((1,), (0,)), ((), ())))
        >>> s["rhs"].shape
        (1, 8, 2, 1)
    """
    if not recipe.learned_step:
        return None
    c = canonicalize(jnp.shape(lhs), jnp.shape(rhs), dimension_numbers, "init_steps")
    for role, q, k in (("lhs", recipe.lhs, c.k), ("rhs", recipe.rhs, c.k)):
        if q is not None and q.granularity == "block" and k % q.block_size:
            raise ValueError(
                f"init_steps: {role} block size {q.block_size} does not divide the "
                f"contraction dimension {k} (lhs {jnp.shape(lhs)}, rhs {jnp.shape(rhs)})"
            )
    return {
        "lhs": None if recipe.lhs is None else _lsq_init(c.lhs(jnp.asarray(lhs)), recipe.lhs),
        "rhs": None if recipe.rhs is None else _lsq_init(c.rhs(jnp.asarray(rhs)), recipe.rhs),
    }
