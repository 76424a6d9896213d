"""Train-step time of wrapped Flax models (Linen and NNX): jaxq beside qwix, over float32.

Two small decoders in the style of Flax's examples, not written for jaxq (the test suite's
reference models, ``tests/wrapping/linen_models.py`` and ``tests/wrapping/gemma_style.py``):

* **Linen**: a pre-LayerNorm transformer LM whose layers run under ``nn.scan``
  (``MultiHeadDotProductAttention``, a ``Dense`` GELU MLP, an untied ``Dense`` head);
* **NNX**: a Gemma-style decoder (``nnx.Einsum`` q/k/v/o projections with grouped-query
  attention and RoPE, a gated ``nnx.Linear`` MLP, RMSNorm, blocks under ``nnx.scan``, the
  readout tied to the embedding).

Each is trained, in one process, in float32 and through :func:`jaxq.quantize_model` with
FP8 current scaling, FP8 delayed scaling, MXFP8 (two backward variants) and INT8 QAT on
every projection of the
scanned layers (embeddings, norms, attention's activation products and the readout stay
float32), and through ``qwix.quantize_model`` with a ``QtProvider`` in the formats qwix has
(per-tensor FP8 is qwix's ``disable_channelwise_axes=True``; its static activation ranges
are calibrated, not delayed scaling):

| jaxq recipe | qwix ``QtRule`` |
|---|---|
| ``FP8Current()`` | E4M3 weights, activations; E5M2 gradients; per tensor |
| ``FP8Delayed()`` | none: qwix keeps no amax history |
| ``MXFP8(backward_operands="float")`` | ``"mxfp8"``, tiles of 32 (bwd: MX gradient × float input) |
| ``MXFP8()`` | the same plus MXFP8 residual qtypes (both backward operands MX) |
| ``Int8()`` | weights, activations int8 (per channel / per token), gradients float |

The step is the same for every variant: ``jax.jit`` of forward, backward and an optax
AdamW update, parameters and state donated (jaxq's rows use
:func:`jaxq.wrapping.value_and_grad` / :func:`jaxq.recipes.value_and_grad`, which also
advance the recipe state). Steps are timed after compilation, the variants interleaved
round by round so that a busy machine slows them alike; the table gives the median step
time and its ratio to the float32 step of the same model in the same run. Wrapping time is
the wall time of the ``quantize_model`` call (median of repeats; qwix's NNX wrapping runs the
model once on sample inputs, as qwix requires). The goal: jaxq's overhead over float32 is
no larger than qwix's, per row.

Usage:
    python benchmarks/flax_train.py              # writes benchmarks/results/flax_train.md
    python benchmarks/flax_train.py --quick --out /tmp/flax_train.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import machine
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from wrapping.gemma_style import Decoder  # noqa: E402  (the reference models' one home)
from wrapping.linen_models import TransformerLM  # noqa: E402

import jaxq
from jaxq import recipes as R

try:
    import qwix
except ImportError:  # the qwix columns are left empty
    qwix = None

FORMATS = ("float32", "fp8_current", "fp8_delayed", "mxfp8", "mxfp8_mx_bwd", "int8")
LABELS = {"float32": "float32", "fp8_current": "FP8 current", "fp8_delayed": "FP8 delayed",
          "mxfp8": "MXFP8, float bwd operands", "mxfp8_mx_bwd": "MXFP8, MX bwd operands",
          "int8": "INT8 QAT"}  # fmt: skip
JAXQ = {"fp8_current": R.FP8Current, "fp8_delayed": R.FP8Delayed,
        "mxfp8": lambda: R.MXFP8(backward_operands="float"), "mxfp8_mx_bwd": R.MXFP8,
        "int8": R.Int8}  # fmt: skip
QWIX_UNSUPPORTED = {
    "fp8_delayed": "qwix has no delayed scaling (no amax history)",
}


def qwix_rule(fmt: str, module_path: str):
    """The qwix ``QtRule`` closest to jaxq's recipe ``fmt`` (see the module docstring)."""
    e4m3, e5m2 = jnp.float8_e4m3fn, jnp.float8_e5m2
    mx_tiles = {"dlhs_tile_size": 32, "drhs_tile_size": 32}
    mx_residuals = {"use_original_residuals": True, "dlhs_residual_qtype": "mxfp8",
                    "drhs_residual_qtype": "mxfp8"}  # fmt: skip
    kw = {
        "fp8_current": dict(weight_qtype=e4m3, act_qtype=e4m3, bwd_qtype=e5m2,
                            disable_channelwise_axes=True),
        # the gradient products need their tiles named too (qwix tiles the gradient only
        # for weight-gradient operands that are weights, and MX formats require tiles)
        "mxfp8": dict(weight_qtype="mxfp8", act_qtype="mxfp8", bwd_qtype="mxfp8",
                      tile_size=32, additional_qt_config=mx_tiles),
        "mxfp8_mx_bwd": dict(weight_qtype="mxfp8", act_qtype="mxfp8", bwd_qtype="mxfp8",
                             tile_size=32, additional_qt_config=mx_tiles | mx_residuals),
        "int8": dict(weight_qtype=jnp.int8, act_qtype=jnp.int8),
    }[fmt]  # fmt: skip
    return qwix.QtRule(module_path=module_path, **kw)


