"""A one-block GPT written in plain jnp / jax.nn, with optional FP8 cast points.

Pre-LN transformer block after an embedding LayerNorm (as in BLOOM): token and position
embeddings (gather), LayerNorm, causal multi-head attention with softmax, GELU MLP,
residuals, final LayerNorm, readout and cross-entropy. The embedding LayerNorm has no
epsilon, so the loss is exactly invariant to a power-of-two scaling of the embeddings.

With ``fp8=True``, weights are cast to E4M3 on the forward pass and their gradients to
E5M2; activations entering each matmul are rescaled to unit RMS (a no-op outside
scalify), cast to E4M3, and their gradients rescaled and cast to E5M2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.formats import E4M3, E5M2
from jaxq.scaled import (
    cast_on_backward,
    cast_on_forward,
    dynamic_rescale_l2,
    dynamic_rescale_l2_grad,
)

B, T, D, H, V, FF = 2, 16, 32, 2, 64, 128


def init(key):
    ks = jax.random.split(key, 8)

    def w(k, shape, fan_in):
        return jax.random.normal(k, shape, jnp.float32) / np.sqrt(fan_in)

    return {
        "tok": jax.random.normal(ks[0], (V, D)),
        "pos": jax.random.normal(ks[1], (T, D)),
        "ln0_g": jnp.ones(D), "ln0_b": jnp.zeros(D),
        "ln1_g": jnp.ones(D), "ln1_b": jnp.zeros(D),
        "w_qkv": w(ks[2], (D, 3 * D), D),
        "w_o": w(ks[3], (D, D), D),
        "ln2_g": jnp.ones(D), "ln2_b": jnp.zeros(D),
        "w_1": w(ks[4], (D, FF), D), "b_1": jnp.zeros(FF),
        "w_2": w(ks[5], (FF, D), FF), "b_2": jnp.zeros(D),
        "lnf_g": jnp.ones(D), "lnf_b": jnp.zeros(D),
        "w_out": w(ks[6], (D, V), D),
    }  # fmt: skip


def tokens(key):
    return jax.random.randint(key, (B, T + 1), 0, V)


def _layer_norm(x, g, b, eps):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    inv = jax.lax.rsqrt(var + eps) if eps else jax.lax.rsqrt(var)
    return xc * inv * g + b


def make_loss(fp8: bool):
    def q_w(w):
        if not fp8:
            return w
        w = cast_on_backward(cast_on_forward(w, E4M3), E5M2)
        return dynamic_rescale_l2_grad(w)

    def q_a(x):
        if not fp8:
            return x
        x = cast_on_forward(dynamic_rescale_l2(x), E4M3)
        return dynamic_rescale_l2_grad(cast_on_backward(x, E5M2))

    def loss(p, toks):
        p = {k: q_w(v) for k, v in p.items()}
        inp, tgt = toks[:, :-1], toks[:, 1:]
        x = p["tok"][inp] + p["pos"][None]
        x = _layer_norm(x, p["ln0_g"], p["ln0_b"], 0.0)
        # attention
        h = q_a(_layer_norm(x, p["ln1_g"], p["ln1_b"], 1e-5))
        qkv = h @ p["w_qkv"]
        q, k, v = jnp.split(qkv.reshape(B, T, 3, H, D // H), 3, axis=2)
        q, k, v = (a[:, :, 0].transpose(0, 2, 1, 3) for a in (q, k, v))
        s = jnp.einsum("bhqd,bhkd->bhqk", q_a(q), q_a(k)) / np.sqrt(D // H)
        mask = jnp.tril(jnp.ones((T, T), bool))
        s = jnp.where(mask, s, -jnp.inf)
        a = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("bhqk,bhkd->bhqd", q_a(a), q_a(v)).transpose(0, 2, 1, 3).reshape(B, T, D)
        x = x + q_a(o) @ p["w_o"]
        # MLP
        h = q_a(_layer_norm(x, p["ln2_g"], p["ln2_b"], 1e-5))
        x = x + q_a(jax.nn.gelu(h @ p["w_1"] + p["b_1"])) @ p["w_2"] + p["b_2"]
        # readout and cross-entropy
        h = q_a(_layer_norm(x, p["lnf_g"], p["lnf_b"], 1e-5))
        logp = jax.nn.log_softmax(h @ p["w_out"], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tgt[..., None], axis=-1))

    return loss
