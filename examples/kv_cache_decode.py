"""Autoregressive decoding through a quantized KV cache (``jaxq.kvcache``): int8, FP8 (E4M3)
and int4 caches against a float cache, in bytes per token and in what the model generates.

What it shows:

1. ``kvcache.generate(model, prompt, steps, fmt=...)``: greedy decoding of a
   ``jaxq.models.GPT`` (prefill the prompt, then one token at a time in a ``lax.scan``)
   with keys quantized per channel over blocks of ``group_size`` positions and values per
   token (KIVI); int4 codes are packed two per byte, and ``residual=R`` keeps the most recent
   R tokens in float.
2. The same loop by hand: ``kvcache.cache_for`` + ``kvcache.prefill`` + ``kvcache.decode_step``.
3. What the cache costs: ``kvcache.nbytes_per_token`` (real bytes of codes and scales per
   cached position and layer), and what decoding through it computes:
   ``kvcache.teacher_forced_logits`` gives every position's logits at once, as token-by-token
   decoding computes them (up to float32 summation order), for the validation loss and the
   next-token agreement with the float cache; greedy continuations are compared token by
   token.

Run:
    python examples/kv_cache_decode.py --tiny
    python examples/kv_cache_decode.py
"""

from __future__ import annotations

import argparse
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxq import data, kvcache
from jaxq.models import GPTConfig, cross_entropy, evaluate, train


def text(tokens) -> str:
    """Byte-level tokens as printable text."""
    return bytes(np.asarray(tokens, np.uint8)).decode("utf-8", "replace").replace("\n", "\\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a small model trained briefly")
    args = ap.parse_args(argv)
    if args.tiny:
        config = GPTConfig(d_model=64, n_heads=4, n_layers=1, seq_len=48)
        steps, prompt_len, new, group = 60, 16, 32, 16
    else:
        config = GPTConfig(d_model=128, n_heads=4, n_layers=2, seq_len=96)
        steps, prompt_len, new, group = 500, 32, 64, 32
    t0 = time.perf_counter()

    train_tokens, val_tokens = data.split(data.load_tokens(max_bytes=1_000_000))
    result = train(config, optax.adamw(3e-3), steps=steps, corpus=(train_tokens, val_tokens),
                   batch_size=16, eval_windows=8)  # fmt: skip
    model = result.model
    print(f"trained GPT ({config.n_layers} layers, {config.n_heads} heads of "
          f"{config.head_dim}): train loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")

    # Prompts: held-out code ending in "self.", so the model has a name to continue;
    # teacher-forced windows: consecutive held-out windows of seq_len + 1 tokens.
    ends = [m.end() for m in re.finditer(rb"self\.", bytes(val_tokens.astype(np.uint8)))]
    ends = [e for e in ends if e >= prompt_len][:: max(1, len(ends) // 8)][:8]
    prompts = jnp.asarray(np.stack([val_tokens[e - prompt_len:e] for e in ends]))
    idx = np.arange(16)[:, None] * config.seq_len + np.arange(config.seq_len + 1)[None, :]
    windows = jnp.asarray(val_tokens[idx])

    # -------------------------------------------------- the decode loop, written by hand
    cache = kvcache.cache_for(model, prompts.shape[0], fmt="int8", group_size=group)
    logits, cache = kvcache.prefill(model, cache, prompts)  # the whole prompt in one call
    token, out = jnp.argmax(logits[:, -1], axis=-1), []
    for pos in range(prompt_len, prompt_len + new):
        out.append(token)
        logits, cache = kvcache.decode_step(model, cache, token, pos)  # one token each
        token = jnp.argmax(logits, axis=-1)
    by_hand = jnp.stack(out, axis=1)
    print(f"int8 cache: codes {cache.k_codes.shape} {cache.k_codes.dtype} "
          f"(layer, batch, position, head, dim), key scales {cache.k_scales.shape}")

    # ---------------------------------------------------- the other formats with generate
    rows = [("float32", None, 0), ("int8", "int8", 0), ("FP8 E4M3", "e4m3", 0),
            (f"int4 + {group}-token float window", "int4", group)]
    if not args.tiny:
        rows.insert(3, ("int4", "int4", 0))
    results = {}
    for name, fmt, residual in rows:
        kw = dict(fmt=fmt, residual=residual, group_size=group)
        if fmt == "int8":
            tokens = by_hand  # generate runs the same loop: prefill, then decode_step in a scan
        else:
            tokens = kvcache.generate(model, prompts, new, **kw)
        # Every position of the windows at once, as cached decoding computes it.
        logits = kvcache.teacher_forced_logits(model, windows[:, :-1], **kw)
        # Bytes per cached position and layer, float windows included: at this model's
        # context, and for the same heads at 4096 positions (shapes only: eval_shape).
        here = kvcache.cache_for(model, 1, **kw)
        long = jax.eval_shape(lambda kw=kw: kvcache.init(1, config.n_heads, 4096,
                                                         config.head_dim, **kw))  # fmt: skip
        results[name] = dict(
            tokens=np.asarray(tokens), next_token=np.asarray(jnp.argmax(logits, axis=-1)),
            loss=float(cross_entropy(logits, windows[:, 1:])),
            bytes=kvcache.nbytes_per_token(here), bytes_4096=kvcache.nbytes_per_token(long),
        )  # fmt: skip

    ref = results["float32"]
    model_loss = evaluate(model, val_tokens[: idx.max() + 1], max_windows=16)
    print(f"\nfloat cache validation loss {ref['loss']:.4f} (the model without a cache: "
          f"{model_loss:.4f}). Agreement with the float cache: the argmax next token at every "
          f"position of the validation windows, and the tokens of greedy continuations.")
    print(f"{'cache':28s} {f'bytes/token/layer (T={config.seq_len}, T=4096)':>37s} "
          f"{'val loss':>9s} {'vs float':>9s} {'argmax':>7s} {'greedy':>7s}")
    for name, r in results.items():
        r["argmax"] = float(np.mean(r["next_token"] == ref["next_token"]))
        r["greedy"] = float(np.mean(r["tokens"] == ref["tokens"]))
        print(f"{name:28s} {r['bytes']:7.1f} ({r['bytes'] / ref['bytes']:.3f}x) "
              f"{r['bytes_4096']:7.1f} ({r['bytes_4096'] / ref['bytes_4096']:.3f}x) "
              f"{r['loss']:9.4f} {r['loss'] / ref['loss'] - 1:+9.2%} {r['argmax']:7.1%} "
              f"{r['greedy']:7.1%}")

    int4 = f"int4 + {group}-token float window"
    print(f"\nprompt: {text(prompts[0])!r}")
    for name in ("float32", int4):
        print(f"  continued through the {name} cache: {text(results[name]['tokens'][0])!r}")

    i8, i4 = results["int8"], results[int4]
    print(f"RESULT kv_cache_decode: bytes/token at 4096 positions int8 "
          f"{i8['bytes_4096'] / ref['bytes_4096']:.3f}x, int4+window "
          f"{i4['bytes_4096'] / ref['bytes_4096']:.3f}x float; val loss float {ref['loss']:.4f}, "
          f"int8 {i8['loss']:.4f}, int4+window {i4['loss']:.4f}; argmax agreement int8 "
          f"{i8['argmax']:.1%}, int4+window {i4['argmax']:.1%}; "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
