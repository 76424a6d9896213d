"""FP8 training of a Flax Linen language model with delayed scaling, gradient accumulation
and an orbax checkpoint that resumes bit for bit.

What it shows:

1. A Linen model written the way Flax's own examples write them (``nn.Embed``,
   ``nn.MultiHeadDotProductAttention``, ``nn.Dense``, ``nn.LayerNorm``), knowing nothing
   about jaxq, wrapped with ``jaxq.quantize_model`` and a list of rules: every matmul of the
   decoder blocks runs in FP8 (E4M3 forward, E5M2 gradients) with *delayed* scaling, the
   output head stays in float32.
2. The recipe state (one amax history per quantized tensor) lives in the ``"jaxq"``
   variable collection, next to ``"params"``. It is threaded through the train step like
   ``batch_stats``, never handed to the optimizer.
3. Gradient accumulation: the step runs several microbatches, averages their gradients,
   combines what each microbatch's FP8 ops observed with ``jaxq.recipes.merge`` (an
   elementwise max) and rolls that into the histories once per optimizer step with
   ``jaxq.recipes.update``.
4. A checkpoint of params + recipe state + optimizer state with orbax, restored into a
   fresh run whose next step is identical to the uninterrupted run's.

Run:
    python examples/fp8_training_linen.py --tiny    # well under a minute on a laptop CPU
    python examples/fp8_training_linen.py           # a longer run
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import jaxq
from jaxq import data

# --------------------------------------------------------------------------- the model
# Nothing below knows about jaxq: this is a plain Flax Linen decoder-only LM.


class DecoderBlock(nn.Module):
    d_model: int
    heads: int

    @nn.compact
    def __call__(self, x, _):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(h, mask=mask)
        h = nn.LayerNorm()(x)
        h = nn.Dense(4 * self.d_model, name="mlp_up")(h)
        return x + nn.Dense(self.d_model, name="mlp_down")(nn.gelu(h)), None


class TransformerLM(nn.Module):
    vocab: int = data.VOCAB_SIZE
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    max_len: int = 64

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d_model, name="embed")(tokens)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (self.max_len, self.d_model))
        x = x + pos[: tokens.shape[1]]
        # Layers stacked with nn.scan: compiled once, however deep. Each variable collection
        # gets a leading layer axis; jaxq keeps its recipe state in the "jaxq" collection,
        # so that one is stacked too (the only change a wrapped model needs).
        blocks = nn.scan(DecoderBlock, variable_axes={"params": 0, "jaxq": 0},
                         split_rngs={"params": True}, length=self.layers)  # fmt: skip
        x, _ = blocks(self.d_model, self.heads, name="blocks")(x, None)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm()(x))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a few steps of a small model")
    args = ap.parse_args(argv)
    if args.tiny:
        d_model, layers, seq_len, micro, n_micro, steps = 64, 2, 32, 4, 2, 6
    else:
        d_model, layers, seq_len, micro, n_micro, steps = 128, 2, 64, 8, 2, 150
    t0 = time.perf_counter()

    # ------------------------------------------------------------------ wrap with rules
    # Rules are regexes on module paths ("blocks/attn/query", "blocks/mlp_up", "head");
    # the first rule that fully matches a layer applies, recipe=None keeps it in float.
    recipe = jaxq.recipes.FP8Delayed(history_length=16)
    rules = [
        jaxq.Rule(r"head", recipe=None),
        jaxq.Rule(r"blocks/.*", recipe=recipe),
    ]
    model = TransformerLM(d_model=d_model, layers=layers, max_len=seq_len)
    qmodel = jaxq.quantize_model(model, rules)  # same init/apply, same params tree

    train_tokens, _ = data.split(data.load_tokens(max_bytes=400_000))
    train_tokens = jnp.asarray(train_tokens)
    sample = functools.partial(data.batch, batch_size=micro * n_micro, seq_len=seq_len)

    x0, _ = sample(train_tokens, jax.random.key(0))
    variables = jax.jit(qmodel.init)(jax.random.key(1), x0[:micro])
    params, qstate = variables["params"], variables["jaxq"]
    n_histories = len(jax.tree.leaves(qstate))
    print(f"model: {sum(p.size for p in jax.tree.leaves(params)):,} parameters; "
          f"recipe state: {n_histories} amax histories of length {recipe.history_length}, "
          f"each stacked over the {layers} layers")

    tx = optax.adamw(3e-3, weight_decay=0.01)
    opt_state = tx.init(params)  # parameters only: the recipe state never meets the optimizer
    # Place the training state on a device explicitly ("committed"), as orbax restores it:
    # the resumed run then reuses the compiled step instead of compiling it again.
    params, opt_state, qstate = jax.device_put((params, opt_state, qstate), jax.devices()[0])

    def loss_fn(params, qstate, inputs, targets):
        logits = qmodel.apply({"params": params, "jaxq": qstate}, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    # ------------------------------------------------- one optimizer step, n microbatches
    @jax.jit
    def train_step(params, opt_state, qstate, inputs, targets):
        # Differentiating with respect to the recipe state gives what the FP8 ops
        # *observed* (amaxes of their inputs, weights and, in the backward pass, of the
        # output gradient). Every microbatch uses the same, not yet updated, state.
        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1))
        shape = (n_micro, micro, seq_len)
        mb = (inputs.reshape(shape), targets.reshape(shape))

        def one_microbatch(carry, batch):
            loss_sum, grad_sum, obs = carry
            loss, (grads, new_obs) = grad_fn(params, qstate, *batch)
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            obs = jaxq.recipes.merge(obs, new_obs)  # the max over microbatches
            return (loss_sum + loss, grad_sum, obs), None

        zeros = jax.tree.map(jnp.zeros_like, (params, qstate))
        (loss, grads, obs), _ = jax.lax.scan(one_microbatch, (jnp.float32(0), *zeros), mb)
        grads = jax.tree.map(lambda g: g / n_micro, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        qstate = jaxq.recipes.update(qstate, obs)  # once per optimizer step
        return params, opt_state, qstate, loss / n_micro

    def batch_for(step):
        return sample(train_tokens, jax.random.fold_in(jax.random.key(2), step))

    losses = []
    for step in range(steps):
        params, opt_state, qstate, loss = train_step(params, opt_state, qstate, *batch_for(step))
        losses.append(float(loss))
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"step {step:4d}  train loss {losses[-1]:.4f}")
    hist = qstate["blocks"]["mlp_up"]["state"]  # stacked: one history per layer
    print("blocks/mlp_up amax histories (layer 0, newest first): inputs "
          f"{', '.join(f'{v:.3f}' for v in hist.lhs_history[0, :3])}; output gradients "
          f"{', '.join(f'{v:.2e}' for v in hist.grad_history[0, :3])}")

    # ------------------------------------------------------- checkpoint, restore, resume
    ckpt_state = {"params": params, "jaxq": qstate, "opt_state": opt_state}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(path, ckpt_state)
        ckptr.wait_until_finished()
        # A fresh process would rebuild the *structure* (init + tx.init), then restore the
        # values into it; eval_shape gives that structure without computing anything.
        def fresh():
            v = qmodel.init(jax.random.key(99), x0[:micro])
            return {"params": v["params"], "jaxq": v["jaxq"], "opt_state": tx.init(v["params"])}

        abstract = jax.eval_shape(fresh)
        restored = ckptr.restore(path, abstract)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ckpt_state),
                                                    jax.tree.leaves(restored), strict=True))
    print(f"checkpoint: {size / 1024:.0f} KiB on disk, restored bit-exactly: {same}")
    assert same

    batch = batch_for(steps)
    continued = train_step(params, opt_state, qstate, *batch)
    r = restored
    resumed = train_step(r["params"], r["opt_state"], r["jaxq"], *batch)
    identical = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(continued),
                                                         jax.tree.leaves(resumed), strict=True))
    print(f"next step: uninterrupted loss {float(continued[-1]):.6f}, resumed loss "
          f"{float(resumed[-1]):.6f}; parameters, optimizer and recipe state identical: "
          f"{identical}")
    assert float(continued[-1]) == float(resumed[-1]) and identical

    print(f"RESULT fp8_training_linen: first loss {losses[0]:.4f}, last {losses[-1]:.4f}, "
          f"resumed step identical, {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
