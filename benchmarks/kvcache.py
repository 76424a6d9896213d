"""Benchmark of jaxq.kvcache: bytes, quality and CPU decode speed of a quantized KV cache.

On the benchmarks' trained :class:`jaxq.models.GPT` (4 layers, d_model 256, 4 heads of 64,
seq 64, byte-level; see ``benchmarks/common.py``) and its held-out split, for a float32
cache and for int8, E4M3, E5M2 and int4 caches (keys per channel over blocks of
``--group-size`` positions, values per token; int4 with float windows of the most recent
0, 8, 16 and 32 tokens):

1. bytes per cached token per layer (:func:`jaxq.kvcache.nbytes_per_token`, with and
   without the float windows), and the ratio to the float cache;
2. validation loss and perplexity of teacher-forced decoding through each cache
   (:func:`jaxq.kvcache.teacher_forced_loss`) on the same windows as the float cache, the
   windows of :func:`jaxq.models.train.evaluate` (``seq_len + 1`` tokens, stride
   ``seq_len``), and the relative difference of perplexity;
3. greedy continuations (:func:`jaxq.kvcache.generate`) of prompts from the validation
   split, compared token by token with those of the float cache;
4. decode throughput: tokens/s of a loop of the jitted single-token
   :func:`jaxq.kvcache.decode_step` (greedy, the cache donated), after a prefill, at batch
   1 and 8, median over repeats, each repeat ending with ``block_until_ready``.

Usage:
    python benchmarks/kvcache.py              # writes benchmarks/results/kvcache.md (+ .json)
    python benchmarks/kvcache.py --quick      # tiny smoke run on a 20-step model, to /tmp
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import CONFIG, machine, trained_gpt
from flax import nnx

from jaxq import kvcache
from jaxq.kvcache import kivi
from jaxq.models.train import evaluate

#: ``(name, fmt, residual, goal)``: goal = largest allowed |perplexity change| (or None).
ROWS = [
    ("float32", None, 0, None),
    ("int8", "int8", 0, 0.005),
    ("E4M3", "e4m3", 0, 0.005),
    ("E5M2", "e5m2", 0, None),
    ("int4, R=0", "int4", 0, None),
    ("int4, R=8", "int4", 8, None),
    ("int4, R=16", "int4", 16, None),
    ("int4, R=32", "int4", 32, 0.03),
]
#: Caches whose greedy text is compared with the float cache's, and whose speed is timed.
GENERATE = ["int8", "E4M3", "int4, R=0", "int4, R=32"]
SPEED = ["float32", "int8", "int4, R=0", "int4, R=32"]
#: A longer max_len, for the bytes a long-context cache of the same layout would take.
LONG = 4096


def quantized_reads(residual: int, group_size: int, t: int) -> tuple[float, float]:
    """Fractions of the (query, key) and (query, value) pairs of a causal sequence of ``t``
    positions that are read dequantized (the rest come from the float windows)."""
    p = np.arange(t)[:, None]
    j = np.arange(t)[None, :]
    causal = j <= p
    fk, fv = kivi.read_masks(j, p, residual, group_size)
    n = causal.sum()
    return float((causal & ~fk).sum() / n), float((causal & ~fv).sum() / n)


def windows(val_tokens, n: int, seq_len: int) -> np.ndarray:
    """The first ``n`` windows of ``seq_len + 1`` tokens, stride ``seq_len`` (as evaluate)."""
    val = np.asarray(val_tokens)
    n = min(n, (len(val) - 1) // seq_len)
    return np.stack([val[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])


def mean_loss(model, wins: np.ndarray, batch: int, **options) -> float:
    """Mean cross-entropy over all scored tokens (every batch has ``batch`` windows)."""
    losses = [float(kvcache.teacher_forced_loss(model, jnp.asarray(wins[i: i + batch]),
                                                **options))
              for i in range(0, len(wins), batch)]  # fmt: skip
    sizes = [len(wins[i : i + batch]) for i in range(0, len(wins), batch)]
    return float(np.dot(losses, sizes) / sum(sizes))


def prompts(val_tokens, n: int, length: int) -> np.ndarray:
    """``n`` prompts of ``length`` tokens, spread evenly over the validation split."""
    val = np.asarray(val_tokens)
    starts = np.linspace(0, len(val) - length - 1, n).astype(int)
    return np.stack([val[s : s + length] for s in starts])


def text(tokens) -> str:
    """Decoded bytes as a Python string literal (every control character escaped)."""
    return repr(bytes(int(t) for t in tokens).decode("utf-8", errors="backslashreplace"))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _greedy_step(graphdef, params, cache, token, pos):
    logits, cache = kvcache.decode_step(nnx.merge(graphdef, params), cache, token, pos)
    return jnp.argmax(logits, axis=-1).astype(token.dtype), cache


def decode_loop(model, prompt: np.ndarray, steps: int, **options):
    """A function that prefills ``prompt`` into a fresh cache, then runs ``steps`` greedy
    decode steps and returns ``(seconds of the decode steps, generated tokens)``."""
    graphdef, params = nnx.split(model)
    b, n = prompt.shape
    prompt = jnp.asarray(prompt)

    def run():
        cache = kvcache.cache_for(model, b, **options)
        logits, cache = kvcache.prefill(model, cache, prompt)
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        jax.block_until_ready((token, cache))
        toks = []
        t0 = time.perf_counter()
        for i in range(steps):
            token, cache = _greedy_step(graphdef, params, cache, token, jnp.int32(n + i))
            toks.append(token)
        jax.block_until_ready((token, cache))
        seconds = time.perf_counter() - t0
        return seconds, np.stack([np.asarray(t) for t in toks], axis=1)

    return run


def decode_speeds(loops: dict, repeats: int) -> dict:
    """Median seconds of each loop: one warm-up call each (compiles), then ``repeats``
    interleaved rounds (every loop once per round), so that load drifts hit all alike."""
    for run in loops.values():
        run()
    times = {name: [] for name in loops}
    for _ in range(repeats):
        for name, run in loops.items():
            times[name].append(run()[0])
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: a 20-step model, few windows/prompts/repeats")  # fmt: skip
    ap.add_argument("--windows", type=int, default=256, help="validation windows scored")
    ap.add_argument("--prompts", type=int, default=16, help="greedy prompts")
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--new", type=int, default=40, help="greedy tokens per prompt")
    ap.add_argument("--group-size", type=int, default=32, help="key block G of every cache")
    ap.add_argument("--repeats", type=int, default=9, help="timed decode loops per case")
    ap.add_argument("--decode-prompt", type=int, default=8,
                    help="prefilled tokens before the timed decode steps")  # fmt: skip
    ap.add_argument("--out", default=None,
                    help="Markdown path (default benchmarks/results/kvcache.md, "
                         "/tmp/kvcache_quick.md with --quick); JSON next to it")  # fmt: skip
    args = ap.parse_args(argv)
    if args.quick:  # smaller defaults; options given explicitly still win
        ap.set_defaults(windows=16, prompts=4, new=16, repeats=2)
        args = ap.parse_args(argv)
    if args.out is None:
        args.out = ("/tmp/kvcache_quick.md" if args.quick
                    else str(Path(__file__).parent / "results" / "kvcache.md"))  # fmt: skip
    t_start = time.time()
    max_steps = 20 if args.quick else 3000
    model, log, _, val_tokens = trained_gpt(
        max_steps=max_steps, eval_every=10 if args.quick else 250
    )
    c = model.config
    if args.prompt_len + args.new - 1 > c.seq_len:
        raise SystemExit(f"--prompt-len + --new - 1 must be <= seq_len={c.seq_len}")
    g = args.group_size
    rows = {name: {"row": name, "fmt": fmt, "residual": r, "goal": goal}
            for name, fmt, r, goal in ROWS}  # fmt: skip

    # 1. Bytes per cached token per layer.
    for row in rows.values():
        cache = kvcache.cache_for(model, 1, fmt=row["fmt"], residual=row["residual"],
                                  group_size=g)  # fmt: skip
        row["bytes"] = kvcache.nbytes_per_token(cache)
        row["bytes_no_windows"] = kvcache.nbytes_per_token(cache, windows=False)
        long = kvcache.init(1, c.n_heads, LONG, c.head_dim, fmt=row["fmt"],
                            residual=row["residual"], group_size=g)  # fmt: skip
        row["bytes_long"] = kvcache.nbytes_per_token(long)
        row["quantized_key_reads"], row["quantized_value_reads"] = (
            quantized_reads(row["residual"], g, c.seq_len) if row["fmt"] else (0.0, 0.0)
        )
    base_bytes = rows["float32"]["bytes"]
    for row in rows.values():
        row["bytes_ratio"] = row["bytes"] / base_bytes
        row["bytes_no_windows_ratio"] = row["bytes_no_windows"] / base_bytes
        row["bytes_long_ratio"] = row["bytes_long"] / rows["float32"]["bytes_long"]

    # 2. Teacher-forced validation loss through each cache, on the same windows.
    wins = windows(val_tokens, args.windows, c.seq_len)
    t0 = time.time()
    for row in rows.values():
        row["val_loss"] = mean_loss(model, wins, 64, fmt=row["fmt"], residual=row["residual"],
                                    group_size=g)  # fmt: skip
        row["ppl"] = math.exp(row["val_loss"])
        print(f"  {row['row']:12s} val {row['val_loss']:.4f}  ppl {row['ppl']:.4f}", flush=True)
    model_loss = evaluate(model, val_tokens, max_windows=len(wins))
    base = rows["float32"]
    for row in rows.values():
        row["ppl_change"] = row["ppl"] / base["ppl"] - 1.0
        row["goal_met"] = None if row["goal"] is None else abs(row["ppl_change"]) <= row["goal"]
    loss_seconds = time.time() - t0

    # 3. Greedy continuations against the float cache's.
    t0 = time.time()
    ps = prompts(val_tokens, args.prompts, args.prompt_len)
    gen = {}
    for name in ["float32", *GENERATE]:
        row = rows[name]
        options = dict(fmt=row["fmt"], residual=row["residual"], group_size=g)
        gen[name] = np.asarray(kvcache.generate(model, jnp.asarray(ps), args.new, **options))
    # The float cache's own logits along its continuation: how close to a tie was the float
    # model's choice where a quantized cache first picked another token?
    seq = np.concatenate([ps, gen["float32"]], axis=1)[:, :-1]
    top2 = np.sort(np.asarray(kvcache.teacher_forced_logits(model, seq, fmt=None)), axis=-1)
    gap = (top2[..., -1] - top2[..., -2])[:, args.prompt_len - 1 :]
    greedy = []
    for name in GENERATE:
        same = gen[name] == gen["float32"]
        first = np.where(same.all(axis=1), args.new, np.argmin(same, axis=1))
        diverged = first < args.new
        gaps = gap[np.nonzero(diverged)[0], first[diverged]]
        greedy.append({"row": name, "token_agreement": float(same.mean()),
                       "identical": float(same.all(axis=1).mean()),
                       "first_divergence": float(first.mean()),
                       "gap_at_divergence": [float(x) for x in gaps]})  # fmt: skip
    median_gap = float(np.median(gap))
    example = {"prompt": text(ps[0]), "float32": text(gen["float32"][0]),
               "int8": text(gen["int8"][0]), "median_gap": median_gap}  # fmt: skip
    greedy_seconds = time.time() - t0

    # 4. Decode throughput of the jitted single-token step.
    t0 = time.time()
    steps = c.seq_len - args.decode_prompt
    speed = []
    for batch in (1, 8):
        dp = prompts(val_tokens, batch, args.decode_prompt)
        loops = {name: decode_loop(model, dp, steps, fmt=rows[name]["fmt"],
                                   residual=rows[name]["residual"], group_size=g)
                 for name in SPEED}  # fmt: skip
        for name, seconds in decode_speeds(loops, args.repeats).items():
            speed.append({"row": name, "batch": batch, "tokens_per_s": batch * steps / seconds})
            print(f"  decode {name:12s} batch {batch}: {speed[-1]['tokens_per_s']:8.1f} "
                  "tokens/s", flush=True)  # fmt: skip
    for s in speed:
        ref = next(x for x in speed if x["batch"] == s["batch"] and x["row"] == "float32")
        s["vs_float"] = s["tokens_per_s"] / ref["tokens_per_s"]
    speed_seconds = time.time() - t0

    info = {
        "windows": len(wins), "float_cache_loss_vs_evaluate": base["val_loss"] - model_loss,
        "prompts": len(ps), "prompt_len": args.prompt_len, "new": args.new,
        "decode_prompt": args.decode_prompt, "decode_steps": steps, "repeats": args.repeats,
        "group_size": g, "quick": args.quick, "max_steps": max_steps,
        "load_average": os.getloadavg(),
        "weight_bytes": sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param))),
        "seconds": {"loss": loss_seconds, "greedy": greedy_seconds, "speed": speed_seconds,
                    "total": time.time() - t_start},
    }  # fmt: skip
    write(args, log, info, list(rows.values()), greedy, example, speed)


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def write(args, log, info, rows, greedy, example, speed) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    c, g = CONFIG, info["group_size"]
    steps = log[-1][0]
    stopped = "early stop" if steps < info["max_steps"] else "step cap"
    best = min(v for _, _, v in log)
    command = "python benchmarks/kvcache.py" + (" --quick" if args.quick else "")
    load = ", ".join(f"{x:.1f}" for x in info["load_average"])
    busy = ""
    if info["load_average"][0] > os.cpu_count():
        busy = (f" The load average ({info['load_average'][0]:.1f} on {os.cpu_count()} cores) "
                "shows other processes sharing the CPUs during the run: the ratios are more "
                "telling than the absolute rates, and both are noisy.")  # fmt: skip
    lines = [
        "# Quantized KV cache on a trained GPT (jaxq.kvcache)",
        "",
        f"- Date: {datetime.date.today()}; jax {jax.__version__}; Python {sys.version.split()[0]}",
        f"- Machine: {machine()}; load average at the end {load}",
        f"- Model: GPT, {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads of "
        f"{c.head_dim}, seq {c.seq_len}, byte-level vocabulary 256; trained {steps} steps "
        f"({stopped}), best validation loss {best:.4f} (the checkpoint used).",
        f"- Caches: keys quantized per channel over blocks of G = {g} positions, values per "
        "token; R = float window of the most recent tokens (keys of an incomplete block are "
        "also read in float). int4 codes are packed two per byte; scales are float32.",
        f"- With seq_len {c.seq_len}, a window of R = 32 covers half of the longest context, "
        f"and with G = {g} no key is read quantized before position {g - 1}: the last two "
        "columns of the quality table give the fraction of (query, key) and (query, value) "
        "pairs of a full window that are actually read dequantized.",
        f"- Command: `{command}` ({info['seconds']['total']:.0f} s in all)",
        "",
        "## Bytes per cached token per layer (one sequence, all heads, K and V)",
        "",
        f"| cache | bytes (max_len {c.seq_len}) | vs float | without float windows | vs float "
        f"| bytes at max_len {LONG} | vs float |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['bytes']:.1f} | {r['bytes_ratio']:.3f}x | "
            f"{r['bytes_no_windows']:.1f} | {r['bytes_no_windows_ratio']:.3f}x | "
            f"{r['bytes_long']:.1f} | {r['bytes_long_ratio']:.3f}x |"
        )
    lines += [
        "",
        f"`kvcache.nbytes_per_token` of `kvcache.cache_for(model, 1, ...)`: codes, float32 "
        f"scales and (first column) the fixed-size float rings (the R most recent values, "
        f"the max(R, G - 1) most recent keys) amortized over max_len = {c.seq_len} positions, "
        "the most this model embeds; the last column is the same cache layout with "
        f"max_len {LONG}, where the rings amortize away.",
        "",
        "## Validation loss of teacher-forced decoding through the cache",
        "",
        f"{info['windows']} held-out windows of {c.seq_len} scored tokens (those of "
        "`jaxq.models.train.evaluate`), the same for every cache; position t reads the "
        "keys/values of 0..t exactly as token-by-token decoding through the cache would. "
        f"Float cache minus `evaluate(model)`: {info['float_cache_loss_vs_evaluate']:+.1e} "
        "nats.",
        "",
        "| cache | val loss | perplexity | perplexity vs float | goal | met | "
        "K read quantized | V read quantized |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        goal = "" if r["goal"] is None else f"within ±{100 * r['goal']:.1f}%"
        met = "" if r["goal_met"] is None else ("yes" if r["goal_met"] else "**no**")
        change = "(reference)" if r["fmt"] is None else _pct(r["ppl_change"])
        lines.append(f"| {r['row']} | {r['val_loss']:.4f} | {r['ppl']:.4f} | {change} | {goal} "
                     f"| {met} | {100 * r['quantized_key_reads']:.0f}% | "
                     f"{100 * r['quantized_value_reads']:.0f}% |")  # fmt: skip
    lines += [
        "",
        "## Greedy decoding against the float cache",
        "",
        f"{info['prompts']} prompts of {info['prompt_len']} validation tokens (evenly spaced "
        f"over the split), {info['new']} new tokens each, `kvcache.generate` (prefill, then a "
        "scanned decode loop). Agreement: generated tokens equal to the float cache's at the "
        "same position; first divergence: mean index of the first differing token (the "
        f"number of new tokens, {info['new']}, for an identical one); top-2 gap: the float "
        "cache's logit gap between its first and second choice at each first divergence "
        f"(over all its generated tokens the median gap is {example['median_gap']:.2f}).",
        "",
        "| cache | token agreement | identical continuations | first divergence | "
        "top-2 gap at divergences |",
        "|---|---|---|---|---|",
    ]
    for r in greedy:
        lines.append(
            f"| {r['row']} | {100 * r['token_agreement']:.1f}% | "
            f"{100 * r['identical']:.0f}% | {r['first_divergence']:.1f} | "
            f"{', '.join(f'{x:.2f}' for x in r['gap_at_divergence']) or '-'} |"
        )
    lines += [
        "",
        "Example (prompt 1; bytes decoded as UTF-8, shown as Python literals):",
        "",
        "```",
        f"prompt:  {example['prompt']}",
        f"float32: {example['float32']}",
        f"int8:    {example['int8']}",
        "```",
        "",
        "## CPU decode throughput",
        "",
        f"A Python loop of the jitted single-token step (`kvcache.decode_step` + argmax, cache "
        f"donated) for {info['decode_steps']} positions after a prefill of "
        f"{info['decode_prompt']} tokens; tokens/s = batch x steps / time, median of "
        f"{info['repeats']} repeats after a warm-up, each ending with `block_until_ready`; "
        "the caches run in interleaved rounds. Every step dequantizes the whole cache "
        f"(max_len {c.seq_len}); at this size the cache (float32: "
        f"{rows[0]['bytes'] * c.n_layers * c.seq_len / 2**20:.2f} MiB per sequence) is "
        f"small next to the float32 weights ({info['weight_bytes'] / 2**20:.1f} MiB), so "
        "a smaller cache saves little memory traffic and the dequantization is extra work." + busy,
        "",
        "| cache | batch 1 tokens/s | vs float | batch 8 tokens/s | vs float |",
        "|---|---|---|---|---|",
    ]
    for name in SPEED:
        b1, b8 = (next(s for s in speed if s["row"] == name and s["batch"] == b) for b in (1, 8))
        lines.append(
            f"| {name} | {b1['tokens_per_s']:.0f} | {b1['vs_float']:.2f}x | "
            f"{b8['tokens_per_s']:.0f} | {b8['vs_float']:.2f}x |"
        )
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"caches": rows, "greedy": greedy, "example": example, "decode": speed, "info": info,
         "training": log}, indent=1))  # fmt: skip
    print("\n".join(lines))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