# ---------------------------------------------------------------------------- models


# ------------------------------------------------------------------------- train steps


def _xent(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets).mean()  # fmt: skip


def linen_variant(module, kind, fmt, x):
    """``(step, carry)`` of a Linen variant: ``step(*carry, x, y) -> (*carry, loss)``."""
    tx = optax.adamw(1e-3)
    if kind == "jaxq" and fmt != "float32":
        variables = module.init(jax.random.key(0), x)
        # stateless recipes (current scaling, MX, INT8) create no "jaxq" collection
        params, state = variables["params"], variables.get("jaxq", {})

        def loss_fn(params, state, x, y):
            return _xent(module.apply({"params": params, "jaxq": state}, x), y)

        def step(params, state, opt, x, y):
            loss, grads, state = R.value_and_grad(loss_fn)(params, state, x, y)
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), state, opt, loss

        return jax.jit(step, donate_argnums=(0, 1, 2)), (params, state, tx.init(params))
    params = module.init(jax.random.key(0), x)["params"]

    def step(params, opt, x, y):
        loss, grads = jax.value_and_grad(
            lambda p: _xent(module.apply({"params": p}, x), y))(params)  # fmt: skip
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    return jax.jit(step, donate_argnums=(0, 1)), (params, tx.init(params))


def nnx_variant(model, kind, fmt, x):
    """``(step, carry)`` of an NNX variant, split as ``(graphdef, params, rest)``."""
    tx = optax.adamw(1e-3)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss_fn = lambda m, x, y: _xent(m(x), y)
    if kind == "jaxq":
        value_and_grad = jaxq.wrapping.value_and_grad(loss_fn)
    else:
        value_and_grad = nnx.value_and_grad(loss_fn)

    def step(params, rest, opt, x, y):
        m = nnx.merge(graphdef, params, rest)
        loss, grads = value_and_grad(m, x, y)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        _, _, rest = nnx.split(m, nnx.Param, ...)
        return params, rest, opt, loss

    return jax.jit(step, donate_argnums=(0, 1, 2)), (params, rest, tx.init(params))


def wrap(family, kind, fmt, x, *, d, layers):
    """A fresh model of ``family`` wrapped by ``kind`` (``"jaxq"``/``"qwix"``) in ``fmt``,
    and the median seconds of the ``quantize_model`` call (None for float32)."""
    times, wrapped = [], None
    for _ in range(3):
        if family == "linen":
            model = TransformerLM(d=d, layers=layers)
            if fmt == "float32":
                return model, None
            t0 = time.perf_counter()
            if kind == "jaxq":
                wrapped = jaxq.quantize_model(model, [jaxq.Rule(r"layers/.*", recipe=JAXQ[fmt]())])
            else:
                # qwix paths are those of the module calling the op: the MLP's Dense layers
                # and the attention's DenseGeneral projections, not the attention products.
                rule = qwix_rule(fmt, r"layers/(Dense_\d+|MultiHeadDotProductAttention_0/.+)")
                wrapped = qwix.quantize_model(model, qwix.QtProvider([rule]))
        else:
            model = Decoder(d=d, layers=layers, head_dim=32, hidden=4 * d, rngs=nnx.Rngs(0))
            if fmt == "float32":
                return model, None
            t0 = time.perf_counter()
            if kind == "jaxq":
                rules = [jaxq.Rule(r"blocks/.*", recipe=JAXQ[fmt]())]
                wrapped = jaxq.quantize_model(model, rules, key=jax.random.key(1))
            else:
                # the projections (blocks/attn/q, blocks/mlp/up, ...), not the attention
                # products computed in blocks/attn itself
                rule = qwix_rule(fmt, r"blocks/(attn/[qkvo]|mlp/(gate|up|down))")
                wrapped = qwix.quantize_model(model, qwix.QtProvider([rule]), x)
        jax.block_until_ready(jax.tree.leaves(nnx.state(wrapped)) if family == "nnx" else [])
        times.append(time.perf_counter() - t0)
    return wrapped, statistics.median(times)


