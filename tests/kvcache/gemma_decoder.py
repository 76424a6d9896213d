"""A Gemma-style NNX decoder that decodes through a quantized :mod:`jaxq.kvcache` cache.

The model is written as Flax's examples write one, not for jaxq: ``nnx.Einsum`` projections,
grouped-query attention (``heads`` query heads sharing ``kv_heads`` key/value heads), rotary
embeddings, a gated GELU MLP, RMSNorm, a readout tied to the embedding, the blocks stacked
with ``nnx.vmap`` and run with ``nnx.scan``, and Gemma 2/3's alternation of local layers
(sliding window of ``window`` positions) and global ones (every ``global_every``-th layer).

It shows the pattern for making such a model decode with a KV cache:

- each attention gets a cache-aware twin, :meth:`Attention.cached`, that computes
  ``q, k, v`` as the plain forward does and hands them to :func:`jaxq.kvcache.update_attend`
  (which writes ``k, v`` at their positions and attends over the cache) instead of
  attending itself, and :meth:`Attention.teacher_forced`, which calls
  :func:`jaxq.kvcache.teacher_forced_attention` for all positions at once;
- the stacked cache (``layers`` = number of blocks) rides in the ``nnx.scan`` carry; the
  layer index and each layer's window are scanned along with the blocks (a global layer's
  window is :data:`GLOBAL`);
- ``pre_rope=True`` caches keys before RoPE (KVQuant): ``k`` is passed un-rotated with
  ``rope=rope``, and the cache rotates keys when they are read;
- :func:`prefill` / :func:`decode_step` are jitted with the cache donated (updated in place),
  and :func:`generate` is one jitted prefill plus a ``lax.scan`` of decode steps.

:meth:`Decoder.__call__` is the plain full-sequence forward (no cache, no jaxq), the
reference the cached paths are tested against.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from wrapping.gemma_style import rope  # the one RoPE of the test models

from jaxq import kvcache

#: The window of a global layer: every position.
GLOBAL = int(np.iinfo(np.int32).max)


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes; ``heads`` must be a multiple of ``kv_heads`` (grouped-query attention)."""

    vocab: int = 256
    d: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    hidden: int = 128
    window: int = 6  # sliding window of the local layers
    global_every: int = 2  # layer i is global iff (i + 1) % global_every == 0 (Gemma 2: 2)
    max_len: int = 32  # the longest sequence a cache holds

    def windows(self) -> jax.Array:
        """int32 ``(layers,)``: the window of each layer."""
        return jnp.array([GLOBAL if (i + 1) % self.global_every == 0 else self.window
                          for i in range(self.layers)], jnp.int32)  # fmt: skip


