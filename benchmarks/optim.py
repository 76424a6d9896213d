"""Benchmark of jaxq.optim: optimizer-state bytes per parameter and update-step time.

Measures, side by side in one process, on the parameters of :class:`jaxq.models.GPT`
models of about 16M and 64M parameters (real shapes: embeddings, attention and MLP
matrices, biases and LayerNorms):

(a) state bytes per parameter: the real ``nbytes`` of every leaf of ``opt.init(params)``
    (cross-checked against ``jaxq.optim.state_nbytes``) for ``optax.adamw`` and jaxq's
    ``adamw_8bit``, ``adamw_4bit`` and ``adamw_fp8``; and, when installed, the bytes of
    bitsandbytes' ``Adam8bit`` state tensors after one step;
(b) the jitted update step ``(params, state, grads) -> (params, state)`` (optimizer update
    plus ``optax.apply_updates``, parameters and state donated) as a ratio to
    ``optax.adamw`` on the same parameters and gradients, with warm-up, interleaved
    repeats, ``block_until_ready`` and the median;
(c) when ``torch`` and ``bitsandbytes`` import: ``bnb.optim.Adam8bit.step()`` and the
    float ``torch.optim.Adam.step()`` (default and ``fused=True``) on the same shapes and
    values, timed in the same interleaved rounds.

Absolute times hold only on the machine named in the output; compare ratios.

Usage:
    python benchmarks/optim.py                 # writes benchmarks/results/optim.md
    python benchmarks/optim.py --sizes 16M --repeats 5 --out /tmp/optim.md
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
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import machine
from flax import nnx

from jaxq import optim
from jaxq.models import GPT, GPTConfig, num_params, split_model

CONFIGS = {
    "16M": GPTConfig(d_model=512, n_heads=8, n_layers=5, seq_len=1024),
    "64M": GPTConfig(d_model=1024, n_heads=16, n_layers=5, seq_len=1024),
    "256M": GPTConfig(d_model=2048, n_heads=16, n_layers=5, seq_len=1024),
    "1B": GPTConfig(d_model=4096, n_heads=32, n_layers=5, seq_len=1024),
    # As 16M without biases (LLaMA-style projections): only LayerNorms stay float32.
    "16M-nobias": GPTConfig(d_model=512, n_heads=8, n_layers=5, seq_len=1024, use_bias=False),
}
LR, B1, B2, EPS, WD = 1e-3, 0.9, 0.999, 1e-8, 1e-2
GOALS = {"adamw_8bit": 2.02, "adamw_4bit": 1.07}
STEP_GOAL = 1.5
MIN_QUANTIZED_SIZE = 4096  # jaxq.optim's and bitsandbytes' default
LOAD0 = os.getloadavg()[0]


def jax_optimizers() -> dict[str, optax.GradientTransformation]:
    """The optimizers compared, all with the same hyperparameters."""
    kw = dict(b1=B1, b2=B2, eps=EPS, weight_decay=WD)
    return {
        "optax.adamw": optax.adamw(LR, **kw),
        "adamw_8bit": optim.adamw_8bit(LR, **kw),
        "adamw_4bit": optim.adamw_4bit(LR, **kw),
        "adamw_fp8": optim.adamw_fp8(LR, **kw),
    }


def make_params(config: GPTConfig, seed: int) -> tuple[dict, dict]:
    """Float32 parameters with the model's shapes (N(0, 0.02)) and gradients (N(0, 1e-3))."""
    _, shapes = split_model(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))))
    leaves, treedef = jax.tree.flatten(shapes)
    pkeys, gkeys = jax.random.split(jax.random.key(seed), (2, len(leaves)))
    params = [0.02 * jax.random.normal(k, s.shape) for k, s in zip(pkeys, leaves, strict=True)]
    grads = [1e-3 * jax.random.normal(k, s.shape) for k, s in zip(gkeys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, params), jax.tree.unflatten(treedef, grads)


def shape_nbytes(config: GPTConfig) -> tuple[int, int, dict[str, int]]:
    """``(parameters, of which in < 4096-element tensors, {optimizer: state bytes})``.

    From ``jax.eval_shape(opt.init, params)``: the shapes and dtypes ``init`` would
    allocate, so large models cost no memory (the timed sizes check that the real
    ``nbytes`` agree).
    """
    _, shapes = split_model(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))))
    leaves = jax.tree.leaves(shapes)
    n = sum(x.size for x in leaves)
    n_small = sum(x.size for x in leaves if x.size < MIN_QUANTIZED_SIZE)
    out = {}
    for name, opt in jax_optimizers().items():
        out[name] = optim.state_nbytes(jax.eval_shape(opt.init, shapes))
    return n, n_small, out


