"""Independent float64 numpy references for quantization (MX, NVFP4, scaled formats).

Element rounding uses ml_dtypes casts; scale arithmetic is done in float64 and rounded to
float32 only where the format stores a float32.
"""

import ml_dtypes
import numpy as np

E4M3 = ml_dtypes.float8_e4m3fn


def fixed_point_scale(amax: np.ndarray, m: float) -> np.ndarray:
    """Smallest normal float32 ``s`` with ``float32(m * s) >= amax`` (1 where amax == 0)."""
    amax = np.asarray(amax, np.float32)
    out = np.ones_like(amax)
    pos = amax > 0
    a = amax[pos].astype(np.float64)
    s = (a / m).astype(np.float32)
    s = np.nextafter(np.nextafter(s, np.float32(-np.inf)), np.float32(-np.inf))
    for _ in range(4):
        ok = (np.float32(m) * s).astype(np.float32) >= a.astype(np.float32)
        s = np.where(ok, s, np.nextafter(s, np.float32(np.inf)))
    out[pos] = np.maximum(s, np.finfo(np.float32).tiny)  # scales are never subnormal
    return out


def mx_quantize(x: np.ndarray, elem_dtype, emax: int, elem_max: float, block: int = 32):
    """OCP MX v1.0 along the last axis: returns (E8M0 exponents, element values, dequantized)."""
    xb = x.astype(np.float64).reshape(*x.shape[:-1], -1, block)
    amax = np.max(np.abs(xb), axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.floor(np.log2(amax)) - emax, 0.0)
    e = np.clip(e, -127, 127)
    scale = np.exp2(e)
    p = np.clip(xb / scale, -elem_max, elem_max).astype(elem_dtype).astype(np.float64)
    deq = (p * scale).reshape(x.shape)
    return e[..., 0].astype(np.int64), p.reshape(x.shape), deq


def nvfp4_quantize(x: np.ndarray):
    """NVFP4 along the last axis: returns (tensor scale, E4M3 block scales, codes, dequantized)."""
    x64 = x.astype(np.float64)
    s_t = fixed_point_scale(np.max(np.abs(x64)), 448.0 * 6.0).astype(np.float64)
    xb = x64.reshape(*x.shape[:-1], -1, 16)
    bamax = np.max(np.abs(xb), axis=-1, keepdims=True)
    s_b = np.clip(bamax / (6.0 * s_t), 0, 448.0).astype(E4M3).astype(np.float64)
    d = s_b * s_t
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(d > 0, xb / np.where(d > 0, d, 1.0), 0.0)
    p = np.clip(y, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float64)
    deq = ((p * s_b).astype(np.float32).astype(np.float64) * s_t).astype(np.float32)
    return np.float32(s_t), s_b[..., 0], p.reshape(x.shape), deq.reshape(x.shape)
