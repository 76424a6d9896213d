"""The scaled FP8 GEMM as a Pallas Mosaic GPU kernel (Hopper ``wgmma``).

:func:`jaxq.kernels.scaled_fp8_matmul`'s product (see :mod:`jaxq.kernels.fp8_gemm`)

.. math::

    y_{mn} = \\sum_{j} s^a_{m,j}\\, s^b_{n,j} \\sum_{k \\in \\text{step } j} a_{mk} b_{nk}

for ``a`` ``(M, K)`` and ``b`` ``(N, K)`` FP8 codes. One program (``plgpu.kernel`` grid
point) computes a ``64 × bn`` output tile; inside it ``plgpu.emit_pipeline`` streams the
``64 × bk`` tile of ``a`` and the ``bn × bk`` tile of ``b`` for each step along ``K`` into
swizzled shared memory by TMA, double-buffered, and ``plgpu.wgmma`` multiplies them:

* rowwise (tensor or per-row scales on both sides): every step accumulates into one float32
  ``wgmma`` accumulator; the scales multiply the tile once, ``acc · s^a_m · s^b_n``;
* blockwise (``bk = 128``) and mx (``bk = 32``): each step's product goes to a fresh
  float32 accumulator, is scaled by that step's ``s^a_{m,j} s^b_{n,j}`` and added to a
  float32 running sum in registers ("promotion"), so no tensor-core sum spans more than
  one scale block.

Hopper's FP8 ``wgmma`` reads both operands K-major: ``b`` is stored ``(N, K)`` as it comes
and handed to ``wgmma`` as the transposed view ``b_smem.T`` of shape ``(bk, bn)``. E4M3 and
E5M2 operands may be mixed. The scales are float32 vectors, transposed by the wrapper to
``(steps, M)`` and ``(steps, N)`` so that step ``j``'s scales are a contiguous row. With
``with_amax`` each program also writes the row maxima of its finite ``|y|`` and XLA
reduces those to the scalar.

Whole tiles only: the wrapper zero-pads ``M`` and ``N`` to the tile (zero codes and zero
scales add exact zeros and leave the amax unchanged) and slices the result, and ``K`` is a
multiple of the step, so every TMA copy reads and writes a whole tile. Tolerance: that of
:mod:`jaxq.kernels.fp8_gemm`. Needs JAX >= 0.12 (Mosaic GPU's interpret mode, mixed FP8
``wgmma``) and, to run compiled, a Hopper GPU (compute capability 9.0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from . import registry as R

__all__ = ["matmul", "why_not"]

BM = 64  # rows per program: one warpgroup's wgmma M
# shared memory for the scales of every K step (a Hopper block has 227 KiB; the pipeline's
# two operand stages and the output tile take up to about 80 KiB)
SCALE_SMEM = 96 * 1024


def why_not(a, b) -> str | None:
    """Why the Mosaic GPU kernel cannot multiply these operands (``None``: it can)."""
    from . import fp8_gemm as G

    mode = G._mode(a, b)
    if mode is None:
        return (f"layouts {a.layout} x {b.layout}: need tensor/per-row scales on both, "
                "1x128 blocks along K on both, or MXFP8 on both")  # fmt: skip
    if G._step(a.shape[1]) is None:
        return f"K = {a.shape[1]} is not a multiple of 32"
    steps = a.shape[1] // G._STEP[mode] if mode in G._STEP else 1
    scale_bytes = steps * (BM + 128) * 4  # every step's scales stay in shared memory
    if scale_bytes > SCALE_SMEM:
        return (f"K = {a.shape[1]}: {steps} scale steps need {scale_bytes // 1024} KiB of "
                f"shared memory, more than the {SCALE_SMEM // 1024} KiB this kernel allows")
    return None


def _tiled(cols: int, itemsize: int):
    """Shared-memory tiling and swizzle for a tile ``cols`` elements wide."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    swizzle = plgpu.find_swizzle(cols * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _body(a_gmem, b_gmem, sa_gmem, sb_gmem, y_gmem, *rest, promote, bn, bk, amax):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if amax:
        am_gmem, sa_smem, sb_smem, y_smem, am_smem = rest
    else:
        sa_smem, sb_smem, y_smem = rest
    mi, ni = lax.axis_index("m"), lax.axis_index("n")
    rows, cols = pl.ds(mi * BM, BM), pl.ds(ni * bn, bn)

    def load_scales(barrier):
        plgpu.copy_gmem_to_smem(sa_gmem.at[:, rows], sa_smem, barrier)
        plgpu.copy_gmem_to_smem(sb_gmem.at[:, cols], sb_smem, barrier)
        plgpu.barrier_wait(barrier)

    pl.run_scoped(load_scales, plgpu.Barrier(num_arrivals=2))

    def scales(j):
        sa = plgpu.load(sa_smem.at[j], layout=plgpu.Layout.WGMMA.reduce(1))
        sb = plgpu.load(sb_smem.at[j], layout=plgpu.Layout.WGMMA.reduce(0))
        return sa[:, None], sb[None, :]

    tiles = _tiled(bk, 1)
    specs = [plgpu.BlockSpec((BM, bk), lambda k: (0, k), transforms=tiles),
             plgpu.BlockSpec((bn, bk), lambda k: (0, k), transforms=tiles)]  # fmt: skip
    steps = a_gmem.shape[1] // bk
    a_rows, b_rows = a_gmem.at[rows], b_gmem.at[cols]

    if promote:  # a fresh accumulator per step, scaled into a float32 running sum

        def step(idx, a_smem, b_smem, total):
            def mma(acc):
                plgpu.wgmma(acc, a_smem, b_smem.T)  # b_smem.T: K-major B
                plgpu.wgmma_wait(0)
                return acc[...]

            part = pl.run_scoped(mma, plgpu.ACC((BM, bn), jnp.float32))
            sa, sb = scales(idx[0])
            return total + part * sa * sb

        zeros = plgpu.layout_cast(jnp.zeros((BM, bn), jnp.float32), plgpu.Layout.WGMMA)
        y = plgpu.emit_pipeline(step, grid=(steps,), in_specs=specs, max_concurrent_steps=2,
                                init_carry=zeros)(a_rows, b_rows)  # fmt: skip
    else:  # one accumulator over K, the scales applied to the tile

        def run(acc):
            def step(idx, a_smem, b_smem):
                plgpu.wgmma(acc, a_smem, b_smem.T)
                plgpu.wgmma_wait(0)

            plgpu.emit_pipeline(step, grid=(steps,), in_specs=specs,
                                max_concurrent_steps=2)(a_rows, b_rows)  # fmt: skip
            return acc[...]

        sa, sb = scales(0)
        y = pl.run_scoped(run, plgpu.ACC((BM, bn), jnp.float32)) * sa * sb
    y_smem[...] = y.astype(y_smem.dtype)
    if amax:
        ay = jnp.abs(y)
        am_smem[...] = jnp.max(jnp.where(ay < jnp.inf, ay, 0.0), axis=1)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(y_smem, y_gmem.at[rows, cols])
    if amax:
        plgpu.copy_smem_to_gmem(am_smem, am_gmem.at[mi, ni])
    plgpu.wait_smem_to_gmem(0)


