"""Train-step time of a unit-scaled u-muP decoder vs the plain (non-unit-scaled) equivalent.

Both models have the same architecture and shapes (byte embedding, pre-norm RMSNorm
layers with fused-QKV causal attention and a GELU MLP, final norm, readout, mean
cross-entropy) and are trained with AdamW; the plain one uses ordinary Flax NNX layers,
``1/sqrt(d)`` attention and ``optax.adamw``. Timings are measured side by side in one
process: jit, warm-up, median of repeats, ``block_until_ready``. ``rows()`` is imported
by ``benchmarks/scaling.py``; run this file directly to print the rows.

    python benchmarks/unit_scaling_step.py
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxq.unit_scaling import TransformerDecoder, fp8_dot_general, optim

CONFIG = dict(features=128, layers=2, heads=4, batch_size=8, seq_len=64)


class _PlainLayer(nnx.Module):
    def __init__(self, d, heads, *, rngs):
        self.heads = heads
        self.n1, self.n2 = nnx.RMSNorm(d, rngs=rngs), nnx.RMSNorm(d, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, use_bias=False, rngs=rngs)

    def __call__(self, x):
        b, s, d = x.shape
        q, k, v = jnp.split(self.qkv(self.n1(x)).reshape(b, s, 3, self.heads, -1), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
        logits = jnp.where(jnp.tril(jnp.ones((s, s), bool)), logits, jnp.finfo(x.dtype).min)
        a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v).reshape(b, s, d)
        x = x + self.out(a)
        return x + self.down(jax.nn.gelu(self.up(self.n2(x)), approximate=False))


class PlainDecoder(nnx.Module):
    """The non-unit-scaled equivalent of ``TransformerDecoder`` (standard init and ops)."""

    def __init__(self, *, features, layers, heads, vocab=256, rngs):
        self.embed = nnx.Embed(vocab, features, rngs=rngs)
        self.layers = nnx.List([_PlainLayer(features, heads, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.RMSNorm(features, rngs=rngs)
        self.readout = nnx.Linear(features, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.readout(self.norm(x))

    def loss(self, tokens, targets):
        logits = self(tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _step_fn(model, tx):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, g = jax.value_and_grad(lambda p: nnx.merge(graphdef, p, rest).loss(x, y))(params)
        upd, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss

    return step, params, tx.init(params)


def _time_interleaved(runs, x, y, *, repeats, warmup=3):
    """Median step time and compile time of each ``(step, params, state)``; the runs are
    interleaved step by step so that load on a shared machine affects all alike."""
    states, compile_s = [], []
    for step, params, state in runs:
        t0 = time.perf_counter()
        params, state, loss = step(params, state, x, y)
        jax.block_until_ready(loss)
        compile_s.append(time.perf_counter() - t0)
        for _ in range(warmup):
            params, state, loss = step(params, state, x, y)
        jax.block_until_ready((params, loss))
        states.append([step, params, state])
    times = [[] for _ in runs]
    for _ in range(repeats):
        for i, st in enumerate(states):
            t = time.perf_counter()
            st[1], st[2], loss = st[0](st[1], st[2], x, y)
            jax.block_until_ready((st[1], loss))
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times], compile_s


def rows(*, repeats: int = 30, config: dict | None = None) -> list[dict]:
    """Rows ``{"case", "config", "step_ms", "baseline_ms", "ratio", "compile_s",
    "baseline_compile_s", "device"}``: the unit-scaled step (float32, and with FP8
    hidden matmuls, simulated by casts on CPU) against the plain step."""
    cfg = {**CONFIG, **(config or {})}
    b, s = cfg["batch_size"], cfg["seq_len"]
    mk = dict(features=cfg["features"], layers=cfg["layers"], heads=cfg["heads"])
    key = jax.random.key(0)
    x = jax.random.randint(key, (b, s), 0, 256)
    y = jnp.roll(x, -1, axis=1)
    plain = PlainDecoder(**mk, rngs=nnx.Rngs(0))
    cases = [("unit-scaled (u-muP) f32", None), ("unit-scaled FP8 E4M3/E5M2", fp8_dot_general)]
    runs = [_step_fn(plain, optax.adamw(1e-3))]
    for _, dg in cases:
        m = TransformerDecoder(**mk, dot_general=dg, rngs=nnx.Rngs(0))
        runs.append(_step_fn(m, optim.adamw(0.25, tags=m)))
    (base, *ms), (base_c, *cs) = _time_interleaved(runs, x, y, repeats=repeats)
    out = []
    for (case, _), t, c in zip(cases, ms, cs, strict=True):
        out.append({
            "case": case, "config": cfg, "step_ms": 1e3 * t, "baseline_ms": 1e3 * base,
            "ratio": t / base, "compile_s": c, "baseline_compile_s": base_c,
            "device": jax.devices()[0].device_kind,
        })  # fmt: skip
    return out


if __name__ == "__main__":
    for r in rows():
        print(f"{r['case']:28s} {r['step_ms']:8.2f} ms vs plain {r['baseline_ms']:8.2f} ms "
              f"-> {r['ratio']:.2f}x  (compile {r['compile_s']:.1f}s vs "
              f"{r['baseline_compile_s']:.1f}s) on {r['device']}")  # fmt: skip
