"""The block-scaled FP4 GEMM as a Pallas Mosaic GPU kernel (Hopper bfloat16 ``wgmma``).

:func:`jaxq.kernels.fp4_matmul`'s product (see :mod:`jaxq.kernels.fp4_gemm`)

.. math::

    y_{mn} = t^a t^b \\sum_k \\big(c^a_{mk}\\, s^a_{m, \\lfloor k/g \\rfloor}\\big)
             \\big(c^b_{nk}\\, s^b_{n, \\lfloor k/g \\rfloor}\\big)

for MXFP4 × MXFP4 (E8M0 scales, ``g = 32``) or NVFP4 × NVFP4 (E4M3 scales, ``g = 16``,
and a float32 tensor scale ``t`` per operand) with ``a`` ``(M, K)`` and ``b`` ``(N, K)``,
E2M1 codes packed two per byte along ``K`` (element ``2j`` in the low nibble of byte
``j``), accumulated in float32.

Each factor in parentheses is exact in bfloat16 (:mod:`jaxq.kernels.fp4_gemm`), so both
operands are dequantized in registers and multiplied on the bfloat16 tensor cores. As in
the weight-only kernel (:mod:`jaxq.kernels.weight_only_mosaic`) the packed bytes are never
unpacked in memory: the low nibbles of ``a``'s bytes meet the low nibbles of ``b``'s (the
even elements of ``K``), and the high nibbles the high ones (the odd elements):

.. math::

    y = t^a t^b \\big(\\mathrm{lo}(A) \\cdot \\mathrm{lo}(B)^\\top
        + \\mathrm{hi}(A) \\cdot \\mathrm{hi}(B)^\\top\\big)

One program (``plgpu.kernel`` grid point) computes a ``64 × bn`` output tile (64 is
``wgmma``'s M; decode shapes are padded to it); inside it ``plgpu.emit_pipeline`` streams,
for each step of ``E`` code bytes along ``K`` (64, 32 or 16: the largest that divides
``K / 2``), the ``64 × E`` and ``bn × E`` tiles of code bytes and the step's rows of
scales into shared memory by TMA. Each step then, for each operand,

1. loads the code bytes into registers, widens them to int32 and takes the nibbles apart
   with shifts and masks;
2. decodes them to float32 (:func:`~jaxq.kernels.weight_only.decode_nibbles`) and
   multiplies them by their block's scale (a step spans ``2E / g`` blocks, whose scales are
   selected per column); the product is exact, and so is its conversion to bfloat16;
3. stores the two bfloat16 planes (low and high nibbles) to swizzled shared memory;

and accumulates ``wgmma(acc, lo(A), lo(B).T)`` and ``wgmma(acc, hi(A), hi(B).T)`` in
float32, both operands in shared memory, ``b``'s planes read K-major through their
transposed view. Every product is exact and the bfloat16 ``wgmma`` accumulates in float32,
so one accumulator spans all of ``K``. The wrapper decodes the scale bytes to float32
(E8M0 ``2^{e - 127}``, NaN for 255; E4M3 as it is) and transposes them to ``(K/g, M)`` and
``(K/g, N)``, so that block ``j``'s scales are a contiguous row; the tensor scales multiply
the float32 result. Decode shapes (one 64-row tile) split ``K`` over extra programs
(split-K: an equal number of steps each) whose float32 partial tiles XLA adds.

Whole tiles only: the wrapper zero-pads ``M`` and ``N`` to the tile (zero codes and zero
scales add exact zeros) and slices the result; ``E`` divides ``K / 2``, so every TMA copy
reads and writes a whole tile. A NaN scale makes its block's elements NaN and so the whole
output row (or column), as in the reference. Tolerance: that of
:mod:`jaxq.kernels.fp4_gemm`; a scaled element below ``2^-126`` (a subnormal) may be
flushed to zero by the tensor cores. Needs JAX >= 0.12 (Mosaic GPU's interpret mode) and, to
run compiled, a Hopper GPU (compute capability 9.x).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import registry as R
from .weight_only_mosaic import _split  # one split-K rule for the Mosaic GPU GEMMs

__all__ = ["matmul"]

BM = 64  # rows per program: one warpgroup's wgmma M
# concurrent pipeline steps. Shared memory at most (64-byte steps, bn = 128, NVFP4): 3 × 18
# KiB of code and scale tiles, 48 KiB of bfloat16 planes and 32 KiB of output tile, about
# 134 KiB of a Hopper block's 227 KiB
MAX_STAGES = 3


def _cols(k: int) -> int:
    """Code bytes per kernel step: the largest of 64, 32 and 16 that divides ``K / 2``
    (bfloat16 ``wgmma`` takes 16 along K at a time; a TMA row needs 16 bytes)."""
    return next(e for e in (64, 32, 16) if (k // 2) % e == 0)


def _tiled(cols: int, itemsize: int):
    """Shared-memory tiling and swizzle for a tile ``cols`` elements wide."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    swizzle = plgpu.find_swizzle(cols * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _body(a_gmem, b_gmem, sa_gmem, sb_gmem, y_gmem, alo, ahi, blo, bhi, y_smem, *, bn, cols,
          group, per_split):  # fmt: skip
    """One ``64 × bn`` output tile over ``per_split`` steps of ``cols`` code bytes;
    ``group``: code bytes per scale block."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from .weight_only import decode_nibbles

    mi, ni, si = lax.axis_index("m"), lax.axis_index("n"), lax.axis_index("s")
    off = si * per_split
    rows, ocols = pl.ds(mi * BM, BM), pl.ds(ni * bn, bn)
    lay = plgpu.Layout.WGMMA
    blocks = cols // group  # scale rows per step
    specs = [plgpu.BlockSpec((BM, cols), lambda k: (0, k + off)),
             plgpu.BlockSpec((bn, cols), lambda k: (0, k + off)),
             plgpu.BlockSpec((blocks, BM), lambda k: (k + off, 0)),
             plgpu.BlockSpec((blocks, bn), lambda k: (k + off, 0))]  # fmt: skip
    operands = [a_gmem.at[rows], b_gmem.at[ocols], sa_gmem.at[:, rows], sb_gmem.at[:, ocols]]

    def dequantize(c_smem, s_smem, lo_smem, hi_smem):
        c = plgpu.load(c_smem, layout=lay).astype(jnp.int32)

        def scale(j):  # block j's scales, one per row, broadcast along the row
            return plgpu.load(s_smem.at[j], layout=lay.reduce(1))[:, None]

        s = scale(0)
        if blocks > 1:  # each column takes its block's scale
            col = plgpu.broadcasted_iota(jnp.int32, c.shape, 1, layout=lay)
            for j in range(1, blocks):
                s = jnp.where(col >= j * group, scale(j), s)
        # E2M1 value times its scale: exact in float32 and in bfloat16
        lo_smem[...] = (decode_nibbles(c & 15, "e2m1") * s).astype(lo_smem.dtype)
        hi_smem[...] = (decode_nibbles(c >> 4, "e2m1") * s).astype(hi_smem.dtype)

    def run(acc):
        def step(idx, a_smem, b_smem, sa_smem, sb_smem):
            dequantize(a_smem, sa_smem, alo, ahi)
            dequantize(b_smem, sb_smem, blo, bhi)
            plgpu.commit_smem()  # visible to wgmma
            plgpu.wgmma(acc, alo, blo.T)  # .T: b's plane read K-major
            plgpu.wgmma(acc, ahi, bhi.T)
            plgpu.wgmma_wait(0)  # before the next step overwrites the planes

        plgpu.emit_pipeline(step, grid=(per_split,), in_specs=specs,
                            max_concurrent_steps=min(MAX_STAGES, per_split))(*operands)
        return acc[...]

    y_smem[...] = pl.run_scoped(run, plgpu.ACC((BM, bn), jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(y_smem, y_gmem.at[si, rows, ocols])
    plgpu.wait_smem_to_gmem(0)


def matmul(a, b, interpret: bool, block_n: int | None = None,
           split_k: int | None = None) -> jax.Array:  # fmt: skip
    """``deq(a) · deq(b)ᵀ`` as float32 on the Mosaic GPU kernel.

    ``a`` ``(M, K)`` and ``b`` ``(N, K)`` are MXFP4 or NVFP4 :class:`jaxq.QArray`\\ s of one
    format, blocks along ``K``, ``K`` a multiple of 32 (what
    :func:`jaxq.kernels.fp4_gemm.why_not` accepts). ``block_n``: output columns per
    program, 64 or 128 (otherwise: 128, or 64 where that divides ``N`` and 128 does not);
    ``split_k``: at most this many programs per output tile along ``K`` (default: from the
    shapes).

    Example (interpret mode needs JAX >= 0.12):
        >>> import jax, jax.numpy as jnp, jaxq
        >>> from jaxq.kernels import fp4_gemm, registry
        >>> a = jaxq.quantize(jax.random.normal(jax.random.key(0), (3, 128)), "nvfp4")
        >>> b = jaxq.quantize(jax.random.normal(jax.random.key(1), (72, 128)), "nvfp4")
        >>> if registry.jax_version() >= (0, 12):
        ...     y = matmul(a, b, interpret=True)
        ...     ok = bool(jnp.allclose(y, fp4_gemm.reference(a, b), rtol=1e-5, atol=1e-4))
        ... else:
        ...     ok = True
        >>> ok
        True
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from .fp4_gemm import _FORMATS
    from .weight_only import decode_scales

    (m, k), n = a.shape, b.shape[0]
    fmt_name = _FORMATS[a.fmt]
    cols = _cols(k)
    group = a.fmt.block_size // 2  # code bytes per scale block
    bn = block_n if block_n in (64, 128) else R.dividing_tile(n, 128, 64)

    def scales(q):  # float32 (K/g, rows): block j's scales are row j
        return decode_scales(lax.bitcast_convert_type(q.scale, jnp.uint8), fmt_name).T

    # whole tiles only (registry.pad_to): zero codes and scales add exact zeros
    ac, sa = R.pad_to(a.codes, (BM, None)), R.pad_to(scales(a), (None, BM))
    bc, sb = R.pad_to(b.codes, (bn, None)), R.pad_to(scales(b), (None, bn))
    gm, gn = ac.shape[0] // BM, bc.shape[0] // bn
    total = k // 2 // cols
    split = _split(total, gm * gn, m, split_k)
    body = functools.partial(_body, bn=bn, cols=cols, group=group, per_split=total // split)
    plane = functools.partial(plgpu.SMEM, dtype=jnp.bfloat16, transforms=_tiled(cols, 2))
    y = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((split, gm * BM, gn * bn), jnp.float32),
        scratch_types=[plane((BM, cols)), plane((BM, cols)), plane((bn, cols)),
                       plane((bn, cols)),
                       plgpu.SMEM((BM, bn), jnp.float32, transforms=_tiled(bn, 4))],
        grid=(gm, gn, split),
        grid_names=("m", "n", "s"),
        interpret=plgpu.InterpretGPUParams(uninitialized_memory="zero") if interpret else None,
        kernel_name=f"jaxq_fp4_{fmt_name}_mosaic",
    )(ac, bc, sa, sb)
    y = (y[0] if split == 1 else jnp.sum(y, axis=0))[:m, :n]
    if a.tensor_scale is not None:
        y = y * (a.tensor_scale * b.tensor_scale)
    return y