def leaf_nbytes(tree) -> int:
    """Sum of ``nbytes`` over every array leaf."""
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def make_step(opt: optax.GradientTransformation) -> Callable:
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


class JaxRunner:
    """One optimizer on its own copy of the parameters; ``run()`` times one step."""

    def __init__(self, opt, params, grads):
        self.params = jax.tree.map(jnp.copy, params)
        self.state = opt.init(self.params)
        self.grads = grads
        self.step = make_step(opt)

    def run(self) -> float:
        t0 = time.perf_counter()
        self.params, self.state = self.step(self.params, self.state, self.grads)
        jax.block_until_ready((self.params, self.state))
        return time.perf_counter() - t0


def torch_device() -> str:
    """Where torch runs: on the GPU when JAX runs on one (and torch sees it), else CPU."""
    import torch

    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    return "cuda" if on_gpu else "cpu"


class TorchRunner:
    """A torch optimizer over tensors with the same shapes and values (on JAX's device kind)."""

    def __init__(self, factory, params, grads):
        import torch

        self.torch = torch
        self.device = torch_device()
        self.tensors = []
        for p, g in zip(jax.tree.leaves(params), jax.tree.leaves(grads), strict=True):
            t = torch.nn.Parameter(torch.from_numpy(np.array(p)).to(self.device))
            t.grad = torch.from_numpy(np.array(g)).to(self.device)
            self.tensors.append(t)
        self.opt = factory(self.tensors)

    def run(self) -> float:
        t0 = time.perf_counter()
        self.opt.step()
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return time.perf_counter() - t0

    def state_nbytes(self) -> int:
        total = 0
        for state in self.opt.state.values():
            for v in state.values():
                if isinstance(v, self.torch.Tensor):
                    total += v.numel() * v.element_size()
        return total


def torch_factories() -> dict[str, Callable] | None:
    """bitsandbytes and torch optimizers, or None when they do not import."""
    logging.disable(logging.WARNING)  # bnb logs optional-kernel lookups at import
    try:
        import bitsandbytes as bnb
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        print(f"torch/bitsandbytes unavailable ({type(e).__name__}: {e}); skipping (c)")
        return None
    finally:
        logging.disable(logging.NOTSET)
    kw = dict(lr=LR, betas=(B1, B2), eps=EPS)
    return {
        "bnb Adam8bit": lambda ps: bnb.optim.Adam8bit(ps, **kw),
        "torch Adam": lambda ps: torch.optim.Adam(ps, **kw),
        "torch Adam fused": lambda ps: torch.optim.Adam(ps, fused=True, **kw),
    }


