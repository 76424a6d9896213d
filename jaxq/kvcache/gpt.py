"""Cached autoregressive decoding of :class:`jaxq.models.GPT` through a quantized KV cache.

The forward is the model's own (:meth:`jaxq.models.GPT.__call__`), position by position:

.. math::

    h_0 = E[x_t] + P[t], \\quad
    h' = h + \\mathrm{Attn}_{\\le t}(\\mathrm{LN}_1 h), \\quad
    h'' = h' + \\mathrm{MLP}(\\mathrm{LN}_2 h'), \\quad
    \\mathrm{logits}_t = \\mathrm{LN}_f(h_L) W_{out},

except that attention writes the new key/value to a :class:`~jaxq.kvcache.KVCache` and
reads all keys/values :math:`\\le t` back from it (a prefilled prompt reads exactly what
feeding it token by token would). With a float cache (``fmt=None``) the logits equal
``model(tokens)`` to float32 rounding; with a quantized cache they are what a
quantized-cache server would produce. :func:`teacher_forced_loss` computes, for every
position of a sequence at once, the cross-entropy of exactly those cached-decoding logits.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxq import kvcache
    >>> from jaxq.models import GPT, GPTConfig
    >>> model = GPT(GPTConfig(d_model=32, n_heads=2, n_layers=1, seq_len=16),
    ...             rngs=nnx.Rngs(0))
    >>> cache = kvcache.cache_for(model, 1, fmt="int8", group_size=4)
    >>> logits, cache = kvcache.prefill(model, cache, jnp.array([[1, 2, 3]]))
    >>> logits, cache = kvcache.decode_step(model, cache, jnp.array([4]), 3)
    >>> logits.shape
    (1, 256)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxq.kvcache.attention import teacher_forced_attention, update_attend
from jaxq.kvcache.cache import KVCache, init
from jaxq.models.gpt import GPT
from jaxq.models.train import cross_entropy

__all__ = [
    "cache_for",
    "prefill",
    "decode_step",
    "generate",
    "teacher_forced_logits",
    "teacher_forced_loss",
]


def _check_model(model) -> None:
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a jaxq.models.GPT, got {type(model).__name__}")


def _check_tokens(model: GPT, tokens, name: str, ndim: int) -> jax.Array:
    tokens = jnp.asarray(tokens)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"{name} must be integer token ids, got dtype {tokens.dtype}")
    if tokens.ndim != ndim:
        want = "(batch,)" if ndim == 1 else "(batch, n)"
        raise ValueError(f"{name} must have shape {want}, got {tokens.shape}")
    return tokens


def cache_for(
    model: GPT, batch: int, *, fmt="int8", residual: int = 0, group_size: int = 32,
    max_len: int | None = None,
) -> KVCache:
    """An empty stacked cache (one layer per block) shaped for ``model``.

    Args:
        model: A :class:`jaxq.models.GPT`.
        batch: Sequences decoded together.
        fmt: Cache format (``"int8"``, ``"int4"``, ``"e4m3"``, ``"e5m2"``, None = float).
        residual: Float window of most recent tokens.
        group_size: Positions per key-scale block.
        max_len: Positions held; default ``config.seq_len`` (the most the model embeds).

    Returns:
        A :class:`~jaxq.kvcache.KVCache` with ``layers = config.n_layers``.

    Raises:
        ValueError: If ``max_len`` exceeds ``config.seq_len`` (or see :func:`init`).
    """
    _check_model(model)
    c = model.config
    max_len = c.seq_len if max_len is None else max_len
    if isinstance(max_len, int) and max_len > c.seq_len:
        raise ValueError(f"max_len={max_len} exceeds the model's seq_len={c.seq_len}")
    return init(batch, c.n_heads, max_len, c.head_dim, fmt=fmt, residual=residual,
                group_size=group_size, layers=c.n_layers,
                dtype=c.dtype if c.dtype is not None else c.param_dtype)  # fmt: skip


def _forward(model: GPT, tokens: jax.Array, pos, attention) -> jax.Array:
    """The model's forward with ``attention(layer, q, k, v)`` replacing the attention core."""
    b, n = tokens.shape
    x = model.embed(tokens) + model.pos_embed(pos + jnp.arange(n))[None]
    for i, block in enumerate(model.blocks):
        attn = block.attn
        qkv = attn.qkv(block.ln1(x)).reshape(b, n, 3, attn.n_heads, attn.head_dim)
        y = attention(i, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        x = x + attn.out(y.reshape(b, n, -1))
        x = x + block.mlp(block.ln2(x))
    return model.logits(x)


def _check_cache(model: GPT, cache: KVCache, n: int, pos) -> None:
    c = model.config
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    if cache.layers != c.n_layers or cache.head_dim != c.head_dim:
        raise ValueError(
            f"cache has layers={cache.layers}, head_dim={cache.head_dim}; the model needs "
            f"layers={c.n_layers}, head_dim={c.head_dim} (use cache_for(model, ...))"
        )
    if jnp.ndim(pos) != 0 or not jnp.issubdtype(jnp.result_type(pos), jnp.integer):
        raise TypeError(f"pos must be an integer scalar, got {pos!r}")
    if not isinstance(pos, jax.core.Tracer):
        p = int(pos)
        if p < 0 or p + n > min(cache.max_len, c.seq_len):
            raise ValueError(f"positions pos={p}..{p + n - 1} do not fit the cache's "
                             f"max_len={cache.max_len} and the model's seq_len={c.seq_len}")


def _cached_forward(model: GPT, cache: KVCache, tokens: jax.Array, pos):
    state = {"cache": cache}

    def attention(i, q, k, v):
        out, state["cache"] = update_attend(state["cache"], i, q, k, v, pos)
        return out

    logits = _forward(model, tokens, pos, attention)
    return logits, state["cache"]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _cached_forward_jit(graphdef, params, cache, tokens, pos):
    return _cached_forward(nnx.merge(graphdef, params), cache, tokens, pos)


def _run(model: GPT, cache: KVCache, tokens: jax.Array, pos):
    _check_cache(model, cache, tokens.shape[1], pos)
    graphdef, params = nnx.split(model)
    return _cached_forward_jit(graphdef, params, cache, tokens, jnp.asarray(pos, jnp.int32))


def prefill(model: GPT, cache: KVCache, tokens, *, pos=0) -> tuple[jax.Array, KVCache]:
    """Runs a prompt chunk through the model, writing its keys/values to the cache (jitted).

    Every position's logits are those of decoding the chunk token by token (see
    :func:`jaxq.kvcache.update_attend`).

    Args:
        model: A :class:`jaxq.models.GPT`.
        cache: From :func:`cache_for`.
        tokens: Integer ids ``(batch, n)`` at positions ``pos .. pos + n - 1``.
        pos: Position of the first token (0 for a fresh prompt; may be traced).

    Returns:
        ``(logits, cache)``: float32 logits ``(batch, n, vocab)`` and the updated cache.

    Raises:
        TypeError: If ``tokens`` is not integer or ``model`` not a GPT.
        ValueError: On shape mismatches or positions past ``max_len``/``seq_len``.
    """
    _check_model(model)
    return _run(model, cache, _check_tokens(model, tokens, "tokens", 2), pos)


def decode_step(model: GPT, cache: KVCache, token, pos) -> tuple[jax.Array, KVCache]:
    """Feeds one token per sequence at position ``pos``; returns next-token logits (jitted).

    Wrap it in ``jax.jit(..., donate_argnums=...)`` (or ``nnx.jit``) to update the cache in
    place.

    Args:
        model: A :class:`jaxq.models.GPT`.
        cache: A cache holding positions ``0 .. pos - 1``.
        token: Integer ids ``(batch,)``.
        pos: Integer scalar (may be traced).

    Returns:
        ``(logits, cache)``: float32 logits ``(batch, vocab)`` and the updated cache.

    Raises:
        TypeError: If ``token`` is not integer or ``model`` not a GPT.
        ValueError: On shape mismatches or a concrete ``pos`` past ``max_len``/``seq_len``.
    """
    _check_model(model)
    token = _check_tokens(model, token, "token", 1)
    logits, cache = _run(model, cache, token[:, None], pos)
    return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "greedy", "options"))
