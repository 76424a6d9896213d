"""Fused quantization: FP8 cast-transpose with amax, and MX / NVFP4 block quantization.

:func:`cast_transpose` quantizes a 2-D ``x`` to FP8 with one tensor scale and writes the
codes twice, as ``x`` and as ``xᵀ`` (the layouts a forward GEMM and the weight-gradient
GEMM want), while reducing the finite ``max |x|`` in the same pass:

.. math::

    s = \\mathrm{scale}(a, M_{fmt}), \\quad c = \\mathrm{fp8}(x / s), \\quad
    c^\\top, \\quad a_x = \\max_{x_{ij}\\ \\mathrm{finite}} |x_{ij}|

With ``amax`` given (delayed or static scaling) that is one pass over ``x``; without it
(current scaling) the tensor amax must be known before the first code is written, so a
reduction pass precedes the kernel.

:func:`block_quantize` quantizes along the last axis in blocks of 32 (MXFP8, MXFP4: E8M0
scale ``2^(⌊log2 amax⌋ − e_max)``) or 16 (NVFP4: E4M3 block scale ``amax_b / (6 s_t)``
under the float32 tensor scale ``s_t = amax / 2688``), one block's amax, scale and codes
per step in registers, and packs two E2M1 codes per byte with even columns in the low
nibble. Both kernels compute codes and scales with :mod:`jaxq.quantization`'s own element
encoders, so their :class:`jaxq.QArray`\\ s equal ``jaxq.quantize`` bit for bit (tested in
interpret mode; on a GPU a float division may round differently from XLA's).

Example:
    >>> import jax, jax.numpy as jnp, jaxq
    >>> from jaxq.kernels import cast_transpose, block_quantize
    >>> x = jax.random.normal(jax.random.key(0), (40, 64))
    >>> q, qt, amax = cast_transpose(x, "e4m3", implementation="pallas", interpret=True)
    >>> ref = jaxq.quantize(x, "e4m3")
    >>> bool((q.codes == ref.codes).all()), qt.shape, bool(amax == jnp.abs(x).max())
    (True, (64, 40), True)
    >>> m = block_quantize(x, "mxfp4", implementation="pallas", interpret=True)
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
from jaxq.quantization.calibration import finite_abs, scale_for_amax
from jaxq.quantization.cast import floor_log2, pow2
from jaxq.quantization.codes import encode
from jaxq.quantization.qarray import Layout, QArray
from jaxq.quantization.qdq import quantize

from . import registry as R

__all__ = ["cast_transpose", "block_quantize", "reference_cast_transpose",
           "reference_block_quantize", "why_not"]  # fmt: skip

_FP8 = {"e4m3": F.E4M3, "e5m2": F.E5M2}
_BLOCK = {"mxfp8": F.MXFP8, "mxfp4": F.MXFP4, "nvfp4": F.NVFP4}
_NVFP4_DENOM = 448.0 * 6.0


def _fmt(fmt, table, what):
    f = F.get(fmt) if isinstance(fmt, str) else fmt
    if f not in table.values():
        raise ValueError(f"{what}: fmt must be one of {sorted(table)}, got {getattr(f, 'name', f)}")
    return f


def _check_x(x, what):
    if not hasattr(x, "shape") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{what}: x must be a floating-point array, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")  # fmt: skip
    if x.ndim != 2:
        raise ValueError(f"{what}: x must be 2-D (rows, columns), got shape {tuple(x.shape)}")


def _finite_amax(x):
    return jnp.max(finite_abs(x.astype(jnp.float32)), initial=0.0)


def reference_cast_transpose(x, fmt="e4m3", *, amax=None):
    """``(jaxq.quantize(x, fmt, amax=...), its transpose, finite max |x|)`` under XLA."""
    fmt = _fmt(fmt, _FP8, "cast_transpose")
    q = quantize(x, fmt, amax=amax)
    qt = QArray(q.codes.T, q.scale, None, None, fmt, q.shape[::-1], q.dtype, q.layout)
    return q, qt, _finite_amax(x)


def reference_block_quantize(x, fmt="mxfp8"):
    """``jaxq.quantize(x, fmt)`` (blocks along the last axis) under XLA."""
    return quantize(x, _fmt(fmt, _BLOCK, "block_quantize"))


def why_not(impl: R.Implementation, x, *, interpret=False, block=None, fmt=None) -> str | None:
    """Why ``impl`` cannot quantize ``x`` (to ``fmt``) here (``None``: it can)."""
    if impl.name == "mosaic_tpu":
        from . import fused_quantize_tpu

        reason = fused_quantize_tpu.why_not(x, fmt, interpret=interpret)
    elif impl.name == "mosaic_gpu":
        reason = R.check_mosaic_gpu(impl, 9.0, interpret)
        if reason is None and fmt in _BLOCK.values():
            from . import block_quantize_mosaic

            reason = block_quantize_mosaic.why_not(x)
    else:
        reason = R.check_triton(impl, 8.0, interpret)
    if reason:
        return reason
    if block is not None and x.shape[1] % block:
        return f"the last axis ({x.shape[1]}) is not a multiple of the block ({block})"
    return None


# ------------------------------------------------------------------------ cast-transpose


def _tile_max(v, m, n, bm, bn):
    rows = pl.program_id(0) * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
    cols = pl.program_id(1) * bn + jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 1)
    a = jnp.abs(v)
    return jnp.max(jnp.where((rows < m) & (cols < n) & (a < jnp.inf), a, 0.0))


def _ct_kernel(x_ref, s_ref, c_ref, ct_ref, a_ref, *, fmt, m, n):
    bm, bn = x_ref.shape
    x = x_ref[...].astype(jnp.float32)
    codes = encode(x / s_ref[...], fmt)
    c_ref[...] = codes
    ct_ref[...] = codes.T
    a_ref[...] = jnp.full(a_ref.shape, _tile_max(x, m, n, bm, bn), jnp.float32)


def _ct_triton(x, fmt, s, block, interpret):
    from jax.experimental.pallas import triton as plt

    m, n = x.shape
    gm, gn = pl.cdiv(m, block), pl.cdiv(n, block)
    xp = R.pad_to(x, (block, block))  # whole tiles only (registry.pad_to)
    codes, codes_t, tiles = pl.pallas_call(
        functools.partial(_ct_kernel, fmt=fmt, m=m, n=n),
        out_shape=[jax.ShapeDtypeStruct(xp.shape, fmt.dtype),
                   jax.ShapeDtypeStruct(xp.shape[::-1], fmt.dtype),
                   jax.ShapeDtypeStruct((gm * 16, gn * 16), jnp.float32)],  # fmt: skip
        grid=(gm, gn),
        in_specs=[pl.BlockSpec((block, block), lambda i, j: (i, j)),
                  pl.BlockSpec((1, 1), lambda i, j: (0, 0))],  # fmt: skip
        out_specs=[pl.BlockSpec((block, block), lambda i, j: (i, j)),
                   pl.BlockSpec((block, block), lambda i, j: (j, i)),
                   pl.BlockSpec((16, 16), lambda i, j: (i, j))],  # fmt: skip
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="jaxq_cast_transpose",
    )(xp, jnp.reshape(s, (1, 1)))
    return codes[:m, :n], codes_t[:n, :m], jnp.max(tiles)


def cast_transpose(x, fmt="e4m3", *, amax=None, implementation=None, interpret=False,
                   block: int = 64):  # fmt: skip
    """FP8 codes of ``x`` and of ``xᵀ`` with one scale, and ``x``'s finite amax.

    Args:
        x: ``(M, N)`` float array.
        fmt: ``"e4m3"`` or ``"e5m2"`` (or the format object).
        amax: the clipping range (e.g. ``AmaxHistory.amax``); ``None``: ``x``'s own.
        implementation: ``None``, ``"pallas"``, ``"mosaic_gpu"`` (Hopper GPU, JAX >= 0.12,
            :mod:`~jaxq.kernels.fused_quantize_mosaic`), ``"triton"`` (GPU), ``"mosaic_tpu"``
            (TPU, :mod:`~jaxq.kernels.fused_quantize_tpu`) or ``"xla"``; with
            ``interpret=True``, ``"pallas"`` picks the Mosaic GPU kernel on JAX >= 0.12 and
            the Triton kernel before (name ``"mosaic_tpu"`` for the TPU one).
        interpret: run the Pallas kernel in interpret mode.
        block: square tile of the Triton kernel (of the Mosaic GPU kernel when 64 or 128,
            else 64 there).

    Returns:
        ``(q, qt, amax_x)``: ``q == jaxq.quantize(x, fmt, amax=amax)``, ``qt`` the same
        codes transposed (shape ``(N, M)``, same scale), ``amax_x`` the finite ``max |x|``.

    Raises:
        TypeError: ``x`` is not floating point.
        ValueError: ``x`` is not 2-D, ``fmt`` is not FP8, or ``implementation`` cannot run.
    """
    _check_x(x, "cast_transpose")
    fmt = _fmt(fmt, _FP8, "cast_transpose")
    impl = R.choose("cast_transpose", implementation,
                    lambda i: why_not(i, x, interpret=interpret, fmt=fmt))  # fmt: skip
    if impl == "xla":
        return reference_cast_transpose(x, fmt, amax=amax)
    a = _finite_amax(x) if amax is None else jnp.asarray(amax, jnp.float32)
    s = scale_for_amax(a, fmt.max)
    if impl == "mosaic_tpu":
        from . import fused_quantize_tpu

        codes, codes_t, amax_x = fused_quantize_tpu.cast_transpose(x, fmt, s, interpret)
    elif impl == "mosaic_gpu":
        from . import fused_quantize_mosaic as fqm

        tile = block if block in fqm.BLOCKS else 64
        codes, codes_t, amax_x = fqm.cast_transpose(x, fmt, s, interpret, tile)
    else:
        codes, codes_t, amax_x = _ct_triton(x, fmt, s, block, interpret)
    layout, dt = Layout("tensor"), np.dtype(x.dtype)
    q = QArray(codes, s, None, None, fmt, tuple(x.shape), dt, layout)
    qt = QArray(codes_t, s, None, None, fmt, tuple(x.shape[::-1]), dt, layout)
    return q, qt, amax_x


# ---------------------------------------------------------------------- block quantize


def _block_kernel(x_ref, ts_ref, c_ref, s_ref, *, fmt, nb):
    elem, bs = fmt.element, fmt.block_size
    packed = elem.bits == 4
    for j in range(nb):  # one block of the tile per step
        if packed:
            parts = [x_ref[:, pl.ds(j * bs + p, bs // 2, stride=2)] for p in (0, 1)]
        else:
            parts = [x_ref[:, pl.ds(j * bs, bs)]]
        parts = [v.astype(jnp.float32) for v in parts]
        amax = functools.reduce(jnp.maximum, [jnp.max(finite_abs(v), axis=1) for v in parts])
        raw = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(v), axis=1) for v in parts])
        amax, poison = amax[:, None], ~jnp.isfinite(raw[:, None])
        if fmt.is_mx:
            e = jnp.where(amax > 0, jnp.clip(floor_log2(amax) - elem.emax, -127, 127), 0)
            codes = [encode(v * pow2(-e), elem) for v in parts]
            if elem.has_nan:
                poison = jnp.zeros_like(poison)
            scale = jnp.where(poison, 255, e + 127).astype(jnp.uint8)
        else:  # NVFP4
            s_t = ts_ref[...]
            s_b = jnp.clip(amax / (elem.max * s_t), 0, F.E4M3.max).astype(F.E4M3.dtype)
            d = s_b.astype(jnp.float32) * s_t
            inv_d = jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0)
            codes = [encode(v * inv_d, elem) for v in parts]
            scale = jnp.where(poison, jnp.nan, s_b.astype(jnp.float32)).astype(F.E4M3.dtype)
        if packed:
            byte = codes[0].astype(jnp.int32) | (codes[1].astype(jnp.int32) << 4)
            c_ref[:, pl.ds(j * bs // 2, bs // 2)] = byte.astype(jnp.uint8)
        else:
            c_ref[:, pl.ds(j * bs, bs)] = codes[0]
        s_ref[:, pl.ds(j, 1)] = scale


def _block_triton(x, fmt, s_t, interpret, block_m=32, blocks_per_tile=4):
    from jax.experimental.pallas import triton as plt

    m, n = x.shape
    bs, elem = fmt.block_size, fmt.element
    per = 2 if elem.bits == 4 else 1
    nb, bn = blocks_per_tile, blocks_per_tile * bs
    scale_dtype = jnp.uint8 if fmt.is_mx else F.E4M3.dtype
    codes_dtype = jnp.uint8 if per == 2 else elem.dtype
    xp = R.pad_to(x, (block_m, bn))  # whole tiles only (registry.pad_to)
    mp, np_ = xp.shape
    codes, scale = pl.pallas_call(
        functools.partial(_block_kernel, fmt=fmt, nb=nb),
        out_shape=[jax.ShapeDtypeStruct((mp, np_ // per), codes_dtype),
                   jax.ShapeDtypeStruct((mp, np_ // bs), scale_dtype)],  # fmt: skip
        grid=(mp // block_m, np_ // bn),
        in_specs=[pl.BlockSpec((block_m, bn), lambda i, j: (i, j)),
                  pl.BlockSpec((1, 1), lambda i, j: (0, 0))],  # fmt: skip
        out_specs=[pl.BlockSpec((block_m, bn // per), lambda i, j: (i, j)),
                   pl.BlockSpec((block_m, nb), lambda i, j: (i, j))],  # fmt: skip
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name=f"jaxq_{fmt.name.lower()}_quantize",
    )(xp, jnp.reshape(s_t, (1, 1)).astype(jnp.float32))
    codes, scale = codes[:m, : n // per], scale[:m, : n // bs]
    if fmt.is_mx:
        scale = jax.lax.bitcast_convert_type(scale, fmt.scale_format.dtype)
    return codes, scale


def block_quantize(x, fmt="mxfp8", *, implementation=None, interpret=False):
    """MXFP8 / MXFP4 / NVFP4 quantization of ``x`` along its last axis.

    Args:
        x: ``(M, N)`` float array, ``N`` a multiple of the format's block (32 or 16).
        fmt: ``"mxfp8"``, ``"mxfp4"`` or ``"nvfp4"`` (or the format object).
        implementation: ``None``, ``"pallas"``, ``"mosaic_gpu"`` (Hopper GPU, JAX >= 0.12,
            float32/bfloat16/float16 ``x``, :mod:`~jaxq.kernels.block_quantize_mosaic`),
            ``"triton"`` (GPU), ``"mosaic_tpu"`` (TPU, :mod:`~jaxq.kernels.fused_quantize_tpu`)
            or ``"xla"``; with ``interpret=True``, ``"pallas"`` picks the Mosaic GPU kernel
            on JAX >= 0.12 and the Triton kernel before.
        interpret: run the Pallas kernel in interpret mode.

    Returns:
        The :class:`jaxq.QArray` ``jaxq.quantize(x, fmt)`` returns.

    Raises:
        TypeError: ``x`` is not floating point.
        ValueError: ``x`` is not 2-D, ``fmt`` is not a supported block format, the block
            does not divide ``N``, or ``implementation`` cannot run.
    """
    _check_x(x, "block_quantize")
    fmt = _fmt(fmt, _BLOCK, "block_quantize")
    if x.shape[1] % fmt.block_size:
        raise ValueError(f"block_quantize: {fmt.name} blocks of {fmt.block_size} do not divide "
                         f"the last axis of x, shape {tuple(x.shape)}")  # fmt: skip
    impl = R.choose("block_quantize", implementation,
                    lambda i: why_not(i, x, interpret=interpret, block=fmt.block_size, fmt=fmt))
    if impl == "xla":
        return reference_block_quantize(x, fmt)
    ts = None
    s_t = jnp.float32(1.0)
    if fmt.tensor_scale:
        s_t = ts = scale_for_amax(_finite_amax(x), _NVFP4_DENOM).astype(jnp.float32)
    if impl == "mosaic_tpu":
        from . import fused_quantize_tpu

        codes, scale = fused_quantize_tpu.block_quantize(x, fmt, s_t, interpret)
    elif impl == "mosaic_gpu":
        from . import block_quantize_mosaic

        codes, scale = block_quantize_mosaic.block_quantize(x, fmt, s_t, interpret)
    else:
        codes, scale = _block_triton(x, fmt, s_t, interpret)
    return QArray(codes, scale, None, ts, fmt, tuple(x.shape), np.dtype(x.dtype),
                  Layout("block", (1,), fmt.block_size)).validate()  # fmt: skip


_REQ = "NVIDIA GPU, compute capability >= 8.0"
_BLOCKS = "MXFP8/MXFP4/NVFP4, the last axis a multiple of the block"
R.register(R.Kernel(
    name="cast_transpose", module=__name__, reference=reference_cast_transpose,
    implementations=(R.Implementation("mosaic_gpu", ("gpu",), "NVIDIA GPU, compute "
                                      "capability >= 9.0, JAX >= 0.12; E4M3/E5M2"),
                     R.Implementation("triton", ("gpu",), _REQ + "; E4M3/E5M2"),
                     R.Implementation("mosaic_tpu", ("tpu",), "TPU; E4M3/E5M2"), R.XLA),
    tolerance="bit-identical codes, scale and amax (NaN codes equal as NaN)",
))  # fmt: skip
R.register(R.Kernel(
    name="block_quantize", module=__name__, reference=reference_block_quantize,
    implementations=(R.Implementation("mosaic_gpu", ("gpu",), "NVIDIA GPU, compute capability "
                                      ">= 9.0, JAX >= 0.12; float32/bfloat16/float16 x; "
                                      + _BLOCKS),
                     R.Implementation("triton", ("gpu",), _REQ + "; " + _BLOCKS),
                     R.Implementation("mosaic_tpu", ("tpu",), "TPU; " + _BLOCKS), R.XLA),
    tolerance="bit-identical codes and scales",
))  # fmt: skip