def bench_family(family, args, x, y):
    """Rows ``{(kind, fmt): dict(step=, ratio=, wrap=, compile=, error=)}`` of one family."""
    variants, rows = {}, {}
    kinds = ["jaxq"] + (["qwix"] if qwix is not None else [])
    for fmt in FORMATS:
        for kind in kinds:
            if fmt == "float32" and kind == "qwix":
                continue
            if kind == "qwix" and fmt in QWIX_UNSUPPORTED:
                rows[kind, fmt] = dict(error=QWIX_UNSUPPORTED[fmt])
                continue
            label = f"{family} {kind} {fmt}"
            try:
                model, wrap_s = wrap(family, kind, fmt, x, d=args.d, layers=args.layers)
                make = linen_variant if family == "linen" else nnx_variant
                step, carry = make(model, kind, fmt, x)
                t0 = time.perf_counter()
                out = step(*carry, x, y)
                jax.block_until_ready(out)
                compile_s = time.perf_counter() - t0
                variants[kind, fmt] = [step, out[:-1], []]
                rows[kind, fmt] = dict(wrap=wrap_s, compile=compile_s)
                print(f"  {label}: wrapped in {wrap_s or 0:.3f} s, first step "
                      f"{compile_s:.1f} s (compile), loss {float(out[-1]):.3f}", flush=True)
            except Exception as e:  # noqa: BLE001 - a peer's failure is a finding, not a stop
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows[kind, fmt] = dict(error=msg)
                print(f"  {label}: FAILED {msg}", flush=True)
                if args.verbose:
                    traceback.print_exc()
    for _ in range(args.repeats):  # interleaved rounds
        for v in variants.values():
            step, carry, times = v
            t0 = time.perf_counter()
            out = step(*carry, x, y)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t0)
            v[1] = out[:-1]
    base = statistics.median(variants["jaxq", "float32"][2])
    for key, (_, _, times) in variants.items():
        med = statistics.median(times)
        rows[key].update(step=med, ratio=med / base, times=times)
    return rows


def paired_ratio(t_a, t_b, *, resamples=4000, seed=0):
    """``(median, low, high)``: the median over interleaved rounds of ``t_a[r] / t_b[r]``
    and a 95% bootstrap interval of that median (rounds resampled with replacement).

    Both variants ran in every round, one after the other, so a round's ratio cancels what
    slowed that whole round (other work on the machine); the interval says how far the
    median moves with the rounds drawn.
    """
    d = np.log(np.asarray(t_a) / np.asarray(t_b))
    rng = np.random.default_rng(seed)
    meds = np.median(d[rng.integers(0, len(d), (resamples, len(d)))], axis=1)
    lo, hi = np.percentile(meds, [2.5, 97.5])
    return float(np.exp(np.median(d))), float(np.exp(lo)), float(np.exp(hi))


def verdict(rows, fmt):
    """Whether jaxq's step is at most qwix's: ``met`` (median round ratio <= 1; "a tie
    within noise" where its 95% interval reaches above 1), ``within noise`` (above 1, but
    the interval reaches 1), ``missed``, or ``—``."""
    j, q = rows.get(("jaxq", fmt), {}), rows.get(("qwix", fmt), {})
    if "times" not in j or "times" not in q:
        return "— (no qwix time)"
    r, lo, hi = paired_ratio(j["times"], q["times"])
    ci = f"{r:.2f}x, 95% CI {lo:.2f}–{hi:.2f}"
    if r <= 1:
        return f"met ({ci})" if hi <= 1 else f"met, a tie within noise ({ci})"
    return f"within noise ({ci})" if lo <= 1 else f"missed ({ci})"


