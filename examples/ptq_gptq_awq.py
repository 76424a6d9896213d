"""Post-training quantization of a trained GPT: round-to-nearest, AWQ, GPTQ, Hadamard rotation
and FP8 W8A8, compared on validation loss and weight bytes.

What it shows:

1. ``jaxq.ptq.convert(model, None, rules, calibration=batches)`` turns a trained float NNX
   model into a serving model whose selected layers hold packed quantized weights
   (``jaxq.ptq.W4(group)``: int4 in groups along the contraction, two codes per byte).
2. The algorithms prepare a *plan* that ``convert`` applies; they compose in order:
   ``rotate`` (random block Hadamard, the float model is unchanged), ``smoothquant``,
   ``awq`` (activation-aware scale and clipping search), ``gptq`` (error-compensating
   rounding on each layer's input Hessian). All run the float model over the calibration
   batches.
3. Activation quantization (``W8A8("e4m3")``): a static per-tensor activation scale
   calibrated on the same batches.

Run:
    python examples/ptq_gptq_awq.py --tiny
    python examples/ptq_gptq_awq.py
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import jaxq
from jaxq import data, ptq
from jaxq.models import GPTConfig, evaluate, train


def block_weight_bytes(model) -> int:
    """Bytes of the kernels of the block projections (float, or codes + scales)."""
    return sum(ptq.weight_bytes(vars(layer)["kernel"].get_value())
               for _, layer, _ in jaxq.wrapping.layers(model))  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a small model trained briefly")
    args = ap.parse_args(argv)
    if args.tiny:
        # d_ff = d_model: fewer distinct layer shapes, so fewer compiled GPTQ/AWQ solvers.
        config = GPTConfig(d_model=64, n_heads=4, n_layers=1, seq_len=32, d_ff=64)
        steps, group, n_calib, windows = 100, 64, 2, 64
    else:
        config = GPTConfig(d_model=128, n_heads=4, n_layers=2, seq_len=64)
        steps, group, n_calib, windows = 600, 128, 4, 256
    t0 = time.perf_counter()

    # ---------------------------------------------------------- a trained float model
    tokens = data.load_tokens(max_bytes=1_000_000)
    train_tokens, val_tokens = data.split(tokens)
    result = train(config, optax.adamw(3e-3), steps=steps, corpus=(train_tokens, val_tokens),
                   batch_size=16, eval_windows=8)  # fmt: skip
    model = result.model
    print(f"trained GPT ({config.n_layers} layers, d_model {config.d_model}) for {steps} "
          f"steps: train loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")

    # Calibration: a few batches of training text (inputs only, as the model is called).
    calibration = [data.batch(jnp.asarray(train_tokens), jax.random.key(1000 + i), batch_size=8,
                              seq_len=config.seq_len)[0] for i in range(n_calib)]  # fmt: skip

    def score(m):
        return evaluate(m, val_tokens, max_windows=windows)

    # Every projection in the blocks is quantized; the embeddings, LayerNorms and the tied
    # readout (not a layer: the model multiplies by its embedding table) stay float32.
    def rules(scheme):
        return [jaxq.Rule(r"blocks/.*", recipe=scheme)]

    # (name, scheme, algorithms applied before convert)
    w4, w2 = ptq.W4(group), ptq.W2(group)
    rows = [
        (f"W4 g{group} round-to-nearest", w4, ()),
        # At 2 bits (levels -1, 0, 1) rounding errors are large: where the algorithms matter.
        (f"W2 g{group} round-to-nearest", w2, ()),
        (f"W2 g{group} AWQ", w2, ("awq",)),
        (f"W2 g{group} GPTQ", w2, ("gptq",)),
        ("W8A8 FP8 (E4M3, static)", ptq.W8A8("e4m3"), ()),
    ]
    if not args.tiny:
        rows[:0] = [("W8 per-channel", ptq.W8(), ())]
        rows[2:2] = [(f"W4 g{group} AWQ", w4, ("awq",)), (f"W4 g{group} GPTQ", w4, ("gptq",)),
                     (f"W4 g{group} rotation + GPTQ", w4, ("rotate", "gptq"))]
        rows.insert(-1, ("W8A8 int8 + SmoothQuant", ptq.W8A8("int8"), ("smoothquant",)))
    algorithms = {"rotate": ptq.rotate, "smoothquant": ptq.smoothquant, "awq": ptq.awq,
                  "gptq": ptq.gptq}  # fmt: skip

    base, f32_bytes = score(model), block_weight_bytes(model)
    table = [("float32", base, f32_bytes, 0.0)]
    for name, scheme, algos in rows:
        t = time.perf_counter()
        plan = None  # each algorithm extends the plan of the previous one
        for algo in algos:
            plan = algorithms[algo](model, None, rules(scheme), calibration, plan=plan)
        served = ptq.convert(model, None, rules(scheme), calibration=calibration, plan=plan)
        seconds = time.perf_counter() - t
        table.append((name, score(served.model), block_weight_bytes(served.model), seconds))
        print(f"  converted: {name} ({seconds:.1f} s)")

    print(f"\n{'scheme':30s} {'val loss':>9s} {'vs float':>9s} {'block weights':>14s} "
          f"{'ratio':>7s}")
    for name, loss, nbytes, _ in table:
        print(f"{name:30s} {loss:9.4f} {loss / base - 1:+9.2%} {nbytes / 1024:10.1f} KiB "
              f"{nbytes / f32_bytes:6.3f}x")

    loss = {name: v for name, v, _, _ in table}
    nbytes = {name: b for name, _, b, _ in table}

    def vs_float(name):
        return f"{loss[name] / base - 1:+.2%}"

    print(f"RESULT ptq_gptq_awq: val loss float {base:.4f}; W4 RTN "
          f"{vs_float(f'W4 g{group} round-to-nearest')}; W2 RTN "
          f"{vs_float(f'W2 g{group} round-to-nearest')}, AWQ {vs_float(f'W2 g{group} AWQ')}, "
          f"GPTQ {vs_float(f'W2 g{group} GPTQ')}; FP8 {vs_float('W8A8 FP8 (E4M3, static)')}; "
          f"W4 weights {nbytes[f'W4 g{group} round-to-nearest'] / f32_bytes:.3f}x float32; "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
