"""Benchmark of jaxq.ops with the recipes of jaxq.recipes: GPT train-step time and the
bytes the backward pass saves.

Measures, side by side in one process, on :class:`jaxq.models.GPT` with every hidden
projection (``qkv``, ``out``, ``up``, ``down`` of every block) quantized by a recipe:

(a) the jitted train step (forward, backward, recipe-state update, ``optax.adamw`` and
    ``apply_updates``; parameters, optimizer and recipe state donated) from
    :func:`jaxq.models.lowp.make_quantized_train_step`, as a ratio to the float32 step of
    :func:`jaxq.models.train.make_train_step` on the same model, batch and optimizer:
    compile, warm-up calls, then interleaved rounds in which every variant steps once,
    ``block_until_ready`` on the loss, the median over rounds; wall-clock and process CPU
    time (the robust figure on a shared machine);
(b) beside it, when ``qwix`` imports, qwix's quantized training (``qwix.QtProvider`` with
    one ``qwix.QtRule`` matching the same four projections, applied with
    ``qwix.quantize_model``) with the same formats, timed in the same rounds;
(c) the bytes the backward pass of the hidden matmuls saves per step: the sum of
    :func:`jaxq.ops.residual_nbytes` over the projections, and as a fraction of what a
    float32 matmul saves (its lhs and rhs in float32). Beside it, what JAX really keeps for
    each projection's ``jaxq.ops.dot_general`` (``saved_residuals`` of the op alone, summed
    the same way), a cross-check of ``residual_nbytes``.

Goals: jaxq's FP8 step-time ratio no larger than qwix's with the same format (qwix's FP8
forward+backward was once measured at 1.52x float32 on a 4x1024 MLP); FP8 recipes save at
most 55% of the float32 residual bytes.

Absolute times hold only on the machine named in the output; compare ratios.

Usage:
    python benchmarks/ops.py                     # writes benchmarks/results/ops.md
    python benchmarks/ops.py --config small --recipes fp8_current,int8 --repeats 2 \\
        --out /tmp/ops.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import logging
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import machine
from flax import nnx

import jaxq
from jaxq.models import GPT, GPTConfig, lowp
from jaxq.models.train import make_train_step, split_model

CONFIGS = {
    "default": (GPTConfig(d_model=512, n_heads=8, n_layers=4, seq_len=128), 8),
    "small": (GPTConfig(d_model=128, n_heads=4, n_layers=2, seq_len=64), 8),
}
RECIPES = list(jaxq.recipes.NAMED)
FP8 = ("fp8_current", "fp8_delayed", "fp8_static", "fp8_blockwise", "mxfp8")
BYTES_GOAL = 0.55
QWIX_REFERENCE = 1.52  # qwix FP8 fwd+bwd on a 4x1024 MLP, measured once elsewhere
HIDDEN = r"blocks/\d+/(attn/(qkv|out)|mlp/(up|down))"
LR, WD = 1e-3, 0.1
DN = (((2,), (0,)), ((), ()))  # nnx.Linear's dot_general on (batch, seq, d_in) inputs


def qwix_rules() -> dict[str, dict]:
    """qwix ``QtRule`` settings with the formats of each jaxq recipe (``None``: no match).

    FP8 uses one scale per tensor (``disable_channelwise_axes``), as jaxq's FP8 current
    scaling does; block formats tile all three products (forward, input and weight
    gradient) along their contraction axis. qwix has no delayed or static scaling, no
    ternary format and no random Hadamard transform. Its stochastic rounding draws from an
    ``nnx.Rngs`` held by the model, which a pure ``split``/``merge`` train step does not
    thread, so its MXFP4/NVFP4 gradients round to nearest here (jaxq's round
    stochastically, and NVFP4 adds the Hadamard transform: extra work qwix skips).
    """
    e4m3, e5m2 = jnp.float8_e4m3fn, jnp.float8_e5m2
    return {
        "fp8_current": dict(weight_qtype=e4m3, act_qtype=e4m3, bwd_qtype=e5m2,
                            disable_channelwise_axes=True),
        "fp8_blockwise": dict(weight_qtype=e4m3, act_qtype=e4m3, bwd_qtype=e4m3,
                              tile_size=128, bwd_weight_grad_tile_size=128,
                              additional_qt_config={"dlhs_tile_size": 128}),
        "mxfp8": dict(weight_qtype="mxfp8", act_qtype="mxfp8", bwd_qtype="mxfp8",
                      tile_size=32, bwd_weight_grad_tile_size=32,
                      additional_qt_config={"dlhs_tile_size": 32}),
        "mxfp4": dict(weight_qtype="mxfp4", act_qtype="mxfp4", bwd_qtype="mxfp4",
                      tile_size=32, bwd_weight_grad_tile_size=32,
                      additional_qt_config={"dlhs_tile_size": 32}),
        "nvfp4": dict(weight_qtype="nvfp4", act_qtype="nvfp4", bwd_qtype="nvfp4",
                      tile_size=16, bwd_weight_grad_tile_size=16,
                      additional_qt_config={"dlhs_tile_size": 16}),
        "int8": dict(weight_qtype=jnp.int8, act_qtype=jnp.int8),
        "int4": dict(weight_qtype=jnp.int4, tile_size=128),
    }  # fmt: skip


def make_recipe(name: str, config: GPTConfig):
    block = min(128, config.d_model)
    if name == "fp8_blockwise":
        return jaxq.recipes.FP8Blockwise(block_size=block)
    if name == "int4":
        return jaxq.recipes.Int4(block_size=block)
    return jaxq.recipes.NAMED[name]()


class Runner:
    """One variant's jitted step and its (donated) state; ``run()`` times one step."""

    def __init__(self, step, args):
        self.step, self.args = step, list(args)
        self.compile_s = None  # seconds of the first (compiling) call, once made

    def first(self) -> float:
        if self.compile_s is None:
            self.compile_s = self.run()
        return self.compile_s

    def run(self) -> float:
        t0 = time.perf_counter()
        out = self.step(*self.args)
        jax.block_until_ready(out[-1])
        dt = time.perf_counter() - t0
        self.args[: len(out) - 1] = out[:-1]
        return dt