def _interpret_params(interpret):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.InterpretGPUParams(uninitialized_memory="zero") if interpret else None


def matmul(a, b, out_dtype, with_amax: bool, interpret: bool, block_n: int | None = None):
    """``deq(a) · deq(b)ᵀ`` (and the finite ``max |y|``) on the Mosaic GPU kernel.

    ``a`` ``(M, K)`` and ``b`` ``(N, K)`` are FP8 or MXFP8 :class:`jaxq.QArray`\\ s that
    :func:`why_not` accepts; ``block_n``: output columns per program (a multiple of 8 up
    to 256; default 128, or 64 when that divides ``N`` and 128 does not).
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from . import fp8_gemm as G

    (m, k), n = a.shape, b.shape[0]
    mode = G._mode(a, b)
    promote = mode in G._STEP
    bk = G._STEP[mode] if promote else G._step(k)
    bn = block_n or R.dividing_tile(n, 128, 64)
    out_dtype = np.dtype(out_dtype)
    if promote:  # (steps, M) and (steps, N): step j's scales are row j
        sa, sb = G._float_scale(a).T, G._float_scale(b).T
    else:
        sa = jnp.broadcast_to(a.scale.reshape(1, -1), (1, m)).astype(jnp.float32)
        sb = jnp.broadcast_to(b.scale.reshape(1, -1), (1, n)).astype(jnp.float32)
    # whole tiles only (registry.pad_to): zero rows add zeros and leave the amax unchanged
    ac, bc = R.pad_to(a.codes, (BM, None)), R.pad_to(b.codes, (bn, None))
    sa, sb = R.pad_to(sa, (None, BM)), R.pad_to(sb, (None, bn))
    gm, gn = ac.shape[0] // BM, bc.shape[0] // bn
    out_type = [jax.ShapeDtypeStruct((gm * BM, gn * bn), out_dtype)]
    scratch = [plgpu.SMEM(sa.shape[:1] + (BM,), jnp.float32),
               plgpu.SMEM(sb.shape[:1] + (bn,), jnp.float32),
               plgpu.SMEM((BM, bn), out_dtype, transforms=_tiled(bn, out_dtype.itemsize))]
    if with_amax:  # the row maxima of each tile's finite |y|
        out_type.append(jax.ShapeDtypeStruct((gm, gn, BM), jnp.float32))
        scratch.append(plgpu.SMEM((BM,), jnp.float32))
    outs = plgpu.kernel(
        functools.partial(_body, promote=promote, bn=bn, bk=bk, amax=with_amax),
        out_type=out_type,
        scratch_types=scratch,
        grid=(gm, gn),
        grid_names=("m", "n"),
        interpret=_interpret_params(interpret),
        kernel_name=f"jaxq_fp8_{mode}",
    )(ac, bc, sa, sb)
    y = outs[0][:m, :n]
    return (y, jnp.max(outs[1])) if with_amax else y