def table(results):
    """The Markdown table of every family's rows."""
    def ms(r):
        return f"{1e3 * r['step']:.1f}" if "step" in r else "—"

    def ratio(r):
        return f"{r['ratio']:.2f}" if "ratio" in r else "—"

    def wrap_ms(r):
        return f"{1e3 * r['wrap']:.1f}" if r.get("wrap") is not None else "—"

    lines = ["| model | format | jaxq step (ms) | jaxq / f32 | qwix step (ms) | qwix / f32 "
             "| jaxq wrap (ms) | qwix wrap (ms) | jaxq ≤ qwix |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    notes = []
    for family, rows in results.items():
        for fmt in FORMATS:
            j, q = rows.get(("jaxq", fmt), {}), rows.get(("qwix", fmt), {})
            if fmt == "float32":
                lines.append(f"| {family} | float32 | {ms(j)} | 1.00 | | | | | |")
                continue
            qcell = ms(q)
            if "error" in q:
                notes.append(f"{family} {LABELS[fmt]}, qwix: {q['error']}")
                qcell = "n/a"
            if "error" in j:
                notes.append(f"{family} {LABELS[fmt]}, jaxq: {j['error']}")
            lines.append(f"| {family} | {LABELS[fmt]} | {ms(j)} | {ratio(j)} | {qcell} | "
                         f"{ratio(q)} | {wrap_ms(j)} | {wrap_ms(q)} | {verdict(rows, fmt)} |")
    return lines, notes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=128, help="model width")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15, help="timed steps per variant")
    ap.add_argument("--models", default="linen,nnx")
    ap.add_argument("--quick", action="store_true", help="d=64, seq 32, 5 repeats")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "flax_train.md"))
    args = ap.parse_args(argv)
    if args.quick:
        args.d, args.seq, args.repeats = 64, 32, 5
    t0 = time.time()
    print(machine())
    if qwix is None:
        print("qwix is not importable: its columns stay empty (pip install qwix)")
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (args.batch, args.seq + 1), 0, 256)
    x, y = tokens[:, :-1], tokens[:, 1:]
    results = {}
    for family in args.models.split(","):
        print(f"{family}:", flush=True)
        results[family] = bench_family(family, args, x, y)
    lines, notes = table(results)
    print("\n".join(lines))
    for n in notes:
        print("note:", n)
    write(args, lines, notes, time.time() - t0)


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def write(args, lines, notes, seconds) -> None:
    """Writes the Markdown report to ``args.out``."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/flax_train.py " + " ".join(sys.argv[1:])
    text = [
        "# Train step of wrapped Flax models: jaxq and qwix over float32",
        "",
        f"Machine: {machine()}. JAX {jax.__version__}, Flax {flax.__version__}, "
        f"optax {_version('optax')}, qwix {_version('qwix')}. "
        f"{datetime.date.today().isoformat()}, {seconds:.0f} s; load average "
        f"{os.getloadavg()[0]:.1f} at the end (other work on the machine slows every "
        "variant alike, but differences of a few percent are within run-to-run noise).",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Models: Linen transformer LM (`nn.scan` over {args.layers} layers, d_model "
        f"{args.d}, 4 heads, MLP 4×d) and the NNX Gemma-style decoder ({args.layers} "
        f"blocks under `nnx.scan`, d_model {args.d}, 4 query / 2 KV heads of 32, gated MLP "
        f"512); batch {args.batch} × {args.seq} byte tokens; AdamW; every projection of the "
        f"scanned layers quantized. Step: median of {args.repeats} jitted steps after "
        "compilation, the variants interleaved; ratios are over the float32 step of the same "
        "model in the same run. Wrap: median wall time of three `quantize_model` calls "
        "(qwix's NNX call runs the model once on sample inputs).",
        "",
        "Goal: jaxq's overhead over float32 is no larger than qwix's (last column, per row). "
        "Verdict: per interleaved round, jaxq's step time over qwix's; their median (≤ 1: "
        "met; a tie within noise where the interval reaches above 1) and a 95% bootstrap "
        "interval of that median (above 1 but the interval reaching 1: within noise; else "
        "missed).",
        "",
        *lines,
        "",
    ]
    if notes:
        text += ["Not measured:", "", *[f"- {n}" for n in notes], ""]
    out.write_text("\n".join(text) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