def _generate(graphdef, params, prompt, key, temperature, *, steps, greedy, options):
    model = nnx.merge(graphdef, params)
    b, n = prompt.shape
    cache = cache_for(model, b, max_len=n + steps - 1, **dict(options))

    def pick(logits, k):
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(prompt.dtype)
        return jax.random.categorical(k, logits / temperature, axis=-1).astype(prompt.dtype)

    keys = jax.random.split(key, steps)
    logits, cache = _cached_forward(model, cache, prompt, 0)
    first = pick(logits[:, -1], keys[0])

    def body(carry, k):
        cache, tok, pos = carry
        logits, cache = _cached_forward(model, cache, tok[:, None], pos)
        nxt = pick(logits[:, 0], k)
        return (cache, nxt, pos + 1), nxt

    _, rest = jax.lax.scan(body, (cache, first, jnp.int32(n)), keys[1:])
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(
    model: GPT, prompt, steps: int, *, fmt="int8", residual: int = 0, group_size: int = 32,
    greedy: bool = True, key=None, temperature: float = 1.0,
) -> jax.Array:
    """Generates ``steps`` tokens after ``prompt`` with a quantized KV cache (jitted).

    Prefills the prompt in one chunk, then decodes token by token in a ``lax.scan``.

    Args:
        model: A :class:`jaxq.models.GPT`.
        prompt: Integer ids ``(batch, n)`` or ``(n,)``; ``n + steps - 1 <= seq_len``.
        steps: Tokens to generate (positive).
        fmt: Cache format, None for a float cache.
        residual: Float window of most recent tokens.
        group_size: Positions per key-scale block.
        greedy: Take the argmax; otherwise sample from ``softmax(logits / temperature)``.
        key: PRNG key, required when ``greedy`` is False.
        temperature: Sampling temperature.

    Returns:
        The generated ids, ``(batch, steps)`` (or ``(steps,)`` for a 1-D prompt).

    Raises:
        ValueError: If the sequence would exceed ``seq_len``, ``steps < 1``, or sampling is
            requested without a key.
    """
    _check_model(model)
    prompt = jnp.asarray(prompt)
    if prompt.ndim == 1:
        return generate(model, prompt[None], steps, fmt=fmt, residual=residual,
                        group_size=group_size, greedy=greedy, key=key,
                        temperature=temperature)[0]  # fmt: skip
    prompt = _check_tokens(model, prompt, "prompt", 2)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if prompt.shape[1] + steps - 1 > model.config.seq_len:
        raise ValueError(f"prompt of length {prompt.shape[1]} plus steps={steps} needs "
                         f"{prompt.shape[1] + steps - 1} positions, more than "
                         f"seq_len={model.config.seq_len}")  # fmt: skip
    if not greedy and key is None:
        raise ValueError("sampling (greedy=False) needs a PRNG key")
    key = jax.random.key(0) if key is None else key
    graphdef, params = nnx.split(model)
    options = (("fmt", fmt), ("residual", residual), ("group_size", group_size))
    return _generate(graphdef, params, prompt, key, jnp.float32(temperature), steps=steps,
                     greedy=bool(greedy), options=options)  # fmt: skip


