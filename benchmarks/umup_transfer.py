"""u-muP learning-rate transfer: sweep the global Adam learning rate at two widths.

A unit-scaled u-muP decoder (``jaxq.unit_scaling.TransformerDecoder`` with
``jaxq.unit_scaling.optim.adamw``) is trained for a short run on the default byte-level
corpus (``jaxq.data``) at each learning rate of a factor-2 grid, at width 64 and width
256 (same depth, heads of width 32, same data, seed and steps). Transfer holds if the best
learning rate at width 64 is within one grid step of the best at width 256.

    python benchmarks/umup_transfer.py            # writes benchmarks/results/umup_transfer.md
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxq import data
from jaxq.unit_scaling import TransformerDecoder, optim, param_tags, training

WIDTHS = (64, 256)
LRS = tuple(2.0**e for e in range(-5, 1))  # 1/32 ... 1
CONFIG = dict(layers=2, head_dim=32, steps=100, batch_size=16, seq_len=32, corpus_bytes=1_000_000)


STATIC = ("tags", "independent_weight_decay", "default_scale", "skip_nonfinite")


def width_sweep(
    width: int,
    lrs,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    layers: int,
    head_dim: int,
    train,
    val,
    seed: int = 0,
) -> list[float]:
    """Validation losses (nats/byte) after a short run at each learning rate (NaN: diverged).

    The model is built once per width (same seed for every learning rate) and the train
    step is compiled once: the learning rate lives in the optimiser state.
    """
    model = TransformerDecoder(features=width, layers=layers, heads=max(1, width // head_dim),
                               rngs=nnx.Rngs(seed))  # fmt: skip
    graphdef, params0, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.inject_hyperparams(optim.adamw, static_args=STATIC)(
        learning_rate=1.0, tags=param_tags(model)
    )
    kw = dict(batch_size=batch_size, seq_len=seq_len)
    step = training.make_train_step(graphdef, rest, tx, train_tokens=train, **kw)
    evaluate = training.make_eval(graphdef, rest, val, **kw)
    out = []
    for lr in lrs:
        state = tx.init(params0)
        state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
        params, _, losses = training.run_steps(step, params0, state, steps=steps, seed=seed)
        out.append(float(evaluate(params)) if np.all(np.isfinite(losses)) else float("nan"))
    return out


def sweep(*, widths=WIDTHS, lrs=LRS, **cfg) -> dict:
    """``{"losses": {width: [val loss per lr]}, "best": {width: lr}, "seconds": float}``."""
    cfg = {**CONFIG, **cfg}
    corpus_bytes = cfg.pop("corpus_bytes")
    tokens = data.load_tokens(max_bytes=corpus_bytes)
    train, val = data.split(tokens)
    t0 = time.perf_counter()
    losses = {w: width_sweep(w, lrs, train=train, val=val, **cfg) for w in widths}
    best = {w: lrs[int(np.nanargmin(v))] for w, v in losses.items()}
    return {"losses": losses, "best": best, "seconds": time.perf_counter() - t0, "lrs": lrs,
            "config": {**cfg, "corpus_bytes": corpus_bytes}}  # fmt: skip


def grid_steps_apart(best: dict, lrs=LRS) -> int:
    a, b = (round(math.log2(best[w])) for w in sorted(best))
    return abs(a - b)


def to_markdown(res: dict, command: str) -> str:
    lrs, widths = res["lrs"], sorted(res["losses"])
    lines = [
        "# u-muP learning-rate transfer",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()} CPU ({platform.processor() or 'unknown'}), "
        f"{jax.device_count()} JAX device(s); Python {sys.version.split()[0]}, "
        f"jax {jax.__version__}  ",
        f"Config: {res['config']}; corpus = jaxq.data default (stdlib sources, first "
        f"corpus_bytes bytes, last 10% held out); validation loss in nats/byte over 4 fixed "
        f"batches of the held-out part; model = jaxq.unit_scaling.TransformerDecoder "
        f"(GELU MLP, RMSNorm, u-muP taus), optimiser = jaxq.unit_scaling.optim.adamw  ",
        f"Wall time: {res['seconds']:.0f} s",
        "",
        "| global lr | " + " | ".join(f"width {w}" for w in widths) + " |",
        "|---|" + "---|" * len(widths),
    ]
    for i, lr in enumerate(lrs):
        cells = []
        for w in widths:
            v = res["losses"][w][i]
            mark = " **(best)**" if lr == res["best"][w] else ""
            cells.append(("diverged" if not np.isfinite(v) else f"{v:.4f}") + mark)
        lines.append(f"| 2^{round(math.log2(lr))} | " + " | ".join(cells) + " |")
    k = grid_steps_apart(res["best"], lrs)
    lines += ["", f"Best learning rates are {k} grid step(s) (factor 2^{k}) apart: "
              + ("transfer holds." if k <= 1 else "transfer FAILS.")]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=CONFIG["steps"])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "umup_transfer.md"))
    args = p.parse_args(argv)
    res = sweep(steps=args.steps)
    md = to_markdown(res, "python benchmarks/umup_transfer.py" + (
        f" --steps {args.steps}" if args.steps != CONFIG["steps"] else ""))  # fmt: skip
    Path(args.out).write_text(md)
    print(md)


if __name__ == "__main__":
    main()
