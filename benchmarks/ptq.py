"""Benchmark of jaxq.ptq: quality, weight bytes and checkpoint sizes of quantized serving.

A :class:`jaxq.models.GPT` (4 layers, d_model 256, byte-level, the default corpus) is
trained with AdamW until its validation loss stops improving (evaluated every
``--eval-every`` steps; stopped after ``--patience`` evaluations without a new best, or at
``--max-steps``), then converted with :func:`jaxq.ptq.convert` under each scheme. Every
projection of the transformer blocks is quantized; the embeddings, LayerNorms and the tied
readout stay in float32, as GPTQ/AWQ toolkits keep them.

For each row: validation loss (nats/token) and perplexity on the held-out split, the
difference from bf16, the bytes of the quantized layers' weights (codes, scales, static
activation scales) and of the whole serving state. Checkpoint rows: the serving state saved
with orbax (``StandardCheckpointer``), its size on disk, restored and compared bit for bit.

Usage:
    python benchmarks/ptq.py                   # writes benchmarks/results/ptq.md (+ .json)
    python benchmarks/ptq.py --max-steps 200 --out /tmp/ptq.md   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import CONFIG, machine, trained_gpt
from flax import nnx

import jaxq
from jaxq import data, ptq
from jaxq.models.train import evaluate, merge_model, split_model


def rows():
    """``(name, scheme, algorithms)`` of the table."""
    w4, mse = ptq.W4(128), jaxq.MSE()
    w4_mse = ptq.W4(128, calibration=mse)
    return [
        ("W8 per-channel", ptq.W8(), ()),
        ("W4 g128 RTN", w4, ()),
        ("W4 g128 RTN, MSE clipping", w4_mse, ()),
        ("W4 g128 AWQ", w4, ("awq",)),
        ("W4 g128 GPTQ", w4, ("gptq",)),
        ("W4 g128 GPTQ, MSE scales", w4_mse, ("gptq",)),
        ("W4 g128 rotation + GPTQ", w4, ("rotate", "gptq")),
        ("W4 g128 rotation + GPTQ, MSE scales", w4_mse, ("rotate", "gptq")),
        ("W4 g128 AWQ scales folded + GPTQ, MSE scales", w4_mse,
         ("awq_scales", "fold", "gptq")),
        ("W4 g128 rotation + AWQ scales + GPTQ, MSE scales", w4_mse,
         ("rotate", "awq_scales", "gptq")),
        ("NF4 g64", ptq.NF4(64), ()),
        ("MXFP4 (OCP exponents)", ptq.MXFP4(calibration=jaxq.Absmax()), ()),
        ("MXFP4 (exponents searched)", ptq.MXFP4(), ()),
        ("NVFP4 (MSE block scales)", ptq.NVFP4(), ()),
        ("W8A8 int8 + SmoothQuant", ptq.W8A8("int8"), ("smoothquant",)),
        ("W8A8 int8 + SmoothQuant folded into the norms", ptq.W8A8("int8"),
         ("smoothquant", "fold")),
        ("W8A8 FP8 (E4M3)", ptq.W8A8("e4m3"), ()),
        ("W4A8 (int4 x FP8)", ptq.W4A8(), ()),
        ("W3 g128 GPTQ, MSE scales", ptq.W3(128, calibration=mse), ("gptq",)),
        ("W2 g128 GPTQ, MSE scales", ptq.W2(128, calibration=mse), ("gptq",)),
    ]


def rules_for(scheme):
    return [jaxq.Rule(".*readout.*|.*head.*", recipe=None), jaxq.Rule(".*", recipe=scheme)]


def fold_map(model) -> dict:
    """Each block's LayerNorms and the projection that reads them."""
    n = len(model.blocks)
    return {**{f"blocks/{i}/ln1": (f"blocks/{i}/attn/qkv",) for i in range(n)},
            **{f"blocks/{i}/ln2": (f"blocks/{i}/mlp/up",) for i in range(n)}}  # fmt: skip


