"""Times the jaxq.kernels Pallas kernels against their XLA / bfloat16 baselines on a GPU.

Each row is a ratio measured side by side in this process (warm-up, median of repeats,
``block_until_ready``):

* W4A16: ``weight_only_matmul`` (INT4, groups of 128, bfloat16 activations) at
  ``M = 1..16``, ``K = N = 8192`` against a bfloat16 ``jnp.dot`` and against XLA's
  dequantize-then-multiply path;
* W4A8 against W4A16 at ``M >= 256``;
* blockwise FP8 (1×128 × 128×128) at 8192³ against a bfloat16 ``jnp.dot``;
* FP8 cast-transpose and MXFP8 block quantize against a copy of the same bytes;
* one ``adamw_8bit`` step with the fused update kernel (``implementation=None``) on 134M
  parameters against ``optax.adamw`` and against ``adamw_8bit``'s XLA path, and one
  ``adamw_4bit`` step (the two-pass rank-1 kernel of ``fused_adam_4bit``) likewise.

The table goes to ``benchmarks/results/kernels_gpu.md`` with the GPU's name, the versions
and the command. Without a GPU the script says that the GPU figures are still to be
measured, checks each kernel once in interpret mode on tiny shapes, and exits 0.

Usage: ``python benchmarks/kernels.py [--repeats 20]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxq
from jaxq import kernels, optim

OUT = Path(__file__).parent / "results" / "kernels_gpu.md"


def timeit(fn, *args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` in milliseconds, after two warm-up calls."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


def gpu_rows(repeats: int) -> list[tuple[str, str, float, float]]:
    """``(case, baseline, kernel ms, baseline ms)`` for every measured case."""
    rows = []
    k = n = 8192
    w_f = _normal(0, (n, k))
    w4 = jaxq.quantize(w_f, "int4", block_size=128)
    w_bf = w_f.astype(jnp.bfloat16)
    bf16_dot = jax.jit(lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32))
    w4a16 = jax.jit(lambda x, w: kernels.weight_only_matmul(x, w, implementation="pallas"))
    w4a16_xla = jax.jit(lambda x, w: kernels.weight_only_matmul(x, w, implementation="xla"))
    for m in (1, 4, 16):
        x = _normal(1, (m, k), jnp.bfloat16)
        t = timeit(w4a16, x, w4, repeats=repeats)
        rows.append((f"W4A16 int4 g128, M={m}, K=N=8192", "bf16 dot", t,
                     timeit(bf16_dot, x, w_bf, repeats=repeats)))  # fmt: skip
        rows.append((f"W4A16 int4 g128, M={m}, K=N=8192", "XLA dequantize + dot", t,
                     timeit(w4a16_xla, x, w4, repeats=repeats)))  # fmt: skip
    for fmt in ("mxfp4", "nvfp4"):  # block scales decoded in the kernel
        wq = jaxq.quantize(w_f, fmt)
        for m in (1, 16):
            x = _normal(1, (m, k), jnp.bfloat16)
            rows.append((f"W4A16 {fmt}, M={m}, K=N=8192", "bf16 dot",
                         timeit(w4a16, x, wq, repeats=repeats),
                         timeit(bf16_dot, x, w_bf, repeats=repeats)))  # fmt: skip
    w4a8 = jax.jit(lambda x, w: kernels.w4a8_matmul(x, w, implementation="pallas"))
    for m in (256, 1024):
        x = _normal(2, (m, k), jnp.bfloat16)
        xq = jaxq.quantize(x.astype(jnp.float32), "e4m3")
        rows.append((f"W4A8 int4 g128 x E4M3, M={m}, K=N=8192", "W4A16 kernel",
                     timeit(w4a8, xq, w4, repeats=repeats),
                     timeit(w4a16, x, w4, repeats=repeats)))  # fmt: skip
    s = 8192
    a = jaxq.quantize(_normal(3, (s, s)), "e4m3", block_size=128)
    b = jaxq.quantize(_normal(4, (s, s)), "e4m3", block_size=128)
    fp8 = jax.jit(lambda a, b: kernels.scaled_fp8_matmul(a, b, out_dtype=jnp.bfloat16,
                                                         implementation="pallas"))  # fmt: skip
    a_bf, b_bf = _normal(3, (s, s), jnp.bfloat16), _normal(4, (s, s), jnp.bfloat16)
    rows.append(("blockwise FP8 1x128 x 128x128, 8192^3", "bf16 dot",
                 timeit(fp8, a, b, repeats=repeats),
                 timeit(bf16_dot, a_bf, b_bf, repeats=repeats)))  # fmt: skip
    fp4 = jax.jit(lambda a, b: kernels.fp4_matmul(a, b, implementation="pallas"))
    for fmt in ("mxfp4", "nvfp4"):
        a4 = jaxq.quantize(_normal(3, (s, s)), fmt)
        b4 = jaxq.quantize(_normal(4, (s, s)), fmt)
        rows.append((f"{fmt} x {fmt}, 8192^3", "bf16 dot", timeit(fp4, a4, b4, repeats=repeats),
                     timeit(bf16_dot, a_bf, b_bf, repeats=repeats)))  # fmt: skip
    x = _normal(5, (s, s), jnp.bfloat16)
    copy = jax.jit(lambda x: (x + 0).T + 0)
    ct = jax.jit(lambda x: kernels.cast_transpose(x, "e4m3", amax=jnp.float32(4.0),
                                                  implementation="pallas"))  # fmt: skip
    rows.append(("FP8 cast-transpose + amax, 8192^2 bf16", "copy + transposed copy",
                 timeit(ct, x, repeats=repeats), timeit(copy, x, repeats=repeats)))  # fmt: skip
    mx = jax.jit(lambda x: kernels.block_quantize(x, "mxfp8", implementation="pallas"))
    rows.append(("MXFP8 block quantize, 8192^2 bf16", "copy",
                 timeit(mx, x, repeats=repeats),
                 timeit(jax.jit(lambda x: x + 0), x, repeats=repeats)))  # fmt: skip
    rows += adam_rows(repeats)
    return rows


def adam_rows(repeats: int) -> list[tuple[str, str, float, float]]:
    """One optimizer step (update + apply, jitted, state and parameters donated)."""
    params = {"a": _normal(6, (8192, 8192)), "b": _normal(7, (8192, 8192))}
    grads = jax.tree.map(lambda p: p * 1e-3, params)

    def stepper(tx):
        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        return jax.jit(step, donate_argnums=(0, 1)), tx.init(params)

    times = {}
    for name, tx in (("fused", optim.adamw_8bit(1e-3, implementation=None)),
                     ("xla", optim.adamw_8bit(1e-3)), ("optax", optax.adamw(1e-3)),
                     ("fused4", optim.adamw_4bit(1e-3, implementation=None)),
                     ("xla4", optim.adamw_4bit(1e-3))):  # fmt: skip
        step, state = stepper(tx)
        p = jax.tree.map(jnp.copy, params)
        for _ in range(2):
            p, state = step(p, state, grads)
        jax.block_until_ready(p)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            p, state = step(p, state, grads)
            jax.block_until_ready(p)
            ts.append(time.perf_counter() - t)
        times[name] = 1e3 * statistics.median(ts)
    case, case4 = (f"adamw_{k} step, fused kernel, 134M params" for k in ("8bit", "4bit"))
    return [(case, "optax.adamw (float32 moments)", times["fused"], times["optax"]),
            (case, "adamw_8bit under XLA", times["fused"], times["xla"]),
            (case4, "optax.adamw (float32 moments)", times["fused4"], times["optax"]),
            (case4, "adamw_4bit under XLA", times["fused4"], times["xla4"])]  # fmt: skip


def write(rows, argv) -> None:
    dev = jax.devices()[0]
    lines = [
        "# jaxq.kernels on GPU",
        "",
        f"GPU: {dev.device_kind}; JAX {jax.__version__}; command: "
        f"`python benchmarks/kernels.py {' '.join(argv)}`",
        "",
        "| case | baseline | kernel (ms) | baseline (ms) | speed-up |",
        "|---|---|---:|---:|---:|",
    ]
    for case, base, t, tb in rows:
        lines.append(f"| {case} | {base} | {t:.3f} | {tb:.3f} | {tb / t:.2f}x |")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def cpu_sanity() -> None:
    """Each kernel once in interpret mode on tiny shapes, against its reference."""
    w = jaxq.quantize(_normal(0, (48, 256)), "int4", block_size=128)
    x = _normal(1, (3, 256))
    y = kernels.weight_only_matmul(x, w, implementation="pallas", interpret=True)
    err = float(jnp.max(jnp.abs(y - kernels.weight_only.reference(x, w))))
    print(f"  weight_only_matmul (interpret) max |kernel - reference| = {err:.2e}")
    q, _, _ = kernels.cast_transpose(x, implementation="pallas", interpret=True)
    same = bool(np.array_equal(np.asarray(q.codes, np.float32),
                               np.asarray(jaxq.quantize(x, "e4m3").codes, np.float32)))
    print(f"  cast_transpose (interpret) codes equal jaxq.quantize: {same}")
    params = {"w": _normal(2, (16, 512))}
    fused = optim.adamw_8bit(1e-3, implementation="pallas", interpret=True)
    s_k = jax.jit(fused.update)(params, fused.init(params), params)[1]
    s_x = jax.jit(optim.adamw_8bit(1e-3).update)(params, fused.init(params), params)[1]
    pairs = zip(jax.tree.leaves(s_k), jax.tree.leaves(s_x), strict=True)
    same = all(bool((a == b).all()) for a, b in pairs)
    print(f"  adam_update (interpret) state equals the XLA path: {same}")
    params = {"w": _normal(3, (64, 256))}  # a rank-1 second moment: two passes
    fused = optim.adamw_4bit(1e-3, implementation="pallas", interpret=True)
    s_k = jax.jit(fused.update)(params, fused.init(params), params)[1]
    s_x = jax.jit(optim.adamw_4bit(1e-3).update)(params, fused.init(params), params)[1]
    pairs = zip(jax.tree.leaves(s_k), jax.tree.leaves(s_x), strict=True)
    diff = max(int((np.asarray(a) != np.asarray(b)).sum()) for a, b in pairs)
    print(f"  adam_update_4bit (interpret) state elements unlike the XLA path: {diff} "
          f"(nonzero only where a multiply-add contracted in another order moves a scale "
          f"by an ulp)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        print(f"No GPU (JAX backend {jax.default_backend()!r}): the GPU figures of "
              f"jaxq.kernels are still to be measured; {OUT} is left as it is.")
        print(kernels.registry.table())
        cpu_sanity()
        return 0
    write(gpu_rows(args.repeats), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
