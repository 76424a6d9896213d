"""FP8 cast-transpose and MX / NVFP4 block quantization on TPU: Pallas Mosaic TPU kernels.

Same results as :mod:`jaxq.kernels.fused_quantize` (whose dispatchers run these kernels on
TPU): :func:`cast_transpose` writes the FP8 codes ``c = fp8(x / s)`` of a ``(bm, bn)`` tile
and of its transpose (to the ``(j, i)`` tile of ``xᵀ``) and the tile's finite
``max |x|``; :func:`block_quantize` gives each block of 32 (MXFP8, MXFP4) or 16 (NVFP4)
elements along the last axis the scale

.. math::

    s_b = 2^{\\mathrm{clip}(\\lfloor \\log_2 a_b \\rfloor - e_{max}, -127, 127)}
    \\ (\\mathrm{MX}), \\qquad
    s_b = \\mathrm{E4M3}\\!\\left(\\mathrm{clip}\\!\\left(\\frac{a_b}{6 s_t}, 0, 448\\right)
    \\right) \\ (\\mathrm{NVFP4})

with ``a_b`` the block's finite ``max |x|``, and codes ``round(x / s_b)`` (NVFP4:
``x · (1 / (s_b s_t))``). A block holding a value its element format cannot encode gets
the NaN scale (MXFP4: 255; NVFP4: E4M3 NaN), as in :func:`jaxq.quantize`.

Mosaic has no float8 or 4-bit vector types, so every element code is computed as an
integer on the float32 bit pattern and stored as an ``int8`` byte that the wrapper
bitcasts to the code dtype: FP8 rounds the 23-bit mantissa to nearest even (subnormals by
adding and removing ``2^23``), E2M1 counts the midpoints below ``|y|``. A block's amax is
a lane butterfly: ``log2(block)`` steps of ``max(v, v[i ^ k])`` by two lane rotations
(``pltpu.roll``), which leaves every lane holding its block's amax, so scaling stays
elementwise. One scale per block and two E2M1 codes per byte are picked out by exact
products on the MXU with 0/1 matrices (integers below 256 are exact in bfloat16): the
scales by ``S[j, b] = [j = b · block]``, the bytes, per 256-lane chunk, by
``P[j, k] = [j = 2k] + 16 [j = 2k + 1]`` (even columns in the low nibble).

Tiling (Mosaic: the last two block dims multiples of ``(8, 128)``, ``(32, 128)`` for the
byte outputs, or the array's): a cast-transpose tile is 128 or 256 rows by 128 or 256
columns, whichever pads least, so its transpose is whole tiles too; block quantization
takes 32 rows and the whole (padded) row when it holds at most 128 blocks, else tiles of
128 blocks.
Operands are zero-padded to whole tiles (:func:`jaxq.kernels.registry.pad_to`; a zero
pad changes no amax) and the results sliced. float16/float64 inputs are converted to
float32 first, as the reference does.

Every format of :mod:`jaxq.kernels.fused_quantize` is expressed (E4M3, E5M2, MXFP8,
MXFP4, NVFP4). Codes, scales and amax equal the reference bit for bit in interpret mode
(NaN codes compared as NaN); on a TPU, the float divisions ``x / s`` and NVFP4's may round
as Mosaic's divide does rather than as XLA's. The tests interpret the kernels and lower
them for an abstract TPU; lowering does not run Mosaic's compiler, so its layout rules
(lane rotations, narrow stores) are checked only on a TPU.

Example:
    >>> import jax, jaxq
    >>> from jaxq.kernels import block_quantize, cast_transpose
    >>> x = jax.random.normal(jax.random.key(0), (40, 96))
    >>> q, qt, amax = cast_transpose(x, "e5m2", implementation="mosaic_tpu", interpret=True)
    >>> bool((q.codes == jaxq.quantize(x, "e5m2").codes).all()), qt.shape
    (True, (96, 40))
    >>> m = block_quantize(x, "mxfp4", implementation="mosaic_tpu", interpret=True)
    >>> bool((m.codes == jaxq.quantize(x, "mxfp4").codes).all())
    True
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxq import formats as F
from jaxq.quantization.cast import floor_log2, pow2
from jaxq.quantization.codes import _nearest_magnitude_index

from . import registry as R

__all__ = ["why_not", "cast_transpose", "block_quantize", "fp8_bits"]

_F32, _I32, _I8 = jnp.float32, jnp.int32, jnp.int8
_INF_BITS = 0x7F800000
_FORMATS = {F.E4M3: "e4m3", F.E5M2: "e5m2", F.MXFP8: "mxfp8", F.MXFP4: "mxfp4",
            F.NVFP4: "nvfp4"}  # fmt: skip
_ROWS = 32  # row tile of block quantization: whole (32, 128) tiles of the int8 outputs


def why_not(x, fmt, *, interpret: bool = False) -> str | None:
    """Why the Mosaic TPU kernels cannot quantize ``x`` to ``fmt`` here (``None``: they
    can). The shape and format checks are :mod:`jaxq.kernels.fused_quantize`'s."""
    if not interpret and R.platform() != "tpu":
        return f"needs a TPU, the default backend is {R.platform()!r}"
    if fmt is not None and fmt not in _FORMATS:
        return f"format {getattr(fmt, 'name', fmt)} (supported: {', '.join(_FORMATS.values())})"
    return None