def plan_for(model, rules, algorithms, batches):
    """The model (a new one after a fold) and the plan of ``algorithms`` run in order."""
    plan = None
    for name in algorithms:
        if name == "fold":
            model, _, plan = ptq.fold(model, None, rules, batches, plan=plan,
                                      into=fold_map(model))  # fmt: skip
            continue
        fn = {"rotate": ptq.rotate, "smoothquant": ptq.smoothquant, "awq": ptq.awq,
              "awq_scales": functools.partial(ptq.awq, clip=False), "gptq": ptq.gptq}[name]
        plan = fn(model, None, rules, batches, plan=plan)
    return model, plan


def layer_bytes(model) -> tuple[int, int]:
    """Bytes of the block projections' weights, and of the whole state."""
    total = ptq.weight_bytes(nnx.state(model))
    layers = 0
    for _, layer, _ in jaxq.wrapping.layers(model):
        v = vars(layer)["kernel"]
        layers += ptq.weight_bytes(v.get_value())
    return layers, total


def _rest_in_bf16(state):
    """The serving state with every float array outside the quantized weights (embeddings,
    norms, biases) stored in bf16, as in the bf16 row."""
    def cast(a):
        if isinstance(a, ptq.QuantizedWeight) or a.dtype != jnp.float32:
            return a
        return a.astype(jnp.bfloat16)

    return jax.tree.map(cast, state, is_leaf=lambda a: isinstance(a, ptq.QuantizedWeight))