class Attention(nnx.Module):
    def __init__(self, cfg: Config, *, rngs):
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q = nnx.Einsum("btd,dhk->bthk", (cfg.d, cfg.heads, cfg.head_dim), rngs=rngs)
        self.k = nnx.Einsum("btd,dhk->bthk", (cfg.d, cfg.kv_heads, cfg.head_dim), rngs=rngs)
        self.v = nnx.Einsum("btd,dhk->bthk", (cfg.d, cfg.kv_heads, cfg.head_dim), rngs=rngs)
        self.o = nnx.Einsum("bthk,hkd->btd", (cfg.heads, cfg.head_dim, cfg.d), rngs=rngs)

    def __call__(self, x, window):
        """Full-sequence causal attention over positions ``i - window < j <= i``."""
        t = x.shape[1]
        pos = jnp.arange(t)
        q, k, v = rope(self.q(x), pos), rope(self.k(x), pos), self.v(x)
        rep = self.heads // self.kv_heads
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        s = jnp.einsum("bqhk,bshk->bhqs", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        i, j = pos[:, None], pos[None, :]
        p = jax.nn.softmax(jnp.where((j <= i) & (j > i - window), s, -1e9), axis=-1)
        return self.o(jnp.einsum("bhqs,bshk->bqhk", p, v))

    def _qkv(self, x, positions, pre_rope: bool):
        """Rotated queries, keys (rotated unless ``pre_rope``), values, and the ``rope=``."""
        k = self.k(x)
        k = k if pre_rope else rope(k, positions)
        return rope(self.q(x), positions), k, self.v(x), rope if pre_rope else None

    def cached(self, x, cache, layer, pos, window, *, pre_rope=False):
        """Attention of ``x`` at ``pos ..`` through layer ``layer`` of the cache."""
        q, k, v, rope_fn = self._qkv(x, pos + jnp.arange(x.shape[1]), pre_rope)
        y, cache = kvcache.update_attend(cache, layer, q, k, v, pos, window=window,
                                         rope=rope_fn)  # fmt: skip
        return self.o(y), cache

    def teacher_forced(self, x, window, *, pre_rope=False, **options):
        """Every position read through a cache (``options``: fmt, residual, group_size)."""
        q, k, v, rope_fn = self._qkv(x, jnp.arange(x.shape[1]), pre_rope)
        y = kvcache.teacher_forced_attention(q, k, v, window=window, rope=rope_fn, **options)
        return self.o(y)


class MLP(nnx.Module):
    def __init__(self, d, hidden, *, rngs):
        self.gate = nnx.Linear(d, hidden, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(d, hidden, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(hidden, d, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, cfg: Config, *, rngs):
        self.attn_norm = nnx.RMSNorm(cfg.d, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(cfg.d, rngs=rngs)
        self.mlp = MLP(cfg.d, cfg.hidden, rngs=rngs)

    def __call__(self, x, window):
        x = x + self.attn(self.attn_norm(x), window)
        return x + self.mlp(self.mlp_norm(x))

    def cached(self, x, cache, layer, pos, window, *, pre_rope=False):
        y, cache = self.attn.cached(self.attn_norm(x), cache, layer, pos, window,
                                    pre_rope=pre_rope)  # fmt: skip
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), cache

    def teacher_forced(self, x, window, **options):
        x = x + self.attn.teacher_forced(self.attn_norm(x), window, **options)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nnx.Module):
    def __init__(self, cfg: Config, *, rngs):
        self.config = cfg
        self.embed = nnx.Embed(cfg.vocab, cfg.d, rngs=rngs)

        @nnx.split_rngs(splits=cfg.layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(cfg, rngs=rngs)

        self.blocks = make(rngs)
        self.norm = nnx.RMSNorm(cfg.d, rngs=rngs)

    def _embed(self, tokens):
        return self.embed(tokens) * jnp.sqrt(self.embed.features).astype(jnp.float32)

    def _logits(self, x):
        return self.embed.attend(self.norm(x)).astype(jnp.float32)

    def __call__(self, tokens):
        """Logits ``(batch, T, vocab)`` of the full sequence (no cache)."""

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
        def run(x, block, window):
            return block(x, window)

        return self._logits(run(self._embed(tokens), self.blocks, self.config.windows()))

    def decode(self, tokens, cache, pos, *, pre_rope=False):
        """Logits of ``tokens`` at ``pos ..`` and the cache with their keys/values."""

        @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=nnx.Carry)
        def run(carry, block, layer, window):
            x, cache = carry
            return block.cached(x, cache, layer, pos, window, pre_rope=pre_rope)

        layers = jnp.arange(self.config.layers, dtype=jnp.int32)
        x, cache = run((self._embed(tokens), cache), self.blocks, layers, self.config.windows())
        return self._logits(x), cache

    def teacher_forced(self, tokens, **options):
        """Logits of every position as cached decoding computes them, all at once."""

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
        def run(x, block, window):
            return block.teacher_forced(x, window, **options)

        return self._logits(run(self._embed(tokens), self.blocks, self.config.windows()))


@functools.partial(jax.jit, static_argnames="graphdef")
def _full(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def forward(model: Decoder, tokens) -> jax.Array:
    """``model(tokens)`` jitted: the full-sequence logits ``(batch, T, vocab)``, no cache."""
    graphdef, state = nnx.split(model)
    return _full(graphdef, state, jnp.asarray(tokens))


def cache_for(model: Decoder, batch: int, *, fmt=None, residual=0, group_size=8,
              max_len=None) -> kvcache.KVCache:  # fmt: skip
    """An empty stacked cache (``layers`` blocks of ``kv_heads`` heads) for ``model``."""
    c = model.config
    return kvcache.init(batch, c.kv_heads, c.max_len if max_len is None else max_len,
                        c.head_dim, fmt=fmt, residual=residual, group_size=group_size,
                        layers=c.layers)  # fmt: skip


@functools.partial(jax.jit, static_argnames=("graphdef", "pre_rope"), donate_argnames="cache")
def _forward(graphdef, state, cache, tokens, pos, *, pre_rope):
    return nnx.merge(graphdef, state).decode(tokens, cache, pos, pre_rope=pre_rope)


def _run(model, cache, tokens, pos, pre_rope):
    if isinstance(pos, (int, np.integer)):  # a device array is not checked (no host sync)
        if pos < 0 or pos + tokens.shape[1] > cache.max_len:
            raise ValueError(f"positions pos={pos}..{pos + tokens.shape[1] - 1} do not fit a "
                             f"cache of max_len={cache.max_len}")  # fmt: skip
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, cache, tokens, jnp.asarray(pos, jnp.int32),
                    pre_rope=pre_rope)  # fmt: skip


def prefill(model: Decoder, cache, tokens, *, pos=0, pre_rope=False):
    """Runs ``tokens`` ``(batch, n)`` at ``pos ..`` (jitted, the cache donated).

    Every position's logits are those of decoding the chunk token by token.

    Returns:
        ``(logits, cache)``: float32 logits ``(batch, n, vocab)`` and the updated cache.

    Raises:
        ValueError: If a Python-int ``pos`` puts a position past ``max_len``. A device
            ``pos`` is not checked: overrunning positions are then dropped and counted in
            ``cache.overflow``, and their queries read the cache as ``max_len - 1`` does.
    """
    return _run(model, cache, jnp.asarray(tokens), pos, pre_rope)


def decode_step(model: Decoder, cache, token, pos, *, pre_rope=False):
    """Feeds one token per sequence ``(batch,)`` at ``pos``; next-token logits ``(batch,
    vocab)`` and the updated cache (jitted, the cache donated; overrun as :func:`prefill`)."""
    logits, cache = _run(model, cache, jnp.asarray(token)[:, None], pos, pre_rope)
    return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "options"))
