"""Independent float64 numpy references for the LoRA tests: unpacking and decoding packed
4-bit codes, dequantizing a served weight, and an MLP forward with adapters."""

from __future__ import annotations

import numpy as np

from jaxq import formats as F


def unpack4(codes: np.ndarray, k: int) -> np.ndarray:
    """Two 4-bit codes a byte along the last axis, code 0 in the low nibble."""
    codes = np.asarray(codes)
    both = np.stack([codes & 0xF, codes >> 4], axis=-1)
    return both.reshape(codes.shape[:-1] + (-1,))[..., :k].astype(np.int64)


def decode(codes: np.ndarray, fmt) -> np.ndarray:
    if fmt is F.NF4:
        return np.asarray(F.NF4.levels, np.float64)[codes]
    return np.where(codes >= 8, codes - 16, codes).astype(np.float64)  # int4, two's complement


def dequantize(qw) -> np.ndarray:
    """A served (1, N, K) weight with 4-bit codes and per-block scales as a float64 (N, K)."""
    q = qw.weight
    _, n, k = q.shape
    values = decode(unpack4(np.asarray(q.codes)[0], k), q.fmt)
    scale = np.asarray(q.scale, np.float64)[0]  # (N, K / block)
    return values * np.repeat(scale, k // scale.shape[-1], axis=-1)


def lsq_codes(w: np.ndarray, step: np.ndarray, qmax: int = 7) -> np.ndarray:
    """``round(clip(w / s, -qmax, qmax))`` with steps ``(N, K / block)``, ties to even."""
    s = np.repeat(np.asarray(step, np.float64), w.shape[-1] // step.shape[-1], axis=-1)
    return np.clip(np.round(w / s), -qmax, qmax).astype(np.int64)


def lora_forward(x, layers, scale):
    """``relu`` between layers; each layer ``(W (K, N), bias, A, B)``:
    ``h W + bias + scale · (h A) B`` in float64."""
    h = np.asarray(x, np.float64)
    for i, (w, bias, a, b) in enumerate(layers):
        h = h @ w + bias + scale * (h @ np.asarray(a, np.float64)) @ np.asarray(b, np.float64)
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h
