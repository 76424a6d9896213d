"""What the benchmarks share: the machine line they print and the trained GPT they use."""

from __future__ import annotations

import math
import os
import pickle
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxq import data
from jaxq.models import GPT, GPTConfig
from jaxq.models.train import evaluate, make_train_step, merge_model, split_model


def machine() -> str:
    """CPU model, core count, RAM and the JAX backend, in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    dev = jax.devices()[0]
    return f"{cpu}, {os.cpu_count()} cores{mem}; JAX backend {dev.platform} ({dev.device_kind})"


CONFIG = GPTConfig(d_model=256, n_heads=4, n_layers=4, seq_len=64)
CACHE = Path(__file__).parent / ".cache"


def trained_gpt(*, max_steps=3000, eval_every=250, patience=3, seed=0):
    """The benchmarks' trained GPT (:data:`CONFIG`) on the default corpus: AdamW with
    warm-up and cosine decay, evaluated every ``eval_every`` steps and stopped after
    ``patience`` evaluations without a new best (or at ``max_steps``); the best parameters
    are kept. Cached in ``benchmarks/.cache``.

    Returns:
        ``(model, log, train_tokens, val_tokens)`` with ``log`` the ``(step, train loss,
        validation loss)`` evaluations.
    """
    tokens = data.load_tokens(max_bytes=1_000_000)
    train_np, val_tokens = data.split(tokens)
    train_tokens = jnp.asarray(train_np)
    tag = f"gpt_d{CONFIG.d_model}_l{CONFIG.n_layers}_t{CONFIG.seq_len}_s{seed}_" \
          f"m{max_steps}_p{patience}_e{eval_every}.pkl"  # fmt: skip
    path = CACHE / tag
    if path.exists():
        with open(path, "rb") as f:
            saved = pickle.load(f)
        model = GPT(CONFIG, rngs=nnx.Rngs(seed))
        graphdef, _ = split_model(model)
        params = jax.tree.map(jnp.asarray, saved["params"])
        return merge_model(graphdef, params), saved["log"], train_tokens, val_tokens
    print(f"training GPT {CONFIG.n_layers}x{CONFIG.d_model} (seq {CONFIG.seq_len}) ...")
    model = GPT(CONFIG, rngs=nnx.Rngs(seed))
    graphdef, params = split_model(model)
    warmup = min(100, max_steps // 4)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, warmup, max_steps, 1e-4)
    opt = optax.adamw(schedule, weight_decay=0.1)
    opt_state = opt.init(params)
    step = make_train_step(graphdef, opt)
    sample = jax.jit(lambda k: data.batch(train_tokens, k, batch_size=16, seq_len=CONFIG.seq_len))
    key = jax.random.key(seed + 1)
    best, best_params, since, log, t0 = math.inf, params, 0, [], time.time()
    for i in range(1, max_steps + 1):
        x, y = sample(jax.random.fold_in(key, i))
        params, opt_state, loss = step(params, opt_state, x, y)
        if i % eval_every == 0 or i == max_steps:
            val = evaluate(merge_model(graphdef, params), val_tokens, max_windows=256)
            log.append((i, float(loss), val))
            print(f"  step {i:5d} train {float(loss):.4f} val {val:.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
            if val < best - 1e-4:
                best, since = val, 0
                best_params = jax.tree.map(lambda a: a.copy(), params)
            else:
                since += 1
                if since >= patience:
                    break
    CACHE.mkdir(exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"params": jax.tree.map(np.asarray, best_params), "log": log}, f)
    return merge_model(graphdef, best_params), log, train_tokens, val_tokens
