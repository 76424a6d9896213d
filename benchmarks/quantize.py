"""Benchmark of ``jaxq.quantize`` + ``jaxq.dequantize`` throughput against a memory-bound floor.

For a float32 array of ``--sizes`` elements (default 64Mi = 2^26, shape ``(8192, 8192)``)
it times, side by side in one process, the jitted round trip
``dequantize(quantize(x, ...))`` for

* per-tensor E4M3,
* per-channel INT8 (``axis=-1``: one scale per column),
* INT4 g128 (blocks of 128 along the last axis),
* MXFP8, MXFP4 and NVFP4 (block formats, their own block sizes),

and the floor: the jitted ``x * 2.0``, one read and one write of the array, the least any
elementwise pass can do. Each case also gets its quantize-only and dequantize-only times.
Cases run in interleaved rounds (every case once per round) after a warm-up, each call ends
with ``block_until_ready``, and the median over rounds is reported. Ratios are the figure
of merit; absolute times hold only on the machine named in the output.

Usage:
    python benchmarks/quantize.py                     # writes benchmarks/results/quantize.md
    python benchmarks/quantize.py --sizes 64M,4M --repeats 5
    python benchmarks/quantize.py --sizes 4M --repeats 3 --out /tmp/q.md
    python benchmarks/quantize.py --hlo e4m3          # print the optimized HLO of one case
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxq

CASES: dict[str, tuple[str, dict]] = {
    "E4M3 per-tensor": ("e4m3", {}),
    "INT8 per-channel": ("int8", {"axis": -1}),
    "INT4 g128": ("int4", {"block_size": 128}),
    "MXFP8": ("mxfp8", {}),
    "MXFP4": ("mxfp4", {}),
    "NVFP4": ("nvfp4", {}),
}
SHORT = {"e4m3": "E4M3 per-tensor", "int8": "INT8 per-channel", "int4": "INT4 g128",
         "mxfp8": "MXFP8", "mxfp4": "MXFP4", "nvfp4": "NVFP4"}  # fmt: skip
GOAL = ("E4M3 per-tensor", 3.0)


def parse_size(s: str) -> int:
    """``"64M"`` -> 64 * 2^20 elements (K, M, G are powers of 1024)."""
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}
    s = s.strip().upper()
    return int(float(s[:-1]) * mult[s[-1]]) if s[-1] in mult else int(s)


def shape_for(n: int) -> tuple[int, int]:
    """A 2-D shape ``(rows, cols)`` with ``cols`` a multiple of 128 near ``sqrt(n)``."""
    cols = 128
    while cols * 2 <= int(np.sqrt(n)) and n % (cols * 2) == 0:
        cols *= 2
    if n % cols:
        raise ValueError(f"--size must be a multiple of 128 elements, got {n}")
    return n // cols, cols


def make_fns(fmt: str, kw: dict) -> dict[str, Callable]:
    q = jax.jit(lambda x: jaxq.quantize(x, fmt, **kw))
    dq = jax.jit(jaxq.dequantize)
    qdq = jax.jit(lambda x: jaxq.dequantize(jaxq.quantize(x, fmt, **kw)))
    return {"qdq": qdq, "q": q, "dq": dq}


def time_call(fn: Callable, arg) -> tuple[float, float, int]:
    """(wall s, process CPU s summed over threads, minor page faults) of one blocking call."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(arg))
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def run(size: int, repeats: int, names: list[str]) -> tuple[list[dict], float, tuple]:
    shape = shape_for(size)
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    floor = jax.jit(lambda x: x * 2.0)
    fns = {name: make_fns(*CASES[name]) for name in names}
    qarrays = {}
    # Warm-up: compile and run every function twice.
    for _ in range(2):
        jax.block_until_ready(floor(x))
        for name, f in fns.items():
            qarrays[name] = jax.block_until_ready(f["q"](x))
            jax.block_until_ready(f["dq"](qarrays[name]))
            jax.block_until_ready(f["qdq"](x))
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(repeats):  # interleaved rounds: load changes hit every case alike
        times.setdefault(("floor", ""), []).append(time_call(floor, x))
        for name, f in fns.items():
            times.setdefault((name, "qdq"), []).append(time_call(f["qdq"], x))
            times.setdefault((name, "q"), []).append(time_call(f["q"], x))
            times.setdefault((name, "dq"), []).append(time_call(f["dq"], qarrays[name]))

    def med(key, i=0):
        return statistics.median(t[i] for t in times[key])

    t_floor = (med(("floor", "")), med(("floor", ""), 1), med(("floor", ""), 2))
    rows = []
    for name in names:
        qa = qarrays[name]
        # Check the round trip is a real quantization (not optimised away).
        err = float(jnp.sqrt(jnp.mean((fns[name]["qdq"](x) - x) ** 2)))
        rows.append(
            {
                "name": name,
                "qdq": med((name, "qdq")),
                "qdq_cpu": med((name, "qdq"), 1),
                "q": med((name, "q")),
                "dq": med((name, "dq")),
                "bits": qa.bits_per_element,
                "rmse": err,
            }
        )
    return rows, t_floor, shape