def time_interleaved(
    runners: dict, *, warmup: int, repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm-up calls, then ``repeats`` rounds in which every runner steps once.

    Returns wall-clock seconds and process CPU seconds (all threads) per step. CPU time is
    the robust figure on a shared machine: other processes' load inflates wall time but
    not this process's own CPU time.
    """
    for r in runners.values():
        for _ in range(warmup):
            r.run()
    wall = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    for _ in range(repeats):
        for name, r in runners.items():
            c0 = time.process_time()
            wall[name].append(r.run())
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def versions() -> str:
    names = ["jax", "jaxlib", "flax", "optax", "numpy", "torch", "bitsandbytes"]
    out = []
    for n in names:
        try:
            out.append(f"{n} {importlib.metadata.version(n)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{n} (not installed)")
    return ", ".join([f"Python {platform.python_version()}", *out])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="16M,64M", help="comma-separated keys of CONFIGS")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10/5)")
    ap.add_argument("--bytes-sizes", default="16M-nobias,256M,1B",
                    help="further sizes for (a) only, from shapes (no memory, no timing)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true", help="skip (c)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "optim.md"))
    args = ap.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",")]
    for s in sizes:
        if s not in CONFIGS:
            raise ValueError(f"--sizes: unknown size {s!r}; expected some of {list(CONFIGS)}")
    factories = None if args.no_torch else torch_factories()

    bytes_rows, time_rows = [], []
    for size in sizes:
        config = CONFIGS[size]
        params, grads = make_params(config, seed=0)
        n = sum(x.size for x in jax.tree.leaves(params))
        assert n == num_params(config)
        n_small = sum(x.size for x in jax.tree.leaves(params) if x.size < MIN_QUANTIZED_SIZE)
        print(f"[{size}] {n:,} parameters", flush=True)
        runners = {name: JaxRunner(opt, params, grads) for name, opt in jax_optimizers().items()}
        for name, r in runners.items():
            nb = leaf_nbytes(r.state)
            if nb != optim.state_nbytes(r.state):
                raise RuntimeError(f"{name}: leaf nbytes {nb} != state_nbytes")
            bytes_rows.append((size, n, n_small, name, nb))
        if factories:
            for name, f in factories.items():
                runners[name] = TorchRunner(f, params, grads)
        repeats = args.repeats or (10 if n < 32e6 else 5)
        times, cpu = time_interleaved(runners, warmup=args.warmup, repeats=repeats)
        if factories:  # torch states exist only after the first step
            for name in factories:
                if name == "torch Adam fused":
                    continue
                bytes_rows.append((size, n, n_small, name, runners[name].state_nbytes()))
        med = {k: statistics.median(v) for k, v in times.items()}
        cmed = {k: statistics.median(v) for k, v in cpu.items()}
        for name, t in med.items():
            ref = "torch Adam" if name.startswith(("bnb", "torch")) else "optax.adamw"
            row = (size, n, name, t, t / med[ref], min(times[name]), cmed[name],
                   cmed[name] / cmed[ref], repeats)
            time_rows.append(row)
            print(f"[{size}] {name:18s} wall {t * 1e3:8.1f} ms (x{t / med[ref]:5.2f})  "
                  f"cpu {cmed[name] * 1e3:8.1f} ms (x{cmed[name] / cmed[ref]:5.2f})", flush=True)
        del runners

    for size in [s.strip() for s in args.bytes_sizes.split(",") if s.strip()]:
        if size in sizes:
            continue
        if size not in CONFIGS:
            raise ValueError(
                f"--bytes-sizes: unknown size {size!r}; expected some of {list(CONFIGS)}"
            )
        n, n_small, nbytes = shape_nbytes(CONFIGS[size])
        assert n == num_params(CONFIGS[size])
        for name, nb in nbytes.items():
            bytes_rows.append((size, n, n_small, name, nb))
        print(f"[{size}] {n:,} parameters: state bytes from shapes", flush=True)

    write_report(args, bytes_rows, time_rows, factories is not None)


def write_report(args, bytes_rows, time_rows, with_torch: bool) -> None:
    cmd = "python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]])
    lines = [
        "# jaxq.optim benchmark",
        "",
        f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
        f"- Machine: {machine()}",
        f"- Versions: {versions()}",
        f"- Command: `{cmd}`",
        f"- Hyperparameters: lr={LR}, b1={B1}, b2={B2}, eps={EPS}, weight_decay={WD} "
        "(torch/bnb: Adam without weight decay); jaxq defaults otherwise "
        "(min_quantized_size=4096, blocks 256 for 8-bit/FP8, 128 for 4-bit).",
        "- Parameters: the shapes of `jaxq.models.GPT` (vocab 256, tied embeddings) "
        + "; ".join(
            f"{k}: d_model={c.d_model}, n_layers={c.n_layers}, seq_len={c.seq_len}, "
            f"{'biases' if c.use_bias else 'no biases'}"
            for k, c in CONFIGS.items()
            if k in args.sizes.split(",") + args.bytes_sizes.split(",")
        )
        + ". Values N(0, 0.02), gradients N(0, 1e-3), fixed across steps.",
        ("- The machine is shared with other jobs: wall times are inflated by their load "
         "(load average below); process CPU times and the ratios are the robust figures."
         if jax.default_backend() == "cpu" else
         "- On the GPU the wall time of a step (dispatch to `block_until_ready`, for torch "
         "to `torch.cuda.synchronize()`) is the figure; the CPU columns are host time. "
         "torch and bitsandbytes run on the same GPU."),
        "",
        "## (a) Optimizer state bytes per parameter",
        "",
        "Real `nbytes` of every leaf of the state (jaxq: `opt.init(params)`, equal to "
        "`jaxq.optim.state_nbytes`; bitsandbytes: every tensor in `opt.state` after one step). "
        "Sizes that are not timed (below, without bitsandbytes rows) take the bytes from "
        "`jax.eval_shape(opt.init, params)`, the shapes and dtypes `init` allocates.",
        "",
        "Parameters with fewer than 4096 elements (biases, LayerNorm scales and offsets) keep "
        "float32 moments (8 B each) in every 8/4-bit optimizer, jaxq's and bitsandbytes' "
        "alike; the last column is the state of the other parameters per parameter "
        "(assuming those 8 B per small parameter).",
        "",
        "| size | parameters | of which < 4096-element tensors | optimizer | state bytes | "
        "bytes / parameter | goal | bytes / parameter, large tensors only |",
        "|---|---:|---:|---|---:|---:|---|---:|",
    ]
    for size, n, n_small, name, nb in bytes_rows:
        goal = GOALS.get(name)
        mark = "" if goal is None else f"<= {goal} {'met' if nb / n <= goal else 'MISSED'}"
        big = (nb - 8 * n_small) / (n - n_small)
        lines.append(f"| {size} | {n:,} | {n_small:,} | {name} | {nb:,} | {nb / n:.4f} | "
                     f"{mark} | {big:.4f} |")
    lines += [
        "",
        "## (b, c) Update-step time",
        "",
        "jaxq/optax: one jitted step `update + apply_updates` with parameters and state "
        "donated, `block_until_ready`; torch: `opt.step()`. "
        f"{args.warmup} warm-up steps each, then rounds in which every optimizer steps once "
        "(interleaved, so machine load hits all alike); median over rounds. CPU = process "
        "CPU time of all threads during the step (robust to other processes' load). "
        f"Load average (1 min) at start {LOAD0:.1f}, at end {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores. Ratio: to "
        "`optax.adamw` for JAX rows, to `torch Adam` (default, single-tensor) for torch rows."
        f" Goal for jaxq: ratio <= {STEP_GOAL}.",
        "",
        "| size | optimizer | wall median ms | wall min ms | wall ratio | CPU median ms | "
        "CPU ratio | rounds | goal (wall ratio) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for size, _n, name, t, ratio, tmin, c, cratio, reps in time_rows:
        goal = ""
        if name.startswith("adamw_"):
            goal = f"<= {STEP_GOAL} {'met' if ratio <= STEP_GOAL else 'MISSED'}"
        lines.append(
            f"| {size} | {name} | {t * 1e3:.1f} | {tmin * 1e3:.1f} | {ratio:.2f} | "
            f"{c * 1e3:.1f} | {cratio:.2f} | {reps} | {goal} |"
        )
    if with_torch:
        by = {(s, k): t for s, _n, k, t, *_ in time_rows}
        lines += ["", "Cross-framework (same process, same shapes; CPU threads: XLA uses all "
                  "cores, torch its default intra-op threads):", "",
                  "| size | adamw_8bit / bnb Adam8bit | optax.adamw / torch Adam |",
                  "|---|---:|---:|"]
        for s in dict.fromkeys(k[0] for k in by):
            lines.append(f"| {s} | {by[(s, 'adamw_8bit')] / by[(s, 'bnb Adam8bit')]:.2f} | "
                         f"{by[(s, 'optax.adamw')] / by[(s, 'torch Adam')]:.2f} |")
    else:
        lines += ["", "(c) skipped: torch/bitsandbytes not importable."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
