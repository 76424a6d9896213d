"""INT4 quantization-aware training (QAT) of a Flax NNX model with learned step sizes, then
conversion to a serving model with packed 4-bit weights that computes exactly the QAT
forward.

What it shows:

1. A float ``jaxq.models.GPT`` (an ordinary NNX model) trained briefly.
2. The baseline: post-training round-to-nearest INT4 (``jaxq.ptq.W4``) of that model.
3. QAT: ``jaxq.quantize_model`` with ``jaxq.recipes.Int4(block_size=..., learned_step=True)``
   gives every block projection int4 weights in groups along the contraction, with one
   *learned* step size per group (LSQ) stored as an ``nnx.Param`` next to the kernel, so the
   same optimizer trains weights and steps. ``jaxq.wrapping.value_and_grad`` is the
   ``nnx.value_and_grad`` to use with wrapped models.
4. ``jaxq.ptq.convert`` of the QAT model: the learned steps become the serving scales, the
   weights are stored packed (two 4-bit codes per byte), and the served model's output is
   bit for bit the QAT model's.

The float model is fine-tuned for as many steps as the QAT model, so the table compares
like with like. On a model this small, int4 with groups of 32-64 costs little even by
round-to-nearest; QAT earns its keep on larger models and at lower bit widths.

Run:
    python examples/qat_int4_nnx.py --tiny
    python examples/qat_int4_nnx.py
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxq
from jaxq import data, ptq
from jaxq.models import GPT, GPTConfig, cross_entropy


def loss_fn(model, inputs, targets):
    return cross_entropy(model(inputs), targets)


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"))
def train_step(graphdef, tx, params, rest, opt_state, inputs, targets):
    """One optimizer step in NNX's functional form: merge the model inside ``jit``."""
    model = nnx.merge(graphdef, params, rest)
    # jaxq.wrapping.value_and_grad is nnx.value_and_grad for wrapped models: it returns the
    # nnx.Param gradients and rolls what stateful recipes observed into their state. On a
    # float model it is plain nnx.value_and_grad.
    loss, grads = jaxq.wrapping.value_and_grad(loss_fn)(model, inputs, targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    _, _, rest = nnx.split(model, nnx.Param, ...)
    return params, rest, opt_state, loss


def fit(model, tx, batches, *, learning_rate, label):
    """Trains ``model`` in place: its parameters (kernels, biases and, for QAT, the learned
    step sizes: all ``nnx.Param``) go to optax; the rest (recipe state, if any) is threaded
    through the step. The step compiles once per model structure; the learning rate is
    part of the optimizer state (``optax.inject_hyperparams``), so changing it does not
    recompile."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)
    opt_state.hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    for i, (x, y) in enumerate(batches):
        params, rest, opt_state, loss = train_step(graphdef, tx, params, rest, opt_state, x, y)
        if i % max(1, len(batches) // 4) == 0 or i == len(batches) - 1:
            print(f"{label} step {i:4d}  train loss {float(loss):.4f}")
    nnx.update(model, params, rest)


def block_weight_bytes(model) -> int:
    """Bytes of the kernels of the layers jaxq can quantize (float, or packed with scales)."""
    return sum(ptq.weight_bytes(vars(layer)["kernel"].get_value())
               for _, layer, _ in jaxq.wrapping.layers(model))  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a small model and few steps")
    args = ap.parse_args(argv)
    if args.tiny:
        config = GPTConfig(d_model=64, n_heads=4, n_layers=1, seq_len=32)
        float_steps, qat_steps, block = 40, 10, 32
    else:
        config = GPTConfig(d_model=128, n_heads=4, n_layers=2, seq_len=64)
        float_steps, qat_steps, block = 500, 150, 64
    t0 = time.perf_counter()

    train_tokens, val_tokens = data.split(data.load_tokens(max_bytes=500_000))
    train_tokens = jnp.asarray(train_tokens)

    def batches(n, seed):
        return [data.batch(train_tokens, jax.random.fold_in(jax.random.key(seed), i),
                           batch_size=16, seq_len=config.seq_len) for i in range(n)]  # fmt: skip

    # Fixed held-out windows, scored the same way for every model below.
    idx = np.arange(32)[:, None] * config.seq_len + np.arange(config.seq_len + 1)[None, :]
    val = jnp.asarray(val_tokens[idx])

    @nnx.jit
    def evaluate(m):
        logits = m(val[:, :-1])
        return cross_entropy(logits, val[:, 1:]), logits

    # ------------------------------------------------------------- a float model first
    model = nnx.jit(lambda: GPT(config, rngs=nnx.Rngs(0)))()  # created by one compiled call
    tx = optax.inject_hyperparams(optax.adamw)(learning_rate=0.0)  # set by fit()
    fit(model, tx, batches(float_steps, 0), learning_rate=2e-3, label="float")

    # Which layers to quantize: every projection inside the blocks. The tied readout is not
    # a layer (the model multiplies by its embedding table) and stays float.
    def rules(recipe):
        return [jaxq.Rule(r"blocks/.*", recipe=recipe)]

    calibration = [x for x, _ in batches(2, 100)]

    # ---------------------------------------------------- quantization-aware fine-tuning
    qat = jaxq.recipes.Int4(block_size=block, learned_step=True)
    qmodel = jaxq.quantize_model(model, rules(qat))  # a copy; `model` stays float
    steps0 = qmodel.blocks[0].mlp.up.jaxq_step_rhs.get_value()
    print(f"learned step sizes of blocks/0/mlp/up: {steps0.size} (one per group of {block} "
          f"weights), initialised by LSQ's rule, mean {float(steps0.mean()):.2e}")
    fine_tune = batches(qat_steps, 1)
    # Fine-tuning wants a smaller learning rate than training from scratch: Adam moves every
    # parameter, the learned step sizes included, by about the learning rate per step.
    fit(qmodel, tx, fine_tune, learning_rate=3e-4, label="QAT")
    steps = qmodel.blocks[0].mlp.up.jaxq_step_rhs.get_value()
    print(f"the step sizes moved by {float(jnp.abs(steps / steps0 - 1).mean()):.1%} on average")
    fit(model, tx, fine_tune, learning_rate=3e-4, label="float fine-tuning")  # same, in float

    # ------------------------------ the baseline: post-training round-to-nearest, no QAT
    rtn = ptq.convert(model, None, rules(ptq.W4(block)), calibration=calibration)

    # --------------------------------------------- convert: learned steps -> serving scales
    served = ptq.convert(qmodel, None, rules(qat), calibration=calibration)
    qw = vars(served.model.blocks[0].mlp.up)["kernel"].get_value()
    print(f"served blocks/0/mlp/up: codes {qw.weight.codes.shape} {qw.weight.codes.dtype} "
          f"(two int4 codes per byte) for the kernel {qw.kernel_shape}")

    results = {}
    for name, m in [("float32", model), ("int4 round-to-nearest (PTQ)", rtn.model),
                    ("int4 QAT (fake-quant)", qmodel), ("int4 served (packed)", served.model)]:
        loss, logits = evaluate(m)
        results[name] = (float(loss), np.asarray(logits), block_weight_bytes(m))

    # Serving computes exactly the QAT forward: same codes, same scales, same product.
    same = np.array_equal(results["int4 QAT (fake-quant)"][1], results["int4 served (packed)"][1])
    print(f"served logits bit-equal to the QAT model's: {same}")
    assert same

    base, f32_bytes = results["float32"][0], results["float32"][2]
    print(f"\n{'model':28s} {'val loss':>9s} {'vs float':>9s} {'block weights':>14s}")
    for name, (loss, _, nbytes) in results.items():
        print(f"{name:28s} {loss:9.4f} {loss / base - 1:+9.2%} {nbytes / 1024:10.1f} KiB")
    served_bytes = results["int4 served (packed)"][2]
    print(f"packed int4 block weights: {served_bytes / f32_bytes:.3f}x float32, "
          f"{32 * served_bytes / f32_bytes:.2f} bits per weight (group scales included)")

    loss = {k: v[0] for k, v in results.items()}
    print(f"RESULT qat_int4_nnx: val loss float {base:.4f}, "
          f"RTN {loss['int4 round-to-nearest (PTQ)']:.4f}, QAT {loss['int4 QAT (fake-quant)']:.4f}"
          f", served {loss['int4 served (packed)']:.4f} (bit-equal to QAT); weights "
          f"{served_bytes / f32_bytes:.3f}x float32; {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