def table(rows: list[dict], t_floor: tuple[float, float, float], size: int) -> str:
    gb = size * 4 * 2 / 1e9  # bytes a read + write pass moves
    wall, cpu, faults = t_floor
    lines = [
        "| case | bits/elem | qdq ms | qdq / floor | qdq / floor (CPU time) "
        "| quantize ms | dequantize ms | RMSE |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| floor `x * 2.0` | 32 | {wall * 1e3:.1f} | 1.00 | 1.00 | | | "
        f"{gb / wall:.1f} GB/s; {faults:.0f} page faults/call |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['bits']:.3g} | {r['qdq'] * 1e3:.1f} | "
            f"**{r['qdq'] / wall:.2f}** | {r['qdq_cpu'] / cpu:.2f} | {r['q'] * 1e3:.1f} | "
            f"{r['dq'] * 1e3:.1f} | {r['rmse']:.3g} |"
        )
    return "\n".join(lines)


def git_state() -> str:
    """Commit of the checkout, and whether jaxq/quantization has uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "jaxq/quantization"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"commit {head}" + (" + uncommitted changes in jaxq/quantization" if dirty else "")


def environment() -> str:
    def ver(p):
        try:
            return importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return "\n".join(
        [
            f"- machine: {platform.node() and 'host'} {platform.system()} {platform.machine()}, "
            f"CPU {cpu}, {os.cpu_count()} cores; JAX device: {dev.platform} ({dev.device_kind})",
            f"- versions: python {platform.python_version()}, jax {jax.__version__}, "
            f"jaxlib {ver('jaxlib')}, numpy {np.__version__}, ml_dtypes {ver('ml_dtypes')}, "
            f"jaxq {jaxq.__version__}",
            f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
            f"- jaxq source: {git_state()}",
            f"- command: `python {' '.join(sys.argv)}`",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--sizes", default="64M", help="comma-separated element counts (K/M/G = 2^10/2^20/2^30)"
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--cases", default=",".join(SHORT), help=f"subset of {','.join(SHORT)}")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "quantize.md"))
    p.add_argument("--hlo", default=None, help="print the optimized HLO of this case and exit")
    args = p.parse_args(argv)
    sizes = [parse_size(t) for t in args.sizes.split(",") if t.strip()]
    if args.hlo:
        fmt, kw = CASES[SHORT[args.hlo]]
        x = jax.ShapeDtypeStruct(shape_for(sizes[0]), jnp.float32)
        f = jax.jit(lambda x: jaxq.dequantize(jaxq.quantize(x, fmt, **kw)))
        print(f.lower(x).compile().as_text())
        return
    names = [SHORT[c.strip()] for c in args.cases.split(",") if c.strip()]
    body = ["# quantize + dequantize throughput", "", environment(), ""]
    for size in sizes:
        load0 = os.getloadavg()[0]
        rows, t_floor, shape = run(size, args.repeats, names)
        load1 = os.getloadavg()[0]
        body += [
            f"## {size} elements ({size * 4 / 2**20:.0f} MiB float32), shape {shape}",
            "",
            "Jitted `dequantize(quantize(x, ...))` vs the floor `x * 2.0` (one read + one "
            f"write); median of {args.repeats} interleaved rounds after warm-up, "
            "`block_until_ready`. RMSE: of the round trip on N(0, 1) data (a check that it "
            "really quantizes). CPU time: process CPU seconds summed over threads, a proxy "
            "that other processes' load disturbs less than wall time (1-minute load average "
            f"{load0:.1f} at the start, {load1:.1f} at the end, on {os.cpu_count()} cores).",
            "",
            table(rows, t_floor, size),
            "",
        ]
        goal_name, goal = GOAL
        if goal_name in names:
            r = next(r for r in rows if r["name"] == goal_name)
            ratio = r["qdq"] / t_floor[0]
            ok = "met" if ratio <= goal else "NOT met"
            body += [f"Goal: {goal_name} within {goal:g}x of the floor: {ratio:.2f}x ({ok}).", ""]
    text = "\n".join(body) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
