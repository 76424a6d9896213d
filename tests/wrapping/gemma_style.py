"""A Gemma-style decoder in Flax NNX, written as Flax's examples write models (not for jaxq).

Grouped-query attention with ``nnx.Einsum`` projections and rotary embeddings, a gated
GELU MLP of ``nnx.Linear`` layers, RMSNorm, and the blocks stacked with ``nnx.vmap`` and
run with ``nnx.scan``; the readout is tied to the embedding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rope(x, positions, base=10_000.0):
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[:, None].astype(jnp.float32) * freq[None, :]
    sin, cos = jnp.sin(angle)[None, :, None, :], jnp.cos(angle)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
    def __init__(self, d, heads, kv_heads, head_dim, *, rngs):
        self.heads, self.kv_heads = heads, kv_heads
        self.q = nnx.Einsum("btd,dhk->bthk", (d, heads, head_dim), rngs=rngs)
        self.k = nnx.Einsum("btd,dhk->bthk", (d, kv_heads, head_dim), rngs=rngs)
        self.v = nnx.Einsum("btd,dhk->bthk", (d, kv_heads, head_dim), rngs=rngs)
        self.o = nnx.Einsum("bthk,hkd->btd", (heads, head_dim, d), rngs=rngs)

    def __call__(self, x):
        t = x.shape[1]
        pos = jnp.arange(t)
        q, k, v = rope(self.q(x), pos), rope(self.k(x), pos), self.v(x)
        rep = self.heads // self.kv_heads
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        s = jnp.einsum("bqhk,bshk->bhqs", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        mask = jnp.tril(jnp.ones((t, t), bool))
        p = jax.nn.softmax(jnp.where(mask, s, -1e9), axis=-1)
        return self.o(jnp.einsum("bhqs,bshk->bqhk", p, v))


class MLP(nnx.Module):
    def __init__(self, d, hidden, *, rngs):
        self.gate = nnx.Linear(d, hidden, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(d, hidden, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(hidden, d, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, d, heads, kv_heads, head_dim, hidden, *, rngs):
        self.attn_norm = nnx.RMSNorm(d, rngs=rngs)
        self.attn = Attention(d, heads, kv_heads, head_dim, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(d, rngs=rngs)
        self.mlp = MLP(d, hidden, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nnx.Module):
    def __init__(self, vocab=256, d=64, layers=2, heads=4, kv_heads=2, head_dim=16,
                 hidden=128, *, rngs):  # fmt: skip
        self.embed = nnx.Embed(vocab, d, rngs=rngs)

        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(d, heads, kv_heads, head_dim, hidden, rngs=rngs)

        self.blocks = make(rngs)
        self.norm = nnx.RMSNorm(d, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) * jnp.sqrt(self.embed.features).astype(jnp.float32)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, block):
            return block(x)

        x = run(x, self.blocks)
        return self.embed.attend(self.norm(x))