def checkpoint_size(state) -> tuple[int, bool]:
    """On-disk bytes of an orbax checkpoint of ``state``, and whether it restores exactly."""
    import orbax.checkpoint as ocp

    d = Path(tempfile.mkdtemp())
    try:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(d / "c", state)
        ckpt.wait_until_finished()
        size = sum(p.stat().st_size for p in (d / "c").rglob("*") if p.is_file())
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
        back = ckpt.restore(d / "c", abstract)
        exact = all(
            np.array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(b).view(np.uint8))
            for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True)
        )
        return size, exact
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--windows", type=int, default=512, help="validation windows scored")
    ap.add_argument("--calibration", type=int, default=16, help="calibration batches of 8")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ptq.md"))
    args = ap.parse_args(argv)

    model, log, train_tokens, val_tokens = trained_gpt(
        max_steps=args.max_steps, eval_every=args.eval_every, patience=args.patience,
        seed=args.seed,
    )  # fmt: skip
    stopped = "early stop" if log[-1][0] < args.max_steps else "step cap"
    cal_key = jax.random.key(1234)
    batches = [data.batch(jnp.asarray(train_tokens), jax.random.fold_in(cal_key, i),
                          batch_size=8, seq_len=CONFIG.seq_len)[0]
               for i in range(args.calibration)]  # fmt: skip

    def score(m):
        return evaluate(m, val_tokens, max_windows=args.windows)

    results = []
    f32_layers, f32_total = layer_bytes(model)
    results.append({"row": "float32", "val_loss": score(model), "layer_bytes": f32_layers,
                    "total_bytes": f32_total, "seconds": 0.0})  # fmt: skip
    graphdef, params = split_model(model)
    bf16 = merge_model(graphdef, jax.tree.map(
        lambda a: a.astype(jnp.bfloat16).astype(a.dtype), params))  # fmt: skip
    results.append({"row": "bf16 weights", "val_loss": score(bf16), "layer_bytes": f32_layers // 2,
                    "total_bytes": f32_total // 2, "seconds": 0.0})  # fmt: skip
    served_states = {}
    for name, scheme, algorithms in rows():
        t0 = time.time()
        rules = rules_for(scheme)
        source, plan = plan_for(model, rules, algorithms, batches)
        served = ptq.convert(source, None, rules, calibration=batches, plan=plan)
        seconds = time.time() - t0
        lb, tb = layer_bytes(served.model)
        results.append({"row": name, "val_loss": score(served.model), "layer_bytes": lb,
                        "total_bytes": tb, "seconds": seconds})  # fmt: skip
        served_states[name] = nnx.state(served.model)
        r = results[-1]
        print(f"  {name:28s} val {r['val_loss']:.4f}  {lb / 2**20:.2f} MiB  ({seconds:.0f} s)",
              flush=True)  # fmt: skip
    base = results[1]["val_loss"]
    for r in results:
        r["ppl"] = math.exp(r["val_loss"])
        r["vs_bf16"] = r["val_loss"] / base - 1.0

    ckpt = []
    float_state = nnx.state(model)
    bf16_state = jax.tree.map(lambda a: a.astype(jnp.bfloat16), float_state)
    for label, state in [("float32", float_state), ("bf16", bf16_state),
                         ("int8 (W8)", served_states["W8 per-channel"]),
                         ("int4 g128", served_states["W4 g128 RTN"]),
                         ("int4 g128, other weights bf16",
                          _rest_in_bf16(served_states["W4 g128 RTN"])),
                         ("NF4 g64", served_states["NF4 g64"]),
                         ("FP8 W8A8", served_states["W8A8 FP8 (E4M3)"])]:  # fmt: skip
        size, exact = checkpoint_size(state)
        ckpt.append({"format": label, "bytes": size, "exact": exact})
    bf16_bytes = ckpt[1]["bytes"]
    for c in ckpt:
        c["vs_bf16"] = c["bytes"] / bf16_bytes
    write(args, log, stopped, results, ckpt)


def write(args, log, stopped, results, ckpt) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    steps, train_loss, val = log[-1]
    best = min(v for _, _, v in log)
    lines = [
        "# Post-training quantization of a trained GPT (jaxq.ptq)",
        "",
        f"- Date: {datetime.date.today()}; jax {jax.__version__}; Python {sys.version.split()[0]}",
        f"- Machine: {machine()}",
        f"- Model: GPT, {CONFIG.n_layers} layers, d_model {CONFIG.d_model}, "
        f"{CONFIG.n_heads} heads, seq {CONFIG.seq_len}, byte-level vocabulary 256, tied readout.",
        f"- Training: AdamW (warm-up + cosine, peak 1e-3), batch 16; ran {steps} steps "
        f"({stopped}); best validation loss {best:.4f} (the checkpoint kept).",
        f"- Calibration: {args.calibration} batches of 8 x {CONFIG.seq_len} training tokens. "
        f"Validation: {args.windows} windows of {CONFIG.seq_len} held-out tokens.",
        "- Quantized: every projection of the blocks (q/k/v, attention out, MLP up/down); "
        "embeddings, LayerNorms and the tied readout stay float32.",
        "- Command: `python benchmarks/ptq.py`",
        "",
        "| scheme | val loss | perplexity | vs bf16 | block weights | serving state | "
        "convert time |",
        "|---|---|---|---|---|---|---|",
    ]
    f32 = results[0]["layer_bytes"]
    for r in results:
        lines.append(
            f"| {r['row']} | {r['val_loss']:.4f} | {r['ppl']:.3f} | {100 * r['vs_bf16']:+.2f}% | "
            f"{r['layer_bytes'] / 2**20:.3f} MiB ({r['layer_bytes'] / f32:.3f}x) | "
            f"{r['total_bytes'] / 2**20:.2f} MiB | {r['seconds']:.0f} s |"
        )
    lines += ["", "## Checkpoints (orbax, on disk)", "",
              "| serving state | bytes on disk | vs bf16 | restored bit-exactly |",
              "|---|---|---|---|"]  # fmt: skip
    for c in ckpt:
        lines.append(f"| {c['format']} | {c['bytes'] / 2**20:.2f} MiB | {c['vs_bf16']:.3f}x | "
                     f"{'yes' if c['exact'] else 'NO'} |")  # fmt: skip
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"results": results, "checkpoints": ckpt, "training": log}, indent=1))  # fmt: skip
    print("\n".join(lines))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
