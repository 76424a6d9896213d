"""Float16 training with scale propagation: ``jaxq.scalify`` runs an unmodified JAX training
step on ``ScaledArray`` tensors (float16 data x float32 power-of-two scale), so float16's
narrow exponent range never flushes gradients to zero, without loss scaling.

What it shows:

1. The problem: plain float16 gradients lose precision, then vanish, as they get small
   (here the loss is multiplied by 2^-k, as a large batch mean or a small loss term
   would do; mixed-precision recipes fight this with a tuned loss scale).
2. The fix: ``jaxq.scalify(jax.value_and_grad(loss_fn))`` on parameters converted with
   ``jaxq.as_scaled_array``. The model code (here ``jaxq.models.GPT``, a Flax NNX model) is
   not changed; scalify interprets its jaxpr, keeping each tensor's data near unit range and
   its magnitude in the scale. The gradient error stays the same at every 2^-k.
3. A short training run: float32 master weights and a float16 gradient each step, plain
   and scalified, against float32 on the same data.

Run:
    python examples/scalify_float16.py --tiny
    python examples/scalify_float16.py
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxq
from jaxq import data
from jaxq.models import GPT, GPTConfig, cross_entropy


@jax.jit
def rel_error(grads, ref):
    """Relative L2 error of all gradients together."""
    num = sum(jax.tree.leaves(jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), grads, ref)))
    return jnp.sqrt(num / sum(jnp.sum(b**2) for b in jax.tree.leaves(ref)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a small model and few steps")
    args = ap.parse_args(argv)
    if args.tiny:
        config, steps = GPTConfig(d_model=32, n_heads=2, n_layers=1, seq_len=32), 20
    else:
        config, steps = GPTConfig(d_model=128, n_heads=4, n_layers=2, seq_len=64), 300
    t0 = time.perf_counter()

    train_tokens, val_tokens = data.split(data.load_tokens(max_bytes=300_000))
    train_tokens = jnp.asarray(train_tokens)
    graphdef, params = nnx.split(GPT(config, rngs=nnx.Rngs(0)))  # float32 master weights

    def loss_fn(params, inputs, targets, loss_scale):
        return loss_scale * cross_entropy(nnx.merge(graphdef, params)(inputs), targets)

    # Three ways to compute the same gradient.
    grad_f32 = jax.jit(jax.value_and_grad(loss_fn))

    @jax.jit
    def grad_f16_plain(params, *batch):
        p16 = jax.tree.map(lambda w: w.astype(jnp.float16), params)
        loss, grads = jax.value_and_grad(loss_fn)(p16, *batch)
        return loss, jax.tree.map(lambda g: g.astype(jnp.float32), grads)

    @jax.jit
    def grad_f16_scalify(params, *batch):
        # float16 data, float32 power-of-two scale per tensor: the value is data * scale.
        p16 = jax.tree.map(lambda w: jaxq.as_scaled_array(w.astype(jnp.float16)), params)
        loss, grads = jaxq.scalify(jax.value_and_grad(loss_fn))(p16, *batch)
        # Gradients come back as ScaledArrays (float16 data); the optimizer takes float32.
        to_f32 = lambda g: jaxq.asarray(g, jnp.float32)
        return to_f32(loss), jax.tree.map(to_f32, grads, is_leaf=jaxq.scaled.is_scaled)

    def batch(i):
        key = jax.random.fold_in(jax.random.key(0), i)
        return data.batch(train_tokens, key, batch_size=16, seq_len=config.seq_len)

    x, y = batch(steps)  # a batch the training run below does not see
    print("relative L2 error of the float16 gradients against float32, loss scaled by 2^-k:")
    print(f"{'k':>4s} {'plain float16':>15s} {'scalify float16':>16s}")
    errors = {}
    for k in (0, 12, 24):
        s = jnp.float32(2.0**-k)
        ref = grad_f32(params, x, y, s)[1]
        errors[k] = (float(rel_error(grad_f16_plain(params, x, y, s)[1], ref)),
                     float(rel_error(grad_f16_scalify(params, x, y, s)[1], ref)))  # fmt: skip
        print(f"{k:4d} {errors[k][0]:15.2%} {errors[k][1]:16.2%}")

    # ------------------------------------------ training: float32 master weights, f16 grads
    tx = optax.adamw(3e-3)

    @jax.jit
    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # Held-out loss over 4 x 64 windows (one compiled forward, run 4 times).
    val = [data.batch(jnp.asarray(val_tokens), jax.random.fold_in(jax.random.key(1), i),
                      batch_size=64, seq_len=config.seq_len) for i in range(4)]  # fmt: skip
    loss_f32 = jax.jit(loss_fn)

    finals = {}
    runs = [("float32", grad_f32), ("float16 (plain)", grad_f16_plain),
            ("float16 scalify", grad_f16_scalify)]
    for name, grad_fn in runs:
        p, opt_state, losses = params, tx.init(params), []
        for i in range(steps):
            loss, grads = grad_fn(p, *batch(i), jnp.float32(1.0))
            p, opt_state = update(grads, opt_state, p)  # in float32
            losses.append(float(loss))
        finals[name] = float(np.mean([loss_f32(p, x, y, jnp.float32(1.0)) for x, y in val]))
        tail = float(np.mean(losses[-max(1, steps // 10):]))  # the last 10% of the steps
        print(f"{name:16s} train loss {losses[0]:.4f} -> {tail:.4f} (mean of the last "
              f"{max(1, steps // 10)} steps), validation {finals[name]:.4f}")
    diff = finals["float16 scalify"] / finals["float32"] - 1
    plain = finals["float16 (plain)"] / finals["float32"] - 1
    # At this scale nothing underflows, so plain float16 casts train too: what remains is
    # float16 arithmetic itself, the same with and without scalify.
    print(f"validation loss after {steps} steps against float32: float16 plain {plain:+.2%}, "
          f"float16 scalify {diff:+.2%}")

    assert errors[24][1] < 0.05 and errors[24][0] > 0.5  # plain float16 lost the gradients
    print(f"RESULT scalify_float16: gradient error at 2^-24 plain {errors[24][0]:.1%} vs "
          f"scalify {errors[24][1]:.2%}; val loss float32 {finals['float32']:.4f}, float16 "
          f"plain {finals['float16 (plain)']:.4f} ({plain:+.2%}), scalify "
          f"{finals['float16 scalify']:.4f} ({diff:+.2%}); "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
