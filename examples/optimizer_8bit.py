"""8-bit and 4-bit AdamW (``jaxq.optim``) as drop-in optax optimizers: the same training run
with a quarter (8-bit) or an eighth (4-bit) of the optimizer-state memory.

What it shows:

1. ``jaxq.optim.adamw_8bit`` / ``adamw_4bit`` are ordinary ``optax.GradientTransformation``s:
   they chain with ``optax.clip_by_global_norm`` (and schedules, ``MultiSteps``,
   ``apply_if_finite``...) exactly like ``optax.adamw``.
2. Their state is real quantized storage: ``jaxq.optim.state_nbytes`` counts the bytes of
   codes and block scales (8-bit: ~2 bytes per parameter for both Adam moments, 4-bit: ~1,
   float32 AdamW: 8). Tensors under 4096 elements (biases, LayerNorms) keep float32 state.
3. The training curves stay on top of float32 AdamW's.

Run:
    python examples/optimizer_8bit.py --tiny
    python examples/optimizer_8bit.py
"""

from __future__ import annotations

import argparse
import time

import optax

from jaxq import data, optim
from jaxq.models import GPTConfig, num_params, train


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a small model and few steps")
    args = ap.parse_args(argv)
    if args.tiny:
        config = GPTConfig(d_model=64, n_heads=4, n_layers=1, seq_len=32)
        steps = 20
    else:
        config = GPTConfig(d_model=128, n_heads=4, n_layers=2, seq_len=64)
        steps = 300
    t0 = time.perf_counter()
    corpus = data.split(data.load_tokens(max_bytes=1_000_000))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, steps // 10, steps)

    optimizers = {
        "optax.adamw (float32)": optax.adamw(schedule, weight_decay=0.1),
        "jaxq.optim.adamw_8bit": optim.adamw_8bit(schedule, weight_decay=0.1),
        "jaxq.optim.adamw_4bit": optim.adamw_4bit(schedule, weight_decay=0.1),
    }
    n = num_params(config)
    print(f"GPT with {n:,} parameters, {steps} steps per optimizer (same data and init)")
    results = {}
    for name, opt in optimizers.items():
        tx = optax.chain(optax.clip_by_global_norm(1.0), opt)
        r = train(config, tx, steps=steps, seed=0, corpus=corpus, batch_size=16,
                  eval_windows=64)  # fmt: skip
        nbytes = optim.state_nbytes(r.opt_state)  # codes + scales + the float32 leftovers
        results[name] = (r.losses, r.val_loss, nbytes)
        print(f"  {name:24s} train loss {r.losses[0]:.3f} -> {r.losses[-1]:.3f}, "
              f"validation {r.val_loss:.4f}, state {nbytes / 1024:8.1f} KiB")

    base_val, base_bytes = results["optax.adamw (float32)"][1:]
    print(f"\n{'optimizer':24s} {'state':>11s} {'bytes/param':>12s} {'vs float32':>11s} "
          f"{'val loss':>9s} {'vs float32':>11s}")
    for name, (_, val, nbytes) in results.items():
        print(f"{name:24s} {nbytes / 1024:7.1f} KiB {nbytes / n:12.3f} "
              f"{nbytes / base_bytes:10.3f}x {val:9.4f} {val / base_val - 1:+10.2%}")

    v8, b8 = results["jaxq.optim.adamw_8bit"][1:]
    v4, b4 = results["jaxq.optim.adamw_4bit"][1:]
    print(f"RESULT optimizer_8bit: state bytes/param float32 {base_bytes / n:.2f}, 8-bit "
          f"{b8 / n:.2f}, 4-bit {b4 / n:.2f}; val loss float32 {base_val:.4f}, 8-bit {v8:.4f}, "
          f"4-bit {v4:.4f}; {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