def float32_runner(config, x, y, opt) -> Runner:
    graphdef, params = split_model(GPT(config, rngs=nnx.Rngs(0)))
    return Runner(make_train_step(graphdef, opt), (params, opt.init(params), x, y))


def jaxq_runner(config, recipe, x, y, opt) -> Runner:
    model = GPT(config, rngs=nnx.Rngs(0))
    state, steps = lowp.init_recipe_state(model, recipe, jax.random.key(1), sample_inputs=x)
    graphdef, params = split_model(model)
    trainable = {"params": params, "steps": steps}
    step = lowp.make_quantized_train_step(graphdef, opt, recipe)
    return Runner(step, (trainable, opt.init(trainable), state, x, y))


def qwix_runner(qwix, config, rule: dict, x, y, opt) -> Runner:
    model = GPT(config, rngs=nnx.Rngs(0))
    provider = qwix.QtProvider([qwix.QtRule(module_path=HIDDEN, **rule)])
    qmodel = qwix.quantize_model(model, provider, x)
    graphdef, params = split_model(qmodel)
    return Runner(make_train_step(graphdef, opt), (params, opt.init(params), x, y))


def time_interleaved(runners: dict, *, warmup: int, repeats: int):
    """Compile + ``warmup`` calls each, then ``repeats`` rounds in which every runner steps
    once. Returns per-step wall seconds, process CPU seconds and compile seconds."""
    compile_s = {}
    for name, r in runners.items():
        compile_s[name] = r.first()
        for _ in range(warmup):
            r.run()
        print(f"  compiled {name} ({compile_s[name]:.1f} s)", flush=True)
    wall = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    for i in range(repeats):
        for name, r in runners.items():
            c0 = time.process_time()
            wall[name].append(r.run())
            cpu[name].append(time.process_time() - c0)
        print(f"  round {i + 1}/{repeats} done", flush=True)
    return wall, cpu, compile_s


def hidden_operands(config: GPTConfig, batch: int) -> list[tuple[str, tuple, tuple]]:
    """``(path, lhs shape, rhs shape)`` of every hidden projection's dot_general."""
    model = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
    out = []
    for path, lin in lowp.hidden_linears(model).items():
        k = lin.kernel.get_value().shape
        out.append((path, (batch, config.seq_len, k[0]), tuple(k)))
    return out


def _saved_bytes(recipe, lhs, rhs) -> int:
    """Bytes of the residuals JAX saves for one quantized dot_general (incl. its state)."""
    from jax._src.ad_checkpoint import saved_residuals

    state = recipe.init(jax.random.key(0) if recipe.needs_key else None)
    steps = None
    if recipe.learned_step:
        steps = jax.eval_shape(
            lambda a, b: jaxq.recipes.init_steps(recipe, a, b, DN), lhs, rhs
        )
        steps = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), steps)

    def f(a, b):
        return jaxq.ops.dot_general(a, b, DN, recipe=recipe, state=state, steps=steps)

    a, b = jnp.zeros(lhs.shape, lhs.dtype), jnp.zeros(rhs.shape, rhs.dtype)
    res = saved_residuals(f, a, b)
    return int(sum(_nbytes(s) for s, _ in res))