def _generate(graphdef, state, prompt, *, steps, options):
    options = dict(options)
    pre_rope = options.pop("pre_rope")
    cache = cache_for(nnx.merge(graphdef, state), prompt.shape[0], **options)

    def forward(state, cache, tokens, pos):  # nnx merges the model in each trace it runs in
        return nnx.merge(graphdef, state).decode(tokens, cache, pos, pre_rope=pre_rope)

    logits, cache = forward(state, cache, prompt, 0)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(prompt.dtype)

    def step(carry, _):
        state, cache, tok, pos = carry
        logits, cache = forward(state, cache, tok[:, None], pos)
        nxt = jnp.argmax(logits[:, 0], axis=-1).astype(prompt.dtype)
        return (state, cache, nxt, pos + 1), nxt

    carry = (state, cache, first, jnp.int32(prompt.shape[1]))
    _, rest = jax.lax.scan(step, carry, None, length=steps - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(model: Decoder, prompt, steps: int, *, fmt=None, residual=0, group_size=8,
             pre_rope=False, max_len=None) -> jax.Array:  # fmt: skip
    """Greedy continuation ``(batch, steps)`` of ``prompt`` ``(batch, n)`` (one jitted call).

    Raises:
        ValueError: If ``n + steps - 1`` positions do not fit ``max_len``.
    """
    prompt = jnp.asarray(prompt)
    max_len = model.config.max_len if max_len is None else max_len
    if prompt.shape[1] + steps - 1 > max_len:
        raise ValueError(f"prompt of length {prompt.shape[1]} plus steps={steps} needs "
                         f"{prompt.shape[1] + steps - 1} positions, more than "
                         f"max_len={max_len}")  # fmt: skip
    options = (("fmt", fmt), ("residual", residual), ("group_size", group_size),
               ("max_len", max_len), ("pre_rope", pre_rope))  # fmt: skip
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt, steps=steps, options=options)


@functools.partial(jax.jit, static_argnames=("graphdef", "options"))
def _teacher_forced(graphdef, state, tokens, *, options):
    return nnx.merge(graphdef, state).teacher_forced(tokens, **dict(options))


def teacher_forced_logits(model: Decoder, tokens, *, fmt=None, residual=0, group_size=8,
                          pre_rope=False) -> jax.Array:  # fmt: skip
    """Logits ``(batch, T, vocab)`` of every position as cached decoding computes them."""
    options = (("fmt", fmt), ("residual", residual), ("group_size", group_size),
               ("pre_rope", pre_rope))  # fmt: skip
    graphdef, state = nnx.split(model)
    return _teacher_forced(graphdef, state, jnp.asarray(tokens), options=options)

