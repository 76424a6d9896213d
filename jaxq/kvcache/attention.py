"""Attention over a :class:`~jaxq.kvcache.KVCache`: grouped-query heads, a sliding window,
and keys cached before RoPE.

A query :math:`q_i` at position :math:`p_i` reads every key and value through the cache's
reading rule (:mod:`jaxq.kvcache.kivi`: float where the rule says so, dequantized
:math:`\\hat K_j, \\hat V_j` elsewhere) and attends, with float32 scores and softmax, to the
positions of its window:

.. math::

    o_i = \\sum_{j \\in A_i} \\mathrm{softmax}_{j \\in A_i}\\Big(
        \\frac{q_i \\cdot \\rho(\\hat K_j, j)}{\\sqrt{D}}\\Big)\\, \\hat V_j, \\qquad
    A_i = \\{\\, j : \\min(p_i, T - 1) - w < j \\le p_i \\,\\},

- **Grouped-query attention** (GQA): queries have :math:`H_q = n H_{kv}` heads, the cache
  :math:`H_{kv}`; query head :math:`h` reads key/value head :math:`\\lfloor h / n \\rfloor`
  (the pairing of ``jnp.repeat(k, n, axis=2)``). The :math:`n` query heads of each group
  are folded into the query axis, ``(b, m, H_q, D) -> (b, n m, H_kv, D)``, so the scores
  are one einsum against the cache's own heads; the cache is never repeated.
- **Sliding window** ``window`` = :math:`w` (default :math:`\\infty`): a query reads only the
  :math:`w` most recent positions :math:`p - w + 1 .. p`, the same set in :func:`attend`,
  :func:`update_attend` (prefill chunks) and :func:`teacher_forced_attention`. It may be a
  traced integer (a per-layer window under ``scan``); any :math:`w \\ge T` is global. It is
  a mask: the cache still stores, and attention still spans, all ``max_len`` positions. A
  value outside the window never affects the output; with a quantized cache a key outside
  it can, through its block's shared per-channel scale, while its block of ``G`` positions
  reaches into the window.
- **Keys cached before RoPE** (KVQuant, Hooper et al. 2024): with ``rope`` = :math:`\\rho`,
  a callable ``(k, positions) -> rotated k`` on ``(batch, n, heads, head_dim)`` keys and
  ``(n,)`` int32 positions, the cache stores (and quantizes) un-rotated keys and each key is
  rotated at its own position when read, :math:`\\rho(\\hat K_j, j)`. Without ``rope``, keys
  are used as stored: rotate them before writing for the usual post-RoPE cache. Queries are
  always passed rotated. Invariant: with a float cache, pre-RoPE storage gives the outputs of
  post-RoPE storage up to float rounding (the same rotation, at read instead of at write).
  Pre-RoPE keys keep an outlier channel large at every position, which per-channel scales
  fit; RoPE rotates it into its partner channel at a position-dependent angle, so post-RoPE
  both channels of the pair carry the outlier's magnitude within a block. With these
  symmetric absmax codes the gain is modest: on keys with injected outlier channels
  (``tests/kvcache/test_gemma_decode.py``) the keys read back are 5-10% closer to the float
  ones, while the attention output's error is on average within 5% of post-RoPE's, with
  no reliable direction (lower for constant-magnitude outliers, higher for zero-mean ones).
  Reading rotates all ``max_len`` keys, as it dequantizes them.

``rope`` is a static argument of the jitted functions: pass the same function object each
call (not a new lambda or ``partial``) to reuse compilations. Queries at positions
``>= max_len`` (under ``jit``; eagerly a ``ValueError``) read as a query at ``max_len - 1``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxq import kvcache
    >>> def rope(k, pos):  # rotate channel pairs (i, i + D/2) by pos * 10000^(-2i/D)
    ...     half = k.shape[-1] // 2
    ...     a = pos[:, None] * 1e4 ** (-jnp.arange(half) / half)
    ...     c, s = jnp.cos(a)[None, :, None], jnp.sin(a)[None, :, None]
    ...     return jnp.concatenate([k[..., :half] * c - k[..., half:] * s,
    ...                             k[..., half:] * c + k[..., :half] * s], -1)
    >>> q, k, v = (jax.random.normal(jax.random.key(i), (1, 6, h, 4))
    ...            for i, h in ((0, 4), (1, 2), (2, 2)))  # 4 query heads, 2 key/value heads
    >>> cache = kvcache.init(1, 2, 8, 4, fmt=None)
    >>> out, cache = kvcache.update_attend(cache, None, q, k, v, 0, window=3, rope=rope)
    >>> want = kvcache.teacher_forced_attention(q, rope(k, jnp.arange(6)), v, fmt=None,
    ...                                         window=3)  # post-RoPE keys
    >>> out.shape, bool(jnp.allclose(out, want, atol=1e-6))
    ((1, 6, 4, 4), True)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.kvcache import kivi
from jaxq.kvcache.cache import (
    KVCache,
    _check_layer,
    _check_pos,
    _check_tokens,
    _dequantized,
    _layer_index,
    _read_layer,
    _ring,
    _store,
    _update_layer,
    _view,
)

__all__ = [
    "attend",
    "update_attend",
    "teacher_forced_attention",
    "softmax_probs",
    "mixed_attention",
]

_INT32_MAX = int(np.iinfo(np.int32).max)


def _check_heads(q_shape, kv_shape, what: str) -> None:
    hq, hkv = q_shape[2], kv_shape[2]
    if hq % hkv:
        raise ValueError(
            f"grouped-query attention needs the query heads to be a multiple of the key/value "
            f"heads: q has shape {tuple(q_shape)} ({hq} heads), {what} "
            f"{tuple(kv_shape)} ({hkv} heads)"
        )


def _check_queries(c: KVCache, q, n: int | None = None) -> jax.Array:
    q = jnp.asarray(q)
    if q.ndim == 3:
        q = q[:, None]
    b, h, d = c.k_codes.shape[-4], c.k_codes.shape[-2], c.head_dim
    if (q.ndim != 4 or q.shape[0] != b or q.shape[3] != d
            or (n is not None and q.shape[1] != n)):  # fmt: skip
        raise ValueError(
            f"q must have shape (batch, n, query_heads, head_dim) = ({b}, "
            f"{'n' if n is None else n}, H_q, {d}) or (batch, query_heads, head_dim), "
            f"H_q a multiple of the cache's {h} heads; got {tuple(jnp.shape(q))}"
        )
    what = "the cache's keys/values (batch, max_len, heads, head_dim) have shape"
    _check_heads(q.shape, (b, c.max_len, h, d), what)
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"q must be a float array, got dtype {q.dtype}")
    return q


def _check_window(window) -> jax.Array | None:
    """None, or the window as an int32 scalar (concrete ones must be >= 1)."""
    if window is None:
        return None
    if jnp.ndim(window) != 0 or not jnp.issubdtype(jnp.result_type(window), jnp.integer):
        raise TypeError(f"window must be None or an integer scalar, got {window!r}")
    if not isinstance(window, jax.core.Tracer):
        w = int(window)
        if w < 1:
            raise ValueError(f"window must be >= 1 (positions a query reads), got {w}")
        window = min(w, _INT32_MAX)
    return jnp.asarray(window, jnp.int32)


def _check_rope(rope):
    if rope is not None and not callable(rope):
        raise TypeError(f"rope must be None or a callable (k, positions) -> k, got {rope!r}")
    return rope


def _rotate(rope, k: jax.Array) -> jax.Array:
    """``rope(k, 0 .. T-1)`` in ``k``'s dtype (``k`` as is without ``rope``)."""
    if rope is None:
        return k
    out = rope(k, jnp.arange(k.shape[1], dtype=jnp.int32))
    if jnp.shape(out) != k.shape:
        raise ValueError(f"rope must return keys of shape {k.shape}, got {jnp.shape(out)}")
    return out.astype(k.dtype)


