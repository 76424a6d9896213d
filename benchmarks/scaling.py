"""Benchmark of scale propagation: a ``scalify``'d GPT training step vs the plain step.

Measures, side by side in one process on CPU, a small GPT (plain ``jnp``/``jax.nn``:
embedding gather, LayerNorm, causal attention with softmax, GELU MLP, residuals,
cross-entropy) whose training step is ``value_and_grad`` plus an SGD update:

* ``float32``: ``jit(scalify(step))`` on ``ScaledArray`` parameters vs ``jit(step)``;
* ``fp8``: the same with E4M3 forward / E5M2 gradient casts and dynamic rescaling at every
  matmul, scalified vs the plain FP8-cast step (where the rescales are identities).

For each pair: the step-time ratio (warm-up, interleaved repeats, ``block_until_ready``,
median; goal <= 1.3x) and the compile-time ratio (trace + scalify interpretation + XLA
compile, ``jit(f).lower(...).compile()`` of a fresh function).

The script is a list of benchmark functions (``BENCHMARKS``), each returning table rows
(dicts with the keys of ``COLUMNS``); add a section by appending a function.

Usage:
    python benchmarks/scaling.py                     # writes benchmarks/results/scaling.md
    python benchmarks/scaling.py --repeats 5 --out /tmp/scaling.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.formats import E4M3, E5M2
from jaxq.scaled import (
    as_scaled_array,
    cast_on_backward,
    cast_on_forward,
    dynamic_rescale_l2,
    dynamic_rescale_l2_grad,
    scalify,
)

COLUMNS = (
    "benchmark", "baseline", "variant", "step ms (base)", "step ms (variant)", "step ratio",
    "goal", "compile s (base)", "compile s (variant)", "compile ratio",
)  # fmt: skip
STEP_GOAL = 1.3


# -- the model ------------------------------------------------------------------------------
CFG = dict(batch=8, seq=64, d=128, heads=4, layers=2, vocab=256, ff=512)


def init_gpt(key: jax.Array, cfg: dict = CFG) -> dict:
    d, v, t, ff = cfg["d"], cfg["vocab"], cfg["seq"], cfg["ff"]
    keys = iter(jax.random.split(key, 4 + 4 * cfg["layers"]))
    p = {
        "tok": jax.random.normal(next(keys), (v, d)) * 0.02,
        "pos": jax.random.normal(next(keys), (t, d)) * 0.02,
        "lnf_g": jnp.ones(d), "lnf_b": jnp.zeros(d),
        "w_out": jax.random.normal(next(keys), (d, v)) / np.sqrt(d),
    }  # fmt: skip
    for i in range(cfg["layers"]):
        p[f"{i}"] = {
            "ln1_g": jnp.ones(d), "ln1_b": jnp.zeros(d),
            "ln2_g": jnp.ones(d), "ln2_b": jnp.zeros(d),
            "w_qkv": jax.random.normal(next(keys), (d, 3 * d)) / np.sqrt(d),
            "w_o": jax.random.normal(next(keys), (d, d)) / np.sqrt(d),
            "w_1": jax.random.normal(next(keys), (d, ff)) / np.sqrt(d), "b_1": jnp.zeros(ff),
            "w_2": jax.random.normal(next(keys), (ff, d)) / np.sqrt(ff), "b_2": jnp.zeros(d),
        }  # fmt: skip
    return p


def _ln(x, g, b):
    mu = jnp.mean(x, -1, keepdims=True)
    xc = x - mu
    return xc * jax.lax.rsqrt(jnp.mean(xc * xc, -1, keepdims=True) + 1e-5) * g + b


def make_step(fp8: bool, cfg: dict = CFG, lr: float = 0.1) -> Callable:
    """``step(params, tokens) -> (loss, new_params)``: value_and_grad + SGD."""
    bsz, t, d, h = cfg["batch"], cfg["seq"], cfg["d"], cfg["heads"]

    def qw(w):
        if not fp8:
            return w
        return dynamic_rescale_l2_grad(cast_on_backward(cast_on_forward(w, E4M3), E5M2))

    def qa(x):
        if not fp8:
            return x
        x = cast_on_forward(dynamic_rescale_l2(x), E4M3)
        return dynamic_rescale_l2_grad(cast_on_backward(x, E5M2))

    def loss_fn(p, toks):
        p = jax.tree.map(qw, p)
        inp, tgt = toks[:, :-1], toks[:, 1:]
        x = p["tok"][inp] + p["pos"][None]
        mask = jnp.tril(jnp.ones((t, t), bool))
        for i in range(cfg["layers"]):
            q_ = p[f"{i}"]
            hh = qa(_ln(x, q_["ln1_g"], q_["ln1_b"]))
            qkv = (hh @ q_["w_qkv"]).reshape(bsz, t, 3, h, d // h).transpose(2, 0, 3, 1, 4)
            s = jnp.einsum("bhqd,bhkd->bhqk", qa(qkv[0]), qa(qkv[1])) / np.sqrt(d // h)
            a = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
            o = jnp.einsum("bhqk,bhkd->bhqd", qa(a), qa(qkv[2]))
            x = x + qa(o.transpose(0, 2, 1, 3).reshape(bsz, t, d)) @ q_["w_o"]
            hh = qa(_ln(x, q_["ln2_g"], q_["ln2_b"]))
            x = x + qa(jax.nn.gelu(hh @ q_["w_1"] + q_["b_1"])) @ q_["w_2"] + q_["b_2"]
        logp = jax.nn.log_softmax(qa(_ln(x, p["lnf_g"], p["lnf_b"])) @ p["w_out"], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tgt[..., None], axis=-1))

    def step(p, toks):
        loss, g = jax.value_and_grad(loss_fn)(p, toks)
        return loss, jax.tree.map(lambda a, b: a - lr * b, p, g)

    return step


# -- measuring ------------------------------------------------------------------------------
def _time_pair(f0, a0, f1, a1, repeats: int) -> tuple[float, float]:
    """Median seconds of two compiled functions, interleaved, after warm-up."""
    for _ in range(3):
        jax.block_until_ready(f0(*a0))
        jax.block_until_ready(f1(*a1))
    t0, t1 = [], []
    for _ in range(repeats):
        s = time.perf_counter()
        jax.block_until_ready(f0(*a0))
        t0.append(time.perf_counter() - s)
        s = time.perf_counter()
        jax.block_until_ready(f1(*a1))
        t1.append(time.perf_counter() - s)
    return statistics.median(t0), statistics.median(t1)


def _compile_time(fn, args, repeats: int) -> tuple[float, Callable]:
    times, compiled = [], None
    for _ in range(repeats):
        s = time.perf_counter()
        fresh = lambda *a, fn=fn: fn(*a)  # noqa: E731  (a new function: no trace-cache hit)
        compiled = jax.jit(fresh).lower(*args).compile()
        times.append(time.perf_counter() - s)
    return statistics.median(times), compiled


def bench_scalify_gpt(args: argparse.Namespace) -> list[dict]:
    """scalify'd small-GPT training step vs the plain step, float32 and FP8 casts."""
    params = init_gpt(jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (CFG["batch"], CFG["seq"] + 1), 0, CFG["vocab"])
    sparams = jax.tree.map(as_scaled_array, params)
    rows = []
    for label, fp8 in (("float32", False), ("fp8 (E4M3 fwd / E5M2 grad)", True)):
        step = make_step(fp8)
        c0, f0 = _compile_time(step, (params, toks), args.compile_repeats)
        c1, f1 = _compile_time(scalify(step), (sparams, toks), args.compile_repeats)
        t0, t1 = _time_pair(f0, (params, toks), f1, (sparams, toks), args.repeats)
        rows.append({
            "benchmark": f"GPT train step, {label}", "baseline": "jit(step)",
            "variant": "jit(scalify(step))", "step ms (base)": f"{t0 * 1e3:.2f}",
            "step ms (variant)": f"{t1 * 1e3:.2f}", "step ratio": f"{t1 / t0:.2f}x",
            "goal": f"<= {STEP_GOAL}x", "compile s (base)": f"{c0:.2f}",
            "compile s (variant)": f"{c1:.2f}", "compile ratio": f"{c1 / c0:.2f}x",
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def bench_unit_scaled_decoder(args: argparse.Namespace) -> list[dict]:
    """A unit-scaled (u-μP) decoder's train step against the plain decoder's."""
    sys.path.insert(0, str(Path(__file__).parent))
    from unit_scaling_step import rows as unit_rows

    rows = []
    for r in unit_rows(repeats=args.repeats):
        rows.append({
            "benchmark": f"decoder train step, {r['case']}", "baseline": "plain decoder",
            "variant": "jaxq.unit_scaling.TransformerDecoder",
            "step ms (base)": f"{r['baseline_ms']:.2f}", "step ms (variant)": f"{r['step_ms']:.2f}",
            "step ratio": f"{r['ratio']:.2f}x", "goal": "",
            "compile s (base)": f"{r['baseline_compile_s']:.2f}",
            "compile s (variant)": f"{r['compile_s']:.2f}",
            "compile ratio": f"{r['compile_s'] / r['baseline_compile_s']:.2f}x",
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


BENCHMARKS: list[Callable[[argparse.Namespace], list[dict]]] = [
    bench_scalify_gpt,
    bench_unit_scaled_decoder,
]


# -- report ---------------------------------------------------------------------------------
def _versions() -> str:
    names = ("jax", "jaxlib", "numpy", "ml_dtypes")
    vs = []
    for n in names:
        try:
            vs.append(f"{n} {importlib.metadata.version(n)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(vs)


def write_report(rows: list[dict], out: Path, command: str, load: tuple[float, float]) -> None:
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    lines = [
        "# Scale propagation benchmark",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
        f"- machine: {platform.node() or 'unknown'}, {platform.machine()}, {os.cpu_count()} "
        f"CPU cores, {platform.system()} {platform.release()}; devices: "
        f"{', '.join(sorted({d.device_kind for d in jax.devices()}))}",
        f"- versions: Python {platform.python_version()}, {_versions()}",
        f"- load average (1 min) before / after: {load[0]:.1f} / {load[1]:.1f} "
        "(a shared machine: absolute times are noisy, ratios less so)",
        f"- command: `{command}`",
        f"- model: {CFG}",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    lines += [
        "",
        "Step time: median of interleaved repeats after 3 warm-up calls, "
        "`block_until_ready`. Compile time: `jit(f).lower(...).compile()` of a fresh function "
        "(tracing, scalify's interpretation and XLA compilation; median if repeated).",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--compile-repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scaling.md")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()[0]
    rows = [row for bench in BENCHMARKS for row in bench(args)]
    command = "python benchmarks/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(rows, args.out, command.strip(), (load0, os.getloadavg()[0]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
