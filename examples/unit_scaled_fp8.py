"""Unit-scaled (u-muP) transformers: FP8 training with *static* scales, and a learning rate
that transfers across model width.

What it shows:

1. ``jaxq.unit_scaling.TransformerDecoder`` is built from unit-scaled ops: every op has
   separate forward and backward scale factors so that activations, weights and gradients
   all sit near unit variance. FP8 then needs no amax statistics and no history: every
   hidden matmul casts to E4M3 (forward) and E5M2 (gradients) at scale 1
   (``dot_general=jaxq.unit_scaling.fp8_dot_general``).
2. ``jaxq.unit_scaling.optim.adamw`` applies u-muP's per-parameter learning rates (from
   each parameter's role, fan-in and depth tags), so one global learning rate is the
   right one at every width: sweep it on a narrow model, reuse it on a wide one.
3. The learning rate is injected as a hyperparameter (``optax.inject_hyperparams``), so the
   train step is compiled once per width and reused for every learning rate.

Run:
    python examples/unit_scaled_fp8.py --tiny
    python examples/unit_scaled_fp8.py
"""

from __future__ import annotations

import argparse
import math
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxq import data
from jaxq import unit_scaling as us
from jaxq.unit_scaling import training


def sweep(width, lrs, *, layers, head_dim, steps, batch_size, seq_len, train, val):
    """Validation loss (nats/byte) after ``steps`` FP8 steps at each learning rate."""
    model = us.TransformerDecoder(features=width, layers=layers, heads=width // head_dim,
                                  dot_general=us.fp8_dot_general, rngs=nnx.Rngs(0))  # fmt: skip
    graphdef, params0, rest = nnx.split(model, nnx.Param, ...)
    # u-muP AdamW; its learning rate becomes part of the optimizer state, so changing it
    # does not recompile the step. The tags (role, fan-in, depth) are static.
    tx = optax.inject_hyperparams(
        us.optim.adamw, static_args=("tags", "independent_weight_decay", "default_scale",
                                     "skip_nonfinite"),
    )(learning_rate=1.0, tags=us.param_tags(model))  # fmt: skip
    kw = dict(batch_size=batch_size, seq_len=seq_len)
    step = training.make_train_step(graphdef, rest, tx, train_tokens=train, **kw)
    evaluate = training.make_eval(graphdef, rest, val, **kw)
    out = []
    for lr in lrs:
        opt_state = tx.init(params0)
        opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
        params, _, losses = training.run_steps(step, params0, opt_state, steps=steps)
        out.append(float(evaluate(params)) if np.all(np.isfinite(losses)) else float("nan"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="two small widths, a few steps")
    args = ap.parse_args(argv)
    if args.tiny:
        widths, lrs = (32, 64), [2.0**e for e in (-3, -1, 1)]
        cfg = dict(layers=1, head_dim=16, steps=20, batch_size=16, seq_len=32)
    else:
        widths, lrs = (64, 256), [2.0**e for e in range(-5, 1)]
        cfg = dict(layers=2, head_dim=32, steps=100, batch_size=16, seq_len=32)
    t0 = time.perf_counter()
    train, val = data.split(data.load_tokens(max_bytes=1_000_000))

    losses = {w: sweep(w, lrs, train=train, val=val, **cfg) for w in widths}
    best = {w: lrs[int(np.nanargmin(v))] for w, v in losses.items()}

    print(f"validation loss (nats/byte) after {cfg['steps']} steps, FP8 E4M3/E5M2 at scale 1:")
    print(f"{'global lr':>10s} " + " ".join(f"{f'width {w}':>12s}" for w in widths))
    for i, lr in enumerate(lrs):
        cells = [f"{losses[w][i]:10.4f}{' *' if lr == best[w] else '  '}" for w in widths]
        print(f"{f'2^{round(math.log2(lr))}':>10s} " + " ".join(cells))
    apart = abs(round(math.log2(best[widths[0]])) - round(math.log2(best[widths[1]])))
    print("best learning rate: " + ", ".join(
        f"width {w}: 2^{round(math.log2(best[w]))}" for w in widths
    ) + f" ({apart} grid step(s) apart)")  # fmt: skip
    print("RESULT unit_scaled_fp8: best lr " + ", ".join(
        f"width {w} 2^{round(math.log2(best[w]))} (val {min(losses[w]):.4f})" for w in widths
    ) + f"; {time.perf_counter() - t0:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