def _nbytes(s) -> int:
    if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):  # typed keys: their key data
        return int(np.prod(s.shape)) * jax.eval_shape(
            jax.random.key_data, jax.ShapeDtypeStruct((), s.dtype)
        ).size * 4
    return int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize


def residual_bytes(config: GPTConfig, batch: int, names) -> dict[str, tuple[int, int | None]]:
    """Per recipe: (sum of ``residual_nbytes``, sum of saved_residuals bytes or None)."""
    ops = hidden_operands(config, batch)
    f32 = lambda s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    out = {"float32": (sum(4 * (int(np.prod(a)) + int(np.prod(b))) for _, a, b in ops), None)}
    for name in names:
        recipe = make_recipe(name, config)
        est = sum(jaxq.ops.residual_nbytes(recipe, f32(a), f32(b), DN) for _, a, b in ops)
        try:
            saved = sum(_saved_bytes(recipe, f32(a), f32(b)) for _, a, b in ops)
        except Exception as e:  # a private JAX helper: report, never fail the benchmark
            print(f"  saved_residuals failed for {name}: {e!r}", flush=True)
            saved = None
        out[name] = (est, saved)
    return out


def versions() -> str:
    out = [f"Python {platform.python_version()}"]
    for n in ["jax", "jaxlib", "flax", "optax", "numpy", "qwix"]:
        try:
            out.append(f"{n} {importlib.metadata.version(n)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{n} (not installed)")
    return ", ".join(out)


def import_qwix():
    try:
        import qwix  # noqa: PLC0415
    except Exception as e:  # not installed, or does not import on this JAX
        return None, f"qwix does not import: {type(e).__name__}: {e}"
    return qwix, None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default=",".join(RECIPES),
                    help="comma-separated names of jaxq.recipes.NAMED (default: all)")  # fmt: skip
    ap.add_argument("--config", default="default", choices=sorted(CONFIGS))
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
    ap.add_argument("--no-qwix", action="store_true", help="skip qwix even if it imports")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ops.md"))
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.recipes.split(",") if s.strip()]
    for n in names:
        if n not in jaxq.recipes.NAMED:
            raise ValueError(f"--recipes: unknown recipe {n!r}; expected some of {RECIPES}")
    config, batch = CONFIGS[args.config]
    qwix, qwix_note = (None, "skipped (--no-qwix)") if args.no_qwix else import_qwix()
    load0 = os.getloadavg()[0]

    x = jax.random.randint(jax.random.key(0), (batch, config.seq_len), 0, config.vocab_size)
    y = jnp.roll(x, -1, axis=1)
    opt = optax.adamw(LR, weight_decay=WD)
    runners = {"float32": float32_runner(config, x, y, opt)}
    qwix_status = {}
    for n in names:
        runners[n] = jaxq_runner(config, make_recipe(n, config), x, y, opt)
        rule = qwix_rules().get(n) if qwix is not None else None
        if qwix is None:
            qwix_status[n] = "not run"
        elif rule is None:
            qwix_status[n] = "no equivalent"
        else:
            try:
                r = qwix_runner(qwix, config, rule, x, y, opt)
                r.first()  # compile now, so a failure is reported instead of raised later
                runners[f"qwix {n}"] = r
                qwix_status[n] = "ok"
            except Exception as e:
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else \
                    type(e).__name__  # fmt: skip
                print(f"qwix {n} failed: {msg}", flush=True)
                traceback.print_exc(limit=3)
                qwix_status[n] = f"error ({msg})"
    print(f"timing {len(runners)} variants on {args.config}: {config}, batch {batch}", flush=True)
    wall, cpu, compile_s = time_interleaved(runners, warmup=args.warmup, repeats=args.repeats)
    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    print("residual bytes ...", flush=True)
    nbytes = residual_bytes(config, batch, names)
    load1 = os.getloadavg()[0]

    rows = []
    f32_bytes = nbytes["float32"][0]
    for n in ["float32", *names]:
        q = f"qwix {n}"
        est, saved = nbytes[n]
        rows.append(dict(
            name=n, ms=med[n] * 1e3, wall=med[n] / med["float32"], cpu=cmed[n] / cmed["float32"],
            compile=compile_s[n],
            qwix_wall=med[q] / med["float32"] if q in med else None,
            qwix_cpu=cmed[q] / cmed["float32"] if q in cmed else None,
            qwix_status=qwix_status.get(n, ""), bytes=est, frac=est / f32_bytes, saved=saved,
        ))  # fmt: skip
    text = report(args, config, batch, rows, qwix_note, load0, load1)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