@functools.partial(jax.jit, static_argnames=("graphdef", "fmt", "residual", "group_size"))
def _teacher_forced(graphdef, params, tokens, *, fmt, residual, group_size):
    model = nnx.merge(graphdef, params)

    def attention(i, q, k, v):
        return teacher_forced_attention(q, k, v, fmt=fmt, residual=residual,
                                        group_size=group_size)  # fmt: skip

    return _forward(model, tokens, 0, attention)


def teacher_forced_logits(
    model: GPT, tokens, *, fmt="int8", residual: int = 0, group_size: int = 32
) -> jax.Array:
    """Logits of every position as cached decoding computes them, all at once (jitted).

    Position ``t`` attends to keys/values ``<= t`` read through a cache
    ``cache_for(model, ..., fmt=fmt, residual=residual, group_size=group_size)`` that holds
    positions ``0..t`` (see :func:`jaxq.kvcache.teacher_forced_attention`). Equal, up to
    float32 summation order, to :func:`prefill` of any prompt followed by
    :func:`decode_step` for the remaining tokens; with ``fmt=None`` equal to
    ``model(tokens)``.

    Args:
        model: A :class:`jaxq.models.GPT`.
        tokens: Integer ids ``(batch, T)``, ``T <= seq_len``.
        fmt: Cache format, None for float.
        residual: Float window of most recent tokens.
        group_size: Positions per key-scale block.

    Returns:
        float32 logits ``(batch, T, vocab)``.

    Raises:
        ValueError: If ``tokens`` is not 2-D or longer than ``seq_len``.
    """
    _check_model(model)
    tokens = _check_tokens(model, tokens, "tokens", 2)
    if tokens.shape[1] > model.config.seq_len:
        raise ValueError(f"tokens has length {tokens.shape[1]}, more than "
                         f"seq_len={model.config.seq_len}")  # fmt: skip
    graphdef, params = nnx.split(model)
    return _teacher_forced(graphdef, params, tokens, fmt=fmt, residual=residual,
                           group_size=group_size)  # fmt: skip


def teacher_forced_loss(
    model: GPT, tokens, *, fmt="int8", residual: int = 0, group_size: int = 32
) -> jax.Array:
    """Mean next-token cross-entropy (nats) with attention read through the cache.

    ``tokens[:, :-1]`` are fed (see :func:`teacher_forced_logits`) and ``tokens[:, 1:]``
    are the targets, as in :func:`jaxq.models.train.evaluate` windows of ``seq_len + 1``.

    Args:
        model: A :class:`jaxq.models.GPT`.
        tokens: Integer ids ``(batch, T + 1)``, ``T <= seq_len``.
        fmt: Cache format, None for float.
        residual: Float window of most recent tokens.
        group_size: Positions per key-scale block.

    Returns:
        float32 scalar.

    Raises:
        ValueError: If ``tokens`` is not 2-D with at least 2 and at most ``seq_len + 1``
            positions.
    """
    _check_model(model)
    tokens = _check_tokens(model, tokens, "tokens", 2)
    if tokens.shape[1] < 2:
        raise ValueError(f"tokens needs at least 2 positions, got shape {tokens.shape}")
    logits = teacher_forced_logits(model, tokens[:, :-1], fmt=fmt, residual=residual,
                                   group_size=group_size)  # fmt: skip
    return cross_entropy(logits, tokens[:, 1:])
