"""A two-layer GPT in plain jnp, with the layers under ``lax.scan`` or in a Python loop.

Vocabulary 97, width 64, 4 heads, sequence 16, batch 4: embedding gather; per layer a
written-out LayerNorm (mean, variance, ``rsqrt``), a fused QKV matmul split with
``jnp.split``, causal softmax attention through ``jnp.einsum`` with a ``jnp.where`` mask
at -1e9, an output projection, a GELU MLP and residuals; then a head matmul,
``log_softmax``, ``take_along_axis`` of the targets and ``.mean()``.

``make_loss(scan=..., remat=..., cast=..., emb_norm=...)`` returns ``loss(params, tokens)``;
``cast`` is applied to every weight and to the activation entering every matmul (e.g. FP8
casts). With ``emb_norm=True`` the gathered embeddings first go through a LayerNorm without
epsilon or affine (as in BLOOM), which makes the loss exactly invariant to multiplying the
embedding table by a power of two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

V, D, H, T, B, L, FF = 97, 64, 4, 16, 4, 2, 256


def init(key: jax.Array) -> dict:
    ks = jax.random.split(key, 8)

    def w(k, shape, fan_in):
        return jax.random.normal(k, shape, jnp.float32) / np.sqrt(fan_in)

    return {
        "emb": jax.random.normal(ks[0], (V, D)),
        "ln_g": 1.0 + 0.1 * jax.random.normal(ks[1], (L, 2, D)),
        "ln_b": 0.1 * jax.random.normal(ks[2], (L, 2, D)),
        "wqkv": w(ks[3], (L, D, 3 * D), D),
        "wo": w(ks[4], (L, D, D), D),
        "w1": w(ks[5], (L, D, FF), D),
        "w2": w(ks[6], (L, FF, D), FF),
        "head": w(ks[7], (D, V), D),
    }


def tokens(key: jax.Array) -> jax.Array:
    return jax.random.randint(key, (B, T + 1), 0, V)


def _ln(x, g, b):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    return xc * jax.lax.rsqrt(var + 1e-5) * g + b


def _identity(x, kind):
    return x


def make_loss(*, scan: bool = True, remat: bool = False, cast=_identity, emb_norm=False):
    """``loss(params, tokens)``; ``cast(x, kind)`` with kind ``"w"`` or ``"a"``."""
    mask = jnp.tril(jnp.ones((T, T), bool))

    def layer(x, p):
        g, b = p["ln_g"], p["ln_b"]
        h = cast(_ln(x, g[0], b[0]), "a")
        q, k, v = jnp.split(h @ cast(p["wqkv"], "w"), 3, axis=-1)
        q, k, v = (a.reshape(B, T, H, D // H) for a in (q, k, v))
        s = jnp.einsum("bqhd,bkhd->bhqk", cast(q, "a"), cast(k, "a")) / float(np.sqrt(D // H))
        a = jax.nn.softmax(jnp.where(mask, s, -1e9), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", cast(a, "a"), cast(v, "a")).reshape(B, T, D)
        x = x + cast(o, "a") @ cast(p["wo"], "w")
        h = cast(_ln(x, g[1], b[1]), "a")
        m = cast(jax.nn.gelu(h @ cast(p["w1"], "w")), "a")
        return x + m @ cast(p["w2"], "w")

    body = jax.checkpoint(layer) if remat else layer
    stacked = ("ln_g", "ln_b", "wqkv", "wo", "w1", "w2")

    def loss(params, toks):
        inp, tgt = toks[:, :-1], toks[:, 1:]
        x = cast(params["emb"], "w")[inp]
        if emb_norm:
            xc = x - jnp.mean(x, axis=-1, keepdims=True)
            x = xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True))
        layers = {n: params[n] for n in stacked}
        if scan:
            x, _ = jax.lax.scan(lambda c, p: (body(c, p), None), x, layers)
        else:
            for i in range(L):
                x = body(x, {n: w[i] for n, w in layers.items()})
        logits = cast(x, "a") @ cast(params["head"], "w")
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, tgt[..., None], axis=-1).mean()

    return loss