def _fold(q: jax.Array, kv_heads: int) -> jax.Array:
    """``(b, n, H_q, D)`` queries as ``(b, g n, H_kv, D)``, ``g = H_q / H_kv``: query ``i`` of
    head ``h g + r`` becomes row ``r n + i`` of head ``h`` (a no-op for ``g = 1``)."""
    b, n, hq, d = q.shape
    g = hq // kv_heads
    return q.reshape(b, n, kv_heads, g, d).transpose(0, 3, 1, 2, 4).reshape(b, g * n, kv_heads, d)


def _unfold(out: jax.Array, hq: int) -> jax.Array:
    """The inverse of :func:`_fold`: ``(b, g n, H_kv, D)`` back to ``(b, n, H_q, D)``."""
    b, gn, h, d = out.shape
    g = hq // h
    out = out.reshape(b, g, gn // g, h, d).transpose(0, 2, 3, 1, 4)
    return out.reshape(b, gn // g, hq, d)


def _mask(q_pos: jax.Array, t: int, window) -> jax.Array:
    """``(n, T)``: query ``i`` reads key ``j`` (causal, and inside the window)."""
    j = jnp.arange(t, dtype=jnp.int32)[None, :]
    q_pos = jnp.asarray(q_pos, jnp.int32)[:, None]
    mask = j <= q_pos
    if window is not None:
        mask = mask & (j > jnp.minimum(q_pos, t - 1) - window)
    return mask


def softmax_probs(q, k, q_pos, scores=None, *, window=None) -> jax.Array:
    """float32 causal softmax: query ``i`` (position ``q_pos[i]``) over the keys ``j`` of its
    window (see the module notes); ``q`` ``(batch, n, heads, D)`` has ``k``'s heads (fold
    grouped queries first); returns ``(batch, heads, n, T)``."""
    if scores is None:
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores.astype(jnp.float32) / math.sqrt(q.shape[-1])
    scores = jnp.where(_mask(q_pos, k.shape[1], window), scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def _plain_attention(q, k, v, q_pos, window) -> jax.Array:
    """Grouped-query softmax attention of rotated ``q`` over ``k, v`` (no quantization)."""
    g = q.shape[2] // k.shape[2]
    probs = softmax_probs(_fold(q, k.shape[2]), k, jnp.tile(q_pos, g), window=window)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    return _unfold(out, q.shape[2]).astype(q.dtype)


def mixed_attention(q, kf, vf, kq, vq, q_pos, state, residual: int, group_size: int,
                    window=None):  # fmt: skip
    """Attention where query ``i`` reads each key/value in float or dequantized by
    :func:`jaxq.kvcache.kivi.read_masks` at its own cache state ``state[i]`` (two score
    matrices and a choice per pair). ``kf``/``vf`` must hold the float keys/values wherever
    they are read, keys rotated; ``q`` ``(batch, n, H_q, D)`` with ``H_q`` a multiple of
    their heads. Returns ``(batch, n, H_q, D)`` in ``q``'s dtype."""
    hq, g = q.shape[2], q.shape[2] // kf.shape[2]
    q, q_pos, state = _fold(q, kf.shape[2]), jnp.tile(q_pos, g), jnp.tile(state, g)
    j = jnp.arange(kf.shape[1])[None, :]
    float_key, float_value = kivi.read_masks(j, state[:, None], residual, group_size)
    s_float = jnp.einsum("bqhd,bkhd->bhqk", q, kf, preferred_element_type=jnp.float32)
    s_quant = jnp.einsum("bqhd,bkhd->bhqk", q, kq, preferred_element_type=jnp.float32)
    probs = softmax_probs(q, kf, q_pos, jnp.where(float_key, s_float, s_quant), window=window)
    probs = probs.astype(vf.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", jnp.where(float_value, probs, 0), vf)
    out = out + jnp.einsum("bhqk,bkhd->bqhd", jnp.where(float_value, 0, probs), vq)
    return _unfold(out, hq).astype(q.dtype)


def attend(cache: KVCache, layer, q, pos, *, window=None, rope=None) -> jax.Array:
    """Causal softmax attention of queries at ``pos .. pos + n - 1`` over the cache as it is.

    Every query reads the cache in its current state (holding positions up to
    ``pos + n - 1``, written by :func:`jaxq.kvcache.update`), query ``i`` attending to
    positions ``pos + i - window < j <= pos + i``: ``softmax(q k^T / sqrt(D)) v`` with scores
    and softmax in float32, as in :class:`jaxq.models.CausalSelfAttention`. For one token
    this is exactly what decoding reads; for a chunk, :func:`update_attend` instead gives
    every query the state it would have had when decoding token by token.

    Args:
        cache: A :class:`~jaxq.kvcache.KVCache`.
        layer: Layer index for a stacked cache, None otherwise.
        q: Queries ``(batch, n, H_q, head_dim)`` or ``(batch, H_q, head_dim)``, already
            rotated; ``H_q`` a multiple of the cache's heads (grouped-query attention).
        pos: Integer scalar (may be traced), the position of the first query.
        window: None (every earlier position) or an integer scalar ``>= 1`` (may be traced).
        rope: None, or ``(k, positions) -> k`` when the cache holds keys before RoPE.

    Returns:
        ``(batch, n, H_q, head_dim)`` in ``q``'s dtype.

    Raises:
        ValueError: If ``q``'s shape does not match (or its heads are not a multiple of the
            cache's), a concrete ``pos`` overruns or a concrete ``window < 1``.
    """
    _check_layer(cache, layer)
    q = _check_queries(cache, q)
    pos = _check_pos(cache, pos, q.shape[1])
    return _attend_jit(cache, _layer_index(layer, cache), q, pos, _check_window(window),
                       rope=_check_rope(rope))  # fmt: skip


@functools.partial(jax.jit, static_argnames=("rope",))
def _attend_jit(cache, layer, q, pos, window, *, rope):
    k, v = _read_layer(_view(cache, layer), pos + q.shape[1] - 1)
    return _plain_attention(q, _rotate(rope, k), v, pos + jnp.arange(q.shape[1]), window)


def update_attend(
    cache: KVCache, layer, q, k, v, pos, *, window=None, rope=None
) -> tuple[jax.Array, KVCache]:
    """:func:`jaxq.kvcache.update` with ``k, v``, then attention of ``q``, token-by-token
    exact.

    Query ``i`` (at position ``pos + i``) reads every key and value exactly as it would when
    the chunk is fed one token at a time (the reading rule of :mod:`jaxq.kvcache.kivi` at
    state ``pos + i``) and attends to positions ``pos + i - window < j <= pos + i``, so a
    prefilled prompt gives the same outputs as decoding it token by token and as
    :func:`teacher_forced_attention`.

    Args:
        cache: A :class:`~jaxq.kvcache.KVCache` holding positions ``0 .. pos - 1``.
        layer: Layer index for a stacked cache, None otherwise.
        q: Queries ``(batch, n, H_q, head_dim)`` (or ``(batch, H_q, head_dim)``), already
            rotated; ``H_q`` a multiple of the cache's heads.
        k: Keys ``(batch, n, heads, head_dim)``: before RoPE when ``rope`` is given, else as
            attention uses them; ``v`` the same shape.
        pos: Integer scalar (may be traced), the position of the first token.
        window: None (every earlier position) or an integer scalar ``>= 1`` (may be traced).
        rope: None, or ``(k, positions) -> k``: the cache holds keys before RoPE and rotates
            them when read.

    Returns:
        ``(out, cache)``: attention output ``(batch, n, H_q, head_dim)`` in ``q``'s dtype
        and the updated cache.

    Raises:
        ValueError, TypeError: As :func:`jaxq.kvcache.update` and :func:`attend`.
    """
    _check_layer(cache, layer)
    k, v = _check_tokens(cache, k, "k"), _check_tokens(cache, v, "v")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    q = _check_queries(cache, q, k.shape[1])
    pos = _check_pos(cache, pos, q.shape[1])
    return _update_attend_jit(cache, _layer_index(layer, cache), q, k, v, pos,
                              _check_window(window), rope=_check_rope(rope))  # fmt: skip


@functools.partial(jax.jit, static_argnames=("rope",))
def _update_attend_jit(cache, layer, q, k, v, pos, window, *, rope):
    old = _view(cache, layer)
    new = _update_layer(old, k, v, pos)
    n, t = q.shape[1], new.max_len
    q_pos = pos + jnp.arange(n, dtype=jnp.int32)
    if new.format is None:
        out = _plain_attention(q, _rotate(rope, new.k_codes), new.v_codes, q_pos, window)
        return out, _store(cache, layer, new)
    # Float sources: the chunk itself, and the rings as they were before it (they hold the
    # earlier positions any query of the chunk reads in float).
    j = jnp.arange(t, dtype=jnp.int32)
    in_chunk = ((j >= pos) & (j < pos + n))[None, :, None, None]
    chunk = jnp.clip(j - pos, 0, n - 1)
    sources = []
    for name, x in (("k_window", k), ("v_window", v)):
        ring = _ring(old, name, j)
        x = x[:, chunk].astype(jnp.float32)
        sources.append(x if ring is None else jnp.where(in_chunk, x, ring))
    kq, vq = _dequantized(new)
    kf, vf, kq, vq = (x.astype(new.dtype) for x in (*sources, kq, vq))
    out = mixed_attention(q, _rotate(rope, kf), vf, _rotate(rope, kq), vq, q_pos,
                          jnp.minimum(q_pos, t - 1), new.residual, new.group_size, window)
    return out, _store(cache, layer, new)


def teacher_forced_attention(
    q, k, v, *, fmt="int8", residual: int = 0, group_size: int = 32, window=None, rope=None
) -> jax.Array:
    """Causal attention in which every position reads keys/values through the cache.

    Position :math:`t` sees exactly what decoding token by token with a cache
    ``init(..., fmt=fmt, residual=residual, group_size=group_size)`` and
    :func:`update_attend` (same ``window`` and ``rope``) gives it (float keys and values
    where the reading rule says so, dequantized ones elsewhere), for all positions at once.
    With ``fmt=None`` this is plain causal softmax attention.

    Args:
        q: Queries ``(batch, T, H_q, head_dim)``, already rotated.
        k: Keys ``(batch, T, H_kv, head_dim)``, ``H_q`` a multiple of ``H_kv``; before RoPE
            when ``rope`` is given. ``v`` the same shape.
        fmt: Cache format, or None.
        residual: Float window ``R`` (non-negative int).
        group_size: Key block ``G`` (positive int).
        window: None or an integer scalar ``>= 1`` (may be traced): the positions read.
        rope: None, or ``(k, positions) -> k``: keys are quantized before it, rotated after.

    Returns:
        ``(batch, T, H_q, head_dim)`` in ``q``'s dtype.

    Raises:
        ValueError: If the shapes do not fit or an option is invalid.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if (q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or q.shape[:2] != k.shape[:2]
            or q.shape[3] != k.shape[3]):  # fmt: skip
        raise ValueError(f"q must have shape (batch, T, H_q, head_dim) and k, v (batch, T, "
                         f"H_kv, head_dim), got {q.shape}, {k.shape}, {v.shape}")  # fmt: skip
    _check_heads(q.shape, k.shape, "k has shape")
    for name, value, low in (("residual", residual, 0), ("group_size", group_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return _teacher_forced(q, k, v, _check_window(window), kivi.resolve_format(fmt), residual,
                           group_size, _check_rope(rope))  # fmt: skip


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7))
def _teacher_forced(q, k, v, window, fmt, residual, g, rope):
    b, t, h, d = k.shape
    pos = jnp.arange(t)
    if fmt is None:
        return _plain_attention(q, _rotate(rope, k), v, pos, window)
    nb = -(-t // g)
    kp = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, nb * g - t), (0, 0), (0, 0)))
    codes, scales = kivi.quantize_groups(kp.reshape(b, nb, g, h, d), fmt, axis=2)
    kq = kivi.dequantize_codes(codes, fmt, d) * scales[:, :, None]
    kq = kq.reshape(b, nb * g, h, d)[:, :t].astype(k.dtype)
    codes, scales = kivi.quantize_groups(v, fmt, axis=-1)
    vq = (kivi.dequantize_codes(codes, fmt, d) * scales[..., None]).astype(v.dtype)
    return mixed_attention(q, _rotate(rope, k), v, _rotate(rope, kq), vq, pos, pos, residual,
                           g, window)