def _x(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def report(args, config, batch, rows, qwix_note, load0, load1) -> str:
    cmd = "python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]])
    by = {r["name"]: r for r in rows}
    lines = [
        "# jaxq.ops benchmark: quantized GPT train step and backward residual bytes",
        "",
        f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
        f"- Machine: {machine()}",
        f"- Versions: {versions()}" + (f" ({qwix_note})" if qwix_note else ""),
        f"- Command: `{cmd}`",
        f"- Model: `jaxq.models.GPT` d_model={config.d_model}, n_heads={config.n_heads}, "
        f"n_layers={config.n_layers}, seq_len={config.seq_len}, d_ff={config.hidden_dim}, "
        f"batch {batch}; every hidden projection (qkv, out, up, down) quantized, embedding, "
        "tied readout and attention products in float32. Optimizer "
        f"`optax.adamw({LR}, weight_decay={WD})`. Block recipes: fp8_blockwise and int4 use "
        f"blocks of {min(128, config.d_model)}.",
        f"- Timing: compile, {args.warmup} warm-up call(s), {args.repeats} interleaved rounds, "
        "median; `block_until_ready` on the loss. Load average "
        f"{load0:.1f} before, {load1:.1f} after: the machine is shared, so wall times are "
        "inflated by other jobs; the process-CPU ratio is the robust figure.",
        "- qwix: `qwix.QtProvider([qwix.QtRule(module_path=...)])` on the same four "
        "projections, `qwix.quantize_model(model, provider, x)`, the same jitted float "
        "train step around the quantized model. FP8 per tensor (`disable_channelwise_axes`), "
        "like jaxq's current scaling; block formats tiled in all three products. qwix has no "
        "delayed/static scaling, ternary or random Hadamard, and its MXFP4/NVFP4 gradients "
        "round to nearest here (its stochastic rounding needs an `nnx.Rngs` inside the model, "
        "which this pure train step does not thread), so those rows do less work than jaxq's.",
        "- Residual bytes: the sum over the hidden projections of one step of "
        "`jaxq.ops.residual_nbytes`; float32 saves lhs and rhs in float32. "
        "'JAX saves' is what `saved_residuals` finds for each projection's "
        "`jaxq.ops.dot_general` alone (includes its recipe state and PRNG keys).",
        "",
        "| recipe | step (ms, wall) | jaxq / float32 (wall) | jaxq / float32 (CPU) | "
        "qwix / float32 (wall) | qwix / float32 (CPU) | qwix | compile (s) | "
        "residual bytes | / float32 | JAX saves | / float32 |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    f32 = by["float32"]["bytes"]
    for r in rows:
        saved = "" if r["saved"] is None else f"{r['saved']:,}"
        sfrac = "" if r["saved"] is None else f"{r['saved'] / f32:.3f}"
        lines.append(
            f"| {r['name']} | {r['ms']:.0f} | {_x(r['wall'])} | {_x(r['cpu'])} | "
            f"{_x(r['qwix_wall'])} | {_x(r['qwix_cpu'])} | {r['qwix_status']} | "
            f"{r['compile']:.1f} | {r['bytes']:,} | {r['frac']:.3f} | {saved} | {sfrac} |"
        )
    lines += ["", "## Goals", ""]
    fc = by.get("fp8_current")
    if fc is not None and fc["qwix_cpu"] is not None:
        met = fc["cpu"] <= fc["qwix_cpu"] and fc["wall"] <= fc["qwix_wall"]
        lines.append(
            f"- FP8 step overhead no larger than qwix's: jaxq fp8_current {fc['wall']:.2f}x "
            f"(wall) / {fc['cpu']:.2f}x (CPU) vs qwix FP8 {fc['qwix_wall']:.2f}x / "
            f"{fc['qwix_cpu']:.2f}x float32 in the same run (qwix once measured "
            f"{QWIX_REFERENCE}x on a 4x1024 MLP): **{'met' if met else 'MISSED'}**."
        )
    elif fc is not None:
        lines.append(
            f"- FP8 step overhead no larger than qwix's: jaxq fp8_current {fc['wall']:.2f}x "
            f"float32; qwix not measured here ({fc['qwix_status'] or qwix_note}); against "
            f"the reference {QWIX_REFERENCE}x: "
            f"**{'met' if fc['wall'] <= QWIX_REFERENCE else 'MISSED'}** (not side by side)."
        )
    for n in FP8:
        if n in by:
            ok = by[n]["frac"] <= BYTES_GOAL
            lines.append(
                f"- {n} residual bytes {by[n]['frac']:.1%} of float32 (goal <= "
                f"{BYTES_GOAL:.0%}): **{'met' if ok else 'MISSED'}**."
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    main()