# ------------------------------------------------------------------- element codes


def _bits(v):
    return jax.lax.bitcast_convert_type(v, _I32)


def _f32(b):
    return jax.lax.bitcast_convert_type(b, _F32)


def fp8_bits(y, fmt: F.FloatFormat):
    """Saturating round-to-nearest-even E4M3 / E5M2 bit patterns (int32, 0..255) of
    float32 ``y``, by integer arithmetic: what ``jaxq``'s ``encode`` stores. Finite
    overflow gives ``±max``; ±inf gives ±inf (E5M2) or NaN (E4M3); NaN gives NaN.

    Example:
        >>> fp8_bits(jnp.array([1.0, -448.0, 1e9, 2.0**-9]), F.E4M3).tolist()
        [56, 254, 126, 1]
    """
    m, bias = fmt.mantissa_bits, fmt.bias
    b = _bits(y)
    sign = (b >> 24) & 0x80
    mag = b & 0x7FFFFFFF
    c = jnp.minimum(mag, int(np.float32(fmt.max).view(np.int32)))  # saturate
    drop = 23 - m
    rounded = c + ((1 << (drop - 1)) - 1) + ((c >> drop) & 1)
    normal = (rounded >> drop) - ((127 - bias) << m)
    # |y| below the smallest normal: RNE(|y| · 2^(bias - 1 + m)) (the product is exact)
    scaled = _f32(c) * np.float32(2.0 ** (bias - 1 + m)) + np.float32(2.0**23)
    sub = _bits(scaled) - 0x4B000000
    code = jnp.where(c < (128 - bias) << 23, sub, normal) | sign
    if fmt.has_inf:
        code = jnp.where(mag == _INF_BITS, 0x7C | sign, code)
    else:  # encode sets inf to a positive NaN before rounding
        code = jnp.where(mag == _INF_BITS, 0x7F, code)
    return jnp.where(mag > _INF_BITS, 0x7F | sign, code)


def _fp4_bits(y, elem):
    """E2M1 codes (int32, 0..15) of float32 ``y``: ``jaxq``'s nearest-even encoder (NaN
    gives 0, ±inf saturates)."""
    b = _bits(y)
    mag = b & 0x7FFFFFFF
    idx = _nearest_magnitude_index(_f32(mag), elem)  # NaN compares false: index 0
    sign = (b < 0) & (mag <= _INF_BITS)
    return idx | jnp.where(sign, 1 << (elem.bits - 1), 0)


def _e4m3_value(code):
    """float32 value of non-negative, non-NaN E4M3 codes (int32)."""
    normal = _f32((code << 20) + (120 << 23))
    return jnp.where(code < 8, code.astype(_F32) * np.float32(2.0**-9), normal)


def _finite_abs(x):
    mag = _bits(x) & 0x7FFFFFFF
    return jnp.where(mag < _INF_BITS, _f32(mag), 0.0), mag < _INF_BITS


