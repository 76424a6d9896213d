"""Independent float64 numpy implementation of the quantized optimizer states (for tests).

Written from the algorithm's description, not from jaxq's code: brute-force nearest code
(``argmin |code - r|``, first index on ties), blocks along rows of the row layout (the
fewest trailing axes whose product needs at most 1/64 zero padding to whole blocks, else
all axes), block absmax stored rounded up to bfloat16 via ml_dtypes (``nextafter`` when
rounding went down).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

TINY = float(np.finfo(np.float32).tiny)


def nearest(r: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index of the nearest code value for each element, chunked.

    Ties (both neighbours at the same float64 distance) go to the even index, as
    bitsandbytes' search does.
    """
    flat = r.reshape(-1)
    out = np.empty(flat.shape, np.int64)
    c = code.astype(np.float64)
    for i in range(0, flat.size, 1 << 16):
        chunk = flat[i : i + (1 << 16)]
        dist = np.abs(chunk[:, None] - c[None, :])
        first = np.argmin(dist, axis=1)
        nxt = np.minimum(first + 1, c.size - 1)
        rows = np.arange(chunk.size)
        tie = (nxt != first) & (dist[rows, nxt] == dist[rows, first])
        out[i : i + chunk.size] = np.where(tie & (first % 2 == 1), nxt, first)
    return out.reshape(r.shape)


def round_up(a: np.ndarray, scale_dtype: str) -> np.ndarray:
    """float64 -> stored scale (as float64): float32 nearest, or bfloat16 rounded up."""
    a32 = a.astype(np.float32)
    if scale_dtype == "float32":
        return a32.astype(np.float64)
    b = a32.astype(ml_dtypes.bfloat16)
    low = b.astype(np.float64) < a32.astype(np.float64)
    b = np.where(low, np.nextafter(b, ml_dtypes.bfloat16(np.inf)), b)
    return b.astype(np.float64)


def rows(shape, bs: int) -> tuple[tuple, int]:
    """(leading axes, row length) of the row layout, by trying k = 1, 2, ... trailing axes."""
    for k in range(1, len(shape) + 1):
        n = int(np.prod(shape[len(shape) - k :]))
        if (-(-n // bs) * bs - n) * 64 <= n:
            break
    return tuple(shape[: len(shape) - k]), n


def blocks(x: np.ndarray, bs: int) -> np.ndarray:
    lead, n = rows(x.shape, bs)
    x = x.reshape(lead + (n,))
    npad = -(-n // bs) * bs
    xp = np.concatenate([x, np.zeros(lead + (npad - n,), x.dtype)], axis=-1)
    return xp.reshape(lead + (npad // bs, bs))


def quantize(x, code, bs, *, scale_dtype="bfloat16", sign_fix=False):
    """(codes (..., n_pad) int, absmax (..., nb) float64) for float64 x (..., n)."""
    xb = blocks(np.asarray(x, np.float64), bs)
    amax = np.max(np.abs(xb), axis=-1)
    amax = np.where(amax >= TINY, amax, 0.0)
    amax = round_up(amax, scale_dtype)
    r = xb / np.where(amax > 0, amax, 1.0)[..., None]
    idx = nearest(r, code)
    if sign_fix:
        val = code[idx]
        idx = idx - ((xb < 0) & (val >= 0)) + ((xb > 0) & (val < 0))
    return idx.reshape(xb.shape[:-2] + (-1,)), amax


def dequantize(idx, amax, code, bs, shape):
    """float64 values of ``shape`` from row-layout codes ``(*lead, n_pad)``."""
    lead, n = rows(tuple(shape), bs)
    vals = code.astype(np.float64)[idx].reshape(amax.shape + (bs,)) * amax[..., None]
    return vals.reshape(amax.shape[:-1] + (-1,))[..., :n].reshape(shape)


def unpack4(packed: np.ndarray) -> np.ndarray:
    p = np.asarray(packed).astype(np.int64)
    return np.stack([p & 15, p >> 4], axis=-1).reshape(p.shape[:-1] + (-1,))


def adam_step(g, m, v, t, *, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, p=None):
    """One float64 AdamW step from float moments; returns (update, m, v).

    The hyperparameters are the float32 values the optimizer receives (``float32(0.999)``).
    """
    b1, b2, eps = (float(np.float32(h)) for h in (b1, b2, eps))
    g = np.asarray(g, np.float64)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mh = m / (1 - b1**t)
    vh = v / (1 - b2**t)
    u = mh / (np.sqrt(vh) + eps)
    if wd:
        u = u + wd * np.asarray(p, np.float64)
    return -lr * u, m, v
