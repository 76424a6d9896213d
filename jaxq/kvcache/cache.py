"""A quantized key/value cache for autoregressive decoding (KIVI / KVQuant style).

Keys are stored with one scale per head-dim channel and per *block* of ``G`` consecutive
positions (``group_size``), values with one scale per position and head; the most recent
``R`` tokens (``residual``) are also kept in float. :mod:`jaxq.kvcache.kivi` gives the
formulas and the reading rule: which keys/values a query at position :math:`p` reads in
float and which dequantized, :math:`\\hat K_j = c^K_j s^K_{\\lfloor j/G \\rfloor}`,
:math:`\\hat V_j = c^V_j s^V_j`.

A block of keys is quantized once, when its last position is written, with the per-channel
maximum of its ``G`` keys; from then on its scale and codes are fixed (a running scale over a
partial block would have to re-round earlier codes). So the stored cache never depends on
whether tokens were written one at a time or in chunks, and with
:func:`jaxq.kvcache.update_attend` (what :mod:`jaxq.kvcache.gpt` uses) neither does any
attention output: a prefilled prompt, token by token decoding and
:func:`jaxq.kvcache.teacher_forced_attention` agree. The attention that reads the cache
(grouped-query heads, sliding window, keys cached before RoPE) is in
:mod:`jaxq.kvcache.attention`. The float keys of the
incomplete block and of the residual window live in a ring buffer of
:math:`W_K = \\max(R, G - 1)` positions, the residual values in one of :math:`R` positions.
Positions must be written in order (``update`` at ``pos`` after ``0 .. pos - 1``).

Layout: every array has the axes ``(layer, batch, time, head, head_dim)`` (the layer axis
only for a stacked cache, ``init(..., layers=L)``), codes packed along ``head_dim`` for 4-bit
formats; batch (axis 1) and heads (axis 3) can be sharded (:func:`shardings`).

Overrun: positions ``>= max_len`` are dropped (never written, never wrapped) and counted per
layer in ``cache.overflow``; queries past ``max_len`` read the cache as a query at
``max_len - 1`` does. When ``pos`` is a concrete number (outside ``jax.jit``), :func:`update`
and :func:`jaxq.kvcache.attend` raise a ``ValueError`` naming ``max_len`` and ``pos`` instead.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxq import kvcache
    >>> cache = kvcache.init(1, 2, 8, 4, fmt="int4", residual=2, group_size=4)
    >>> k = v = jax.random.normal(jax.random.key(0), (1, 3, 2, 4))
    >>> cache = kvcache.update(cache, None, k, v, 0)
    >>> kvcache.attend(cache, None, k[:, -1:], 2).shape
    (1, 1, 2, 4)
    >>> cache.k_codes.shape, cache.k_codes.dtype  # two 4-bit codes per byte
    ((1, 8, 2, 2), dtype('uint8'))
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxq.kvcache import kivi

__all__ = [
    "KVCache",
    "init",
    "update",
    "read",
    "nbytes_per_token",
    "shardings",
]

_ARRAYS = ("k_codes", "k_scales", "v_codes", "v_scales", "k_window", "v_window", "overflow")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=list(_ARRAYS),
    meta_fields=["fmt", "max_len", "head_dim", "residual", "group_size", "dtype"],
)
@dataclasses.dataclass(frozen=True, kw_only=True)
class KVCache:
    """Keys and values of past positions, quantized; a pytree (create with :func:`init`).

    Attributes:
        k_codes: Key codes ``([L,] B, T, H, D')`` (``D' = ceil(D/2)`` bytes for 4-bit
            formats); the float keys themselves for a float cache.
        k_scales: float32 per-channel key scales ``([L,] B, ceil(T/G), H, D)``, or None.
        v_codes: Value codes ``([L,] B, T, H, D')``, or the float values.
        v_scales: float32 per-token value scales ``([L,] B, T, H)``, or None.
        k_window: Float ring buffer of recent keys ``([L,] B, W_K, H, D)``, or None.
        v_window: Float ring buffer of recent values ``([L,] B, R, H, D)``, or None.
        overflow: int32 ``([L],)``: positions dropped because they were ``>= max_len``.
        fmt: Format name (``"int8"``, ``"int4"``, ``"float8_e4m3fn"``, ``"float8_e5m2"``)
            or None for a float cache (static).
        max_len: Number of positions ``T`` (static).
        head_dim: ``D`` (static).
        residual: ``R``, the float window of most recent tokens (static).
        group_size: ``G``, positions per key-scale block (static).
        dtype: Name of the float dtype of windows, float caches and read results (static).
    """

    k_codes: jax.Array
    k_scales: jax.Array | None
    v_codes: jax.Array
    v_scales: jax.Array | None
    k_window: jax.Array | None
    v_window: jax.Array | None
    overflow: jax.Array
    fmt: str | None
    max_len: int
    head_dim: int
    residual: int
    group_size: int
    dtype: str

    @property
    def format(self):
        """The jaxq element format, or None for a float cache."""
        return kivi.resolve_format(self.fmt)

    @property
    def layers(self) -> int | None:
        """Size of the leading layer axis, or None for a single-layer cache."""
        return self.overflow.shape[0] if self.overflow.ndim == 1 else None


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def init(
    batch: int, heads: int, max_len: int, head_dim: int, *, fmt="int8", residual: int = 0,
    group_size: int = 32, layers: int | None = None, dtype=jnp.float32,
) -> KVCache:
    """An empty cache for ``max_len`` positions.

    Args:
        batch: Sequences decoded together.
        heads: Attention heads.
        max_len: Positions the cache holds (fixed; see the module notes on overrun).
        head_dim: Dimensions per head.
        fmt: ``"int8"``, ``"int4"``, ``"e4m3"``, ``"e5m2"`` or None (float cache).
        residual: The ``R`` most recent tokens are also kept (and read) in float.
        group_size: Positions per key-scale block ``G`` (KIVI uses 32 to 128).
        layers: With an int ``L``, every array gets a leading layer axis of size ``L``.
        dtype: Float dtype of windows, of a float cache and of what is read.

    Returns:
        A :class:`KVCache` of zeros (scales of one), ``overflow`` zero.

    Raises:
        TypeError: If a size is not an int or ``dtype`` is not a float dtype.
        ValueError: If a size is out of range or ``fmt`` is not supported.
    """
    for name, value, low in (("batch", batch, 1), ("heads", heads, 1), ("max_len", max_len, 1),
                             ("head_dim", head_dim, 1), ("residual", residual, 0),
                             ("group_size", group_size, 1)):  # fmt: skip
        _check_int(name, value, low)
    lead = () if layers is None else (_check_int("layers", layers, 1),)
    dt = np.dtype(dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"dtype must be a float dtype, got {dt}")
    f = kivi.resolve_format(fmt)
    shape = (*lead, batch, max_len, heads, head_dim)
    meta = dict(fmt=None if f is None else f.name, max_len=max_len, head_dim=head_dim,
                residual=residual, group_size=group_size, dtype=dt.name)  # fmt: skip
    overflow = jnp.zeros(lead, jnp.int32)
    if f is None:
        return KVCache(k_codes=jnp.zeros(shape, dt), k_scales=None, v_scales=None,
                       v_codes=jnp.zeros(shape, dt), k_window=None, v_window=None,
                       overflow=overflow, **meta)  # fmt: skip
    n_blocks = -(-max_len // group_size)
    wk = max(residual, group_size - 1)

    def window(w):
        return jnp.zeros((*lead, batch, w, heads, head_dim), dt) if w else None

    return KVCache(
        k_codes=kivi.empty_codes(shape, f),
        k_scales=jnp.ones((*lead, batch, n_blocks, heads, head_dim), jnp.float32),
        v_codes=kivi.empty_codes(shape, f),
        v_scales=jnp.ones((*lead, batch, max_len, heads), jnp.float32),
        k_window=window(wk), v_window=window(residual), overflow=overflow, **meta,
    )


def _key_window(c: KVCache) -> int:
    return 0 if c.k_window is None else c.k_window.shape[-3]


def _check_layer(cache: KVCache, layer) -> None:
    if cache.layers is None:
        if layer is not None:
            raise ValueError(f"this cache has no layer axis; pass layer=None, got {layer!r}")
        return
    if layer is None:
        raise ValueError(f"this cache has a leading layer axis of size {cache.layers}; "
                         "pass the layer index")  # fmt: skip
    if not isinstance(layer, jax.core.Tracer):
        index = operator.index(layer)
        if not -cache.layers <= index < cache.layers:
            raise ValueError(f"layer {index} is out of range for {cache.layers} layers")


def _view(cache: KVCache, layer) -> KVCache:
    """The per-layer cache (arrays without the layer axis)."""
    if layer is None:
        return cache
    return dataclasses.replace(cache, **{
        n: jax.lax.dynamic_index_in_dim(getattr(cache, n), layer, keepdims=False)
        for n in _ARRAYS if getattr(cache, n) is not None
    })  # fmt: skip


def _layer_index(layer, cache: KVCache):
    """The layer as an int32 array in ``[0, layers)`` (negative counts from the end)."""
    if layer is None:
        return None
    layer = jnp.asarray(layer, jnp.int32)
    return jnp.where(layer < 0, layer + cache.layers, layer)


def _store(cache: KVCache, layer, view: KVCache) -> KVCache:
    if layer is None:
        return view
    return dataclasses.replace(cache, **{
        n: jax.lax.dynamic_update_index_in_dim(getattr(cache, n), getattr(view, n), layer, 0)
        for n in _ARRAYS if getattr(cache, n) is not None
    })  # fmt: skip


def _check_tokens(c: KVCache, x, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    b, h = c.k_codes.shape[-4], c.k_codes.shape[-2]
    if x.ndim != 4 or x.shape[0] != b or x.shape[2:] != (h, c.head_dim):
        raise ValueError(
            f"{name} must have shape (batch, n, heads, head_dim) = ({b}, n, {h}, "
            f"{c.head_dim}) or (batch, heads, head_dim), got {tuple(jnp.shape(x))}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")
    return x


def _check_pos(c: KVCache, pos, n: int) -> jax.Array:
    """Validates ``pos``; a concrete one must keep ``pos .. pos+n-1`` inside the cache."""
    if jnp.ndim(pos) != 0 or not jnp.issubdtype(jnp.result_type(pos), jnp.integer):
        raise TypeError(f"pos must be an integer scalar, got {pos!r}")
    if not isinstance(pos, jax.core.Tracer):
        p = int(pos)
        if p < 0 or p + n > c.max_len:
            raise ValueError(
                f"positions pos={p}..{p + n - 1} do not fit a cache of max_len={c.max_len} "
                "(overrun; under jax.jit such positions are dropped and counted in "
                "cache.overflow)"
            )
    return jnp.asarray(pos, jnp.int32)


def _update_layer(c: KVCache, k: jax.Array, v: jax.Array, pos: jax.Array) -> KVCache:
    t, g, r, f = c.max_len, c.group_size, c.residual, c.format
    b, n, h, d = k.shape
    j = pos + jnp.arange(n, dtype=jnp.int32)
    inside = (j >= 0) & (j < t)
    idx = jnp.where(inside, j, t)  # out of bounds: dropped
    out = dict(overflow=c.overflow + jnp.sum(j >= t).astype(jnp.int32))
    if f is None:
        out["k_codes"] = c.k_codes.at[:, idx].set(k.astype(c.k_codes.dtype), mode="drop")
        out["v_codes"] = c.v_codes.at[:, idx].set(v.astype(c.v_codes.dtype), mode="drop")
        return dataclasses.replace(c, **out)
    codes, scales = kivi.quantize_groups(v, f, axis=-1)
    out["v_codes"] = c.v_codes.at[:, idx].set(codes, mode="drop")
    out["v_scales"] = c.v_scales.at[:, idx].set(scales, mode="drop")
    # Keys: gather the blocks this chunk touches (earlier keys of the first block come from
    # the ring) and quantize those the chunk completes.
    wk = _key_window(c)
    nb = -(-(n + g - 1) // g)
    first = (pos // g) * g
    sp = first + jnp.arange(nb * g, dtype=jnp.int32)
    blocks = k[:, jnp.clip(sp - pos, 0, n - 1)].astype(jnp.float32)
    if wk:
        ring = c.k_window[:, sp % wk].astype(jnp.float32)
        blocks = jnp.where((sp >= pos)[None, :, None, None], blocks, ring)
    codes, scales = kivi.quantize_groups(blocks.reshape(b, nb, g, h, d), f, axis=2)
    last = first + (jnp.arange(nb, dtype=jnp.int32) + 1) * g - 1
    complete = (last < pos + n) & (last < t)
    bidx = jnp.where(complete, first // g + jnp.arange(nb, dtype=jnp.int32), t)
    out["k_scales"] = c.k_scales.at[:, bidx].set(scales, mode="drop")
    pidx = jnp.where(complete[:, None], sp.reshape(nb, g), t).reshape(-1)
    out["k_codes"] = c.k_codes.at[:, pidx].set(codes.reshape(b, nb * g, h, -1), mode="drop")
    end = jnp.minimum(pos + n, t)  # one past the last stored position
    for name, w, x in (("k_window", wk, k), ("v_window", r, v)):
        if w:
            ridx = jnp.where(inside & (j >= end - w), j % w, w)
            out[name] = getattr(c, name).at[:, ridx].set(x.astype(c.dtype), mode="drop")
    return dataclasses.replace(c, **out)


def update(cache: KVCache, layer, k, v, pos) -> KVCache:
    """Writes the keys and values of positions ``pos .. pos + n - 1``.

    Args:
        cache: A :class:`KVCache`.
        layer: Layer index (int or traced int) for a stacked cache, None otherwise.
        k: Keys ``(batch, n, heads, head_dim)`` (``n`` tokens: 1 when decoding, the prompt
            when prefilling) or ``(batch, heads, head_dim)`` for one token.
        v: Values, same shape as ``k``.
        pos: Integer scalar, the position of the first token (may be traced).

    Returns:
        The updated cache (use with ``jax.jit(..., donate_argnums=...)`` to update in place).

    Raises:
        ValueError: If shapes do not match the cache, or a concrete ``pos`` is negative or
            ``pos + n > max_len`` (under ``jit`` such positions are dropped and counted in
            ``overflow``).
        TypeError: If ``k``/``v`` are not float or ``pos`` is not an integer scalar.
    """
    _check_layer(cache, layer)
    k, v = _check_tokens(cache, k, "k"), _check_tokens(cache, v, "v")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    pos = _check_pos(cache, pos, k.shape[1])
    return _update_jit(cache, _layer_index(layer, cache), k, v, pos)


@jax.jit
def _update_jit(cache, layer, k, v, pos):
    return _store(cache, layer, _update_layer(_view(cache, layer), k, v, pos))


def _dequantized(c: KVCache) -> tuple[jax.Array, jax.Array]:
    """float32 keys and values of every position as stored quantized."""
    f, d = c.format, c.head_dim
    key_scales = jnp.repeat(c.k_scales, c.group_size, axis=1)[:, : c.max_len]
    k = kivi.dequantize_codes(c.k_codes, f, d) * key_scales
    return k, kivi.dequantize_codes(c.v_codes, f, d) * c.v_scales[..., None]


def _ring(c: KVCache, name: str, j: jax.Array) -> jax.Array | None:
    """Ring-buffer entries for positions ``j`` (valid for the positions the ring holds)."""
    ring = getattr(c, name)
    return None if ring is None else ring[:, j % ring.shape[1]].astype(jnp.float32)


def _read_layer(c: KVCache, last: jax.Array) -> tuple[jax.Array, jax.Array]:
    if c.format is None:
        return c.k_codes, c.v_codes
    j = jnp.arange(c.max_len, dtype=jnp.int32)
    k, v = _dequantized(c)
    float_key, float_value = kivi.read_masks(j, jnp.minimum(last, c.max_len - 1),
                                             c.residual, c.group_size)  # fmt: skip
    ring_k, ring_v = _ring(c, "k_window", j), _ring(c, "v_window", j)
    if ring_k is not None:
        k = jnp.where(float_key[None, :, None, None], ring_k, k)
    if ring_v is not None:
        v = jnp.where(float_value[None, :, None, None], ring_v, v)
    return k.astype(c.dtype), v.astype(c.dtype)


def read(cache: KVCache, layer, pos) -> tuple[jax.Array, jax.Array]:
    """Keys and values as a query at position ``pos`` sees them (cache holding ``0..pos``).

    Args:
        cache: A :class:`KVCache`.
        layer: Layer index for a stacked cache, None otherwise.
        pos: Integer scalar (may be traced): the last written position.

    Returns:
        ``(k, v)``, each ``(batch, max_len, heads, head_dim)`` in ``cache.dtype``; entries
        after ``pos`` are unspecified.

    Raises:
        ValueError: If a concrete ``pos`` is outside ``[0, max_len)``.
    """
    _check_layer(cache, layer)
    return _read_jit(cache, _layer_index(layer, cache), _check_pos(cache, pos, 1))


@jax.jit
def _read_jit(cache, layer, pos):
    return _read_layer(_view(cache, layer), pos)


def _nbytes(x) -> int:
    return 0 if x is None else int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def nbytes_per_token(cache: KVCache, *, windows: bool = True) -> float:
    """Real bytes per cached position, per layer and per sequence (all heads).

    Sums the bytes of codes and scales (and, with ``windows``, the float ring buffers) and
    divides by ``layers * batch * max_len``: fixed-size parts are amortized over
    ``max_len``. For int4, ``H`` heads of ``D`` dims and ``R = 0`` this is
    ``2 * H * D / 2`` code bytes ``+ 4 H`` (value scales) ``+ 4 H D / G`` (key scales)
    ``+ 4 H D (G - 1) / T`` (the key ring).

    Args:
        cache: A :class:`KVCache`.
        windows: Count the float ring buffers of recent keys/values.

    Returns:
        Bytes as a float.
    """
    names = ["k_codes", "k_scales", "v_codes", "v_scales"]
    if windows:
        names += ["k_window", "v_window"]
    total = sum(_nbytes(getattr(cache, n)) for n in names)
    lead = cache.layers or 1
    return total / (lead * cache.k_codes.shape[-4] * cache.max_len)


def shardings(cache: KVCache, mesh, *, batch=None, heads=None) -> KVCache:
    """``NamedSharding``s that split a cache over batch and/or heads (for ``device_put``).

    Args:
        cache: A :class:`KVCache` (or its ``jax.eval_shape``).
        mesh: A ``jax.sharding.Mesh``.
        batch: Mesh axis name (or names) for the batch axis, or None.
        heads: Mesh axis name (or names) for the heads axis, or None.

    Returns:
        A :class:`KVCache` whose arrays are ``NamedSharding``s; ``overflow`` is replicated.
    """
    lead = (None,) if cache.layers is not None else ()
    spec = {
        "overflow": PartitionSpec(),
        "v_scales": PartitionSpec(*lead, batch, None, heads),
    }
    return dataclasses.replace(cache, **{
        n: None if getattr(cache, n) is None else NamedSharding(
            mesh, spec.get(n, PartitionSpec(*lead, batch, None, heads, None)))
        for n in _ARRAYS
    })  # fmt: skip


def __getattr__(name: str):
    # attend and update_attend live in jaxq.kvcache.attention; still importable from here.
    if name in ("attend", "update_attend"):
        from jaxq.kvcache import attention

        return getattr(attention, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