# ------------------------------------------------------------------------ cast-transpose


def _ct_kernel(s_ref, x_ref, c_ref, ct_ref, a_ref, *, fmt):
    x = x_ref[...].astype(_F32)
    codes = fp8_bits(x / s_ref[0, 0], fmt)
    c_ref[...] = codes.astype(_I8)
    ct_ref[...] = codes.T.astype(_I8)
    a, _ = _finite_abs(x)
    amax = jnp.max(jnp.max(a, axis=0, keepdims=True), axis=1, keepdims=True)
    a_ref[...] = jnp.broadcast_to(amax, a_ref.shape)


def _tile(d: int, sizes=(256, 128)) -> int:
    """The tile from ``sizes`` that pads ``d`` least (the larger one on a tie)."""
    return min(sizes, key=lambda t: (-(-d // t) * t, -t))


def _as_input(x):
    return x if x.dtype in (jnp.float32, jnp.bfloat16) else x.astype(_F32)


def cast_transpose(x, fmt: F.FloatFormat, s, interpret: bool):
    """FP8 codes of 2-D ``x`` and of ``xᵀ`` under the float32 scale ``s``, and ``x``'s
    finite amax: ``(codes, codes_t, amax)`` (checked arguments)."""
    from jax.experimental.pallas import tpu as pltpu

    m, n = x.shape
    bm, bn = _tile(m), _tile(n)
    xp = R.pad_to(_as_input(x), (bm, bn))  # whole tiles only (registry.pad_to)
    mp, np_ = xp.shape
    gm, gn = mp // bm, np_ // bn
    codes, codes_t, tiles = pl.pallas_call(
        functools.partial(_ct_kernel, fmt=fmt),
        out_shape=[jax.ShapeDtypeStruct((mp, np_), _I8),
                   jax.ShapeDtypeStruct((np_, mp), _I8),
                   jax.ShapeDtypeStruct((gm * 8, gn * 128), _F32)],  # fmt: skip
        grid=(gm, gn),
        in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM),
                  pl.BlockSpec((bm, bn), lambda i, j: (i, j))],  # fmt: skip
        out_specs=[pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
                   pl.BlockSpec((bn, bm), lambda i, j: (j, i)),
                   pl.BlockSpec((8, 128), lambda i, j: (i, j))],  # fmt: skip
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name=f"jaxq_cast_transpose_{_FORMATS[fmt]}_tpu",
    )(jnp.reshape(s, (1, 1)).astype(_F32), xp)

    def as_fp8(c):
        return jax.lax.bitcast_convert_type(c, fmt.dtype)

    return as_fp8(codes[:m, :n]), as_fp8(codes_t[:n, :m]), jnp.max(tiles)


# ---------------------------------------------------------------------- block quantize


def _segment_max(v, seg: int):
    """Each lane's maximum over its aligned group of ``seg`` lanes (a power of two)."""
    from jax.experimental.pallas import tpu as pltpu

    n = v.shape[1]
    lane = jax.lax.broadcasted_iota(_I32, v.shape, 1)
    k = 1
    while k < seg:  # partner lane i ^ k: v[i + k] where bit k of i is 0, else v[i - k]
        ahead, behind = pltpu.roll(v, n - k, 1), pltpu.roll(v, k, 1)
        v = jnp.maximum(v, jnp.where((lane & k) == 0, ahead, behind))
        k *= 2
    return v


def _block_kernel(ts_ref, x_ref, sel_ref, *rest, fmt):
    elem, bs = fmt.element, fmt.block_size
    packed = elem.bits == 4
    pack_ref, c_ref, s_ref = rest if packed else (None, *rest)
    x = x_ref[...].astype(_F32)
    a, finite = _finite_abs(x)
    amax = _segment_max(a, bs)  # the block's finite amax, in each of its lanes
    if fmt.is_mx:
        e = jnp.where(amax > 0, jnp.clip(floor_log2(amax) - elem.emax, -127, 127), 0)
        y, sbits, nan_scale = x * pow2(-e), e + 127, 255
    else:  # NVFP4 under the tensor scale s_t
        s_t = ts_ref[0, 0]
        sbits = fp8_bits(jnp.clip(amax / (elem.max * s_t), 0, F.E4M3.max), F.E4M3)
        d = _e4m3_value(sbits) * s_t
        y = x * jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0)
        nan_scale = 0x7F
    if not elem.has_nan:  # a non-finite element poisons its block's scale
        poison = _segment_max(jnp.where(finite, 0.0, 1.0), bs) > 0
        sbits = jnp.where(poison, nan_scale, sbits)
    if packed:
        codes = _fp4_bits(y, elem).astype(_F32).astype(jnp.bfloat16)
        for c in range(x.shape[1] // 256):  # two codes per byte, 256 lanes at a time
            byte = jnp.dot(codes[:, c * 256:(c + 1) * 256], pack_ref[...],
                           preferred_element_type=_F32)  # fmt: skip
            c_ref[:, c * 128:(c + 1) * 128] = byte.astype(_I32).astype(_I8)
    else:
        c_ref[...] = fp8_bits(y, elem).astype(_I8)
    scale = jnp.dot(sbits.astype(_F32).astype(jnp.bfloat16), sel_ref[...],
                    preferred_element_type=_F32)  # fmt: skip
    s_ref[...] = scale[:, : s_ref.shape[1]].astype(_I32).astype(_I8)


def _iotas(shape):
    return (jax.lax.broadcasted_iota(_I32, shape, 0), jax.lax.broadcasted_iota(_I32, shape, 1))


def _column_tile(n: int, bs: int, per: int) -> int:
    """The padded row when it holds at most 128 blocks, else 128 blocks."""
    lane = 128 * per  # whole 128-lane rows of packed codes
    return min(-(-n // lane) * lane, 128 * bs)


def block_quantize(x, fmt: F.BlockFormat, s_t, interpret: bool):
    """``(codes, scale)`` of :func:`jaxq.quantize` for 2-D ``x`` whose last axis is a
    multiple of the block, under the NVFP4 tensor scale ``s_t`` (checked arguments)."""
    from jax.experimental.pallas import tpu as pltpu

    m, n = x.shape
    bs, elem = fmt.block_size, fmt.element
    per = 2 if elem.bits == 4 else 1
    bn = _column_tile(n, bs, per)
    xp = R.pad_to(_as_input(x), (_ROWS, bn))  # whole tiles only (registry.pad_to)
    mp, np_ = xp.shape
    nb = bn // bs
    j, b = _iotas((bn, 128))
    operands = [jnp.reshape(s_t, (1, 1)).astype(_F32), xp, (j == b * bs).astype(jnp.bfloat16)]
    in_specs = [pl.BlockSpec(memory_space=pltpu.SMEM),
                pl.BlockSpec((_ROWS, bn), lambda i, k: (i, k)),
                pl.BlockSpec((bn, 128), lambda i, k: (0, 0))]  # fmt: skip
    if per == 2:
        j, k = _iotas((256, 128))
        operands.append(((j == 2 * k) + 16 * (j == 2 * k + 1)).astype(jnp.bfloat16))
        in_specs.append(pl.BlockSpec((256, 128), lambda i, k: (0, 0)))
    codes, scale = pl.pallas_call(
        functools.partial(_block_kernel, fmt=fmt),
        out_shape=[jax.ShapeDtypeStruct((mp, np_ // per), _I8),
                   jax.ShapeDtypeStruct((mp, np_ // bs), _I8)],  # fmt: skip
        grid=(mp // _ROWS, np_ // bn),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((_ROWS, bn // per), lambda i, k: (i, k)),
                   pl.BlockSpec((_ROWS, nb), lambda i, k: (i, k))],  # fmt: skip
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name=f"jaxq_{_FORMATS[fmt]}_quantize_tpu",
    )(*operands)
    codes = codes[:m, : n // per]
    codes = jax.lax.bitcast_convert_type(codes, jnp.uint8 if per == 2 else elem.dtype)
    scale_dtype = fmt.scale_format.dtype if fmt.is_mx else F.E4M3.dtype
    return codes, jax.lax.bitcast_convert_type(scale[:m, : n // bs], scale_dtype)
