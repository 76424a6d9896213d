"""The W4A8 GEMM as a Pallas Mosaic GPU kernel (Hopper FP8 ``wgmma``).

:func:`jaxq.kernels.w4a8_matmul`'s product (see :mod:`jaxq.kernels.w4a8`)

.. math::

    y_{mn} = s^x_m \\sum_j s^w_{n,j} \\sum_{k \\in \\text{group } j} x_{mk}\\, c_{nk}

for E4M3 activation codes ``x`` ``(M, K)`` with a scale per tensor (or per row) and INT4
weight codes ``c`` ``(N, K)`` packed two per byte along ``K`` (code ``2i`` in the low nibble
of byte ``i``) with float32 scales per group of ``g`` (64, 128 or 256) along ``K`` or per
output row, accumulated in float32.

Every INT4 code ``c ∈ [-8, 7]`` is exactly an E4M3 value, so the weight enters the FP8
tensor cores as it is, unscaled. As in the Triton kernel the packed weight is never
unpacked in memory: the wrapper splits the activation codes into their even and odd columns
``x_e = x[:, 0::2]``, ``x_o = x[:, 1::2]`` (an activation-sized pass, FP8 bytes), so that
the low and high nibbles of byte ``i`` multiply ``x_e[:, i]`` and ``x_o[:, i]``:

.. math::

    y = x_e \\cdot \\mathrm{lo}(C)^\\top + x_o \\cdot \\mathrm{hi}(C)^\\top

One program (``plgpu.kernel`` grid point) computes a ``64 × bn`` output tile (64 is
``wgmma``'s M; decode shapes are padded to it); inside it ``plgpu.emit_pipeline`` streams,
for each step of ``2E`` weight columns along ``K``, the ``64 × E`` tiles of ``x_e`` and
``x_o``, the ``bn × E`` tile of code bytes and (grouped scales) the step's row of scales
into shared memory by TMA. Each step then

1. loads the code bytes into registers, widens them to int32, takes the nibbles apart
   with shifts and masks and sign-extends them (``((c ⊕ 8) − 8)``, -8..7); narrows them to
   int4 and converts those to E4M3 (exact) with Mosaic GPU's int4 → E4M3 conversion (a
   lookup by byte permutes). Converting through float32 instead does not lower: MLIR's
   canonicalizer folds ``int32 → float32 → E4M3`` into one ``int32 → E4M3`` conversion,
   which Mosaic GPU does not implement;
2. stores the two ``bn × E`` E4M3 planes to swizzled shared memory and multiplies them with
   ``wgmma(acc, x_e, lo.T)`` and ``wgmma(acc, x_o, hi.T)``: FP8 ``wgmma`` reads both
   operands K-major, so each plane is stored ``(N, K)`` and read through its transposed
   view, as the FP8 GEMM (:mod:`jaxq.kernels.fp8_gemm_mosaic`) reads its ``b``. The
   products of E4M3 codes and INT4 codes are exact; the tensor cores add them.

Each step's product goes to a fresh ``wgmma`` accumulator and is added to a float32 running
sum in registers ("promotion", as in the blockwise FP8 GEMM), so no tensor-core sum spans
more than one step, at most 256 products per output: Hopper's FP8 ``wgmma`` does not
accumulate at full float32 precision. With grouped scales a step is one group (``E = g/2``
bytes) and its partial sum is multiplied by the group's scales ``s^w_{n,j}`` before it is
added; with one scale per output row (``E``: 128, 64 or 32 bytes, the largest that
divides ``K / 2``) those scales multiply the float32 tile at the end, and the activation
scales ``s^x_m`` multiply it at the end in both cases. Decode shapes (one 64-row tile)
split ``K`` over extra programs (split-K: an equal number of steps each) whose scaled
float32 partial tiles XLA adds.

Whole tiles only: the wrapper zero-pads ``M`` and ``N`` to the tile (zero codes and scales
add exact zeros) and slices the result; ``E`` divides ``K / 2``, so every TMA copy reads and
writes a whole tile. The output is float32. A NaN activation code makes its output row NaN,
as in the reference. Tolerance: that of :mod:`jaxq.kernels.w4a8`. Needs JAX >= 0.12 (Mosaic
GPU's interpret mode, FP8 ``wgmma``) and, to run compiled, a Hopper GPU (compute capability
9.0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import registry as R
from .weight_only_mosaic import _split  # one split-K rule for both kernels

__all__ = ["matmul", "why_not"]

BM = 64  # rows per program: one warpgroup's wgmma M
# concurrent pipeline steps. Shared memory at most (128-byte steps, bn = 128): 3 × 32 KiB of
# operand tiles, 32 KiB of E4M3 planes and 32 KiB of output tile, about 160 KiB of a Hopper
# block's 227 KiB
MAX_STAGES = 3


def why_not(x, w) -> str | None:
    """Why the Mosaic GPU kernel cannot multiply these operands (``None``: it can), for
    operands that :func:`jaxq.kernels.w4a8_matmul` accepts."""
    from . import w4a8 as W

    if not W._x_rowwise(x):
        return f"activation layout {x.layout} (per-tensor or per-row scales)"
    if _cols(w) is None:
        return (f"weight layout {w.layout} with K = {w.shape[1]}: groups of 64/128/256 "
                "along K, or per-row scales with K a multiple of 64")  # fmt: skip
    return None


def _cols(w) -> int | None:
    """Code bytes per kernel step: one group, or for per-row scales the largest of 128, 64
    and 32 that divides ``K / 2`` (FP8 ``wgmma`` takes 32 along K at a time)."""
    if w.layout.kind == "block" and w.layout.axes == (1,):
        g = w.layout.block_size
        return g // 2 if g in (64, 128, 256) else None
    if w.layout.kind == "channel" and w.layout.axes == (0,):
        return next((s for s in (128, 64, 32) if w.codes.shape[1] % s == 0), None)
    return None


def _tiled(cols: int, itemsize: int):
    """Shared-memory tiling and swizzle for a tile ``cols`` elements wide."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    swizzle = plgpu.find_swizzle(cols * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _body(xe_gmem, xo_gmem, c_gmem, sx_gmem, sw_gmem, y_gmem, lo_smem, hi_smem, y_smem, *,
          grouped, bn, cols, per_split):  # fmt: skip
    """One ``64 × bn`` output tile over ``per_split`` steps of ``cols`` code bytes."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    mi, ni, si = lax.axis_index("m"), lax.axis_index("n"), lax.axis_index("s")
    off = si * per_split
    rows, ocols = pl.ds(mi * BM, BM), pl.ds(ni * bn, bn)
    lay = plgpu.Layout.WGMMA
    f8 = jnp.float8_e4m3fn
    xt = _tiled(cols, 1)
    specs = [plgpu.BlockSpec((BM, cols), lambda k: (0, k + off), transforms=xt)] * 2
    specs.append(plgpu.BlockSpec((bn, cols), lambda k: (0, k + off)))
    operands = [xe_gmem.at[rows], xo_gmem.at[rows], c_gmem.at[ocols]]
    if grouped:  # step k is group k: its row of scales
        specs.append(plgpu.BlockSpec((1, bn), lambda k: (k + off, 0)))
        operands.append(sw_gmem.at[:, ocols])

    def to_e4m3(c_smem):
        c = plgpu.load(c_smem, layout=lay).astype(jnp.int32)
        lo = ((c & 15) ^ 8) - 8  # sign-extended nibbles, -8..7
        hi = (((c >> 4) & 15) ^ 8) - 8
        lo_smem[...] = lo.astype(jnp.int4).astype(f8)  # exact
        hi_smem[...] = hi.astype(jnp.int4).astype(f8)
        plgpu.commit_smem()  # visible to wgmma

    def mma(acc, xe_smem, xo_smem):
        plgpu.wgmma(acc, xe_smem, lo_smem.T)  # .T: the plane read K-major
        plgpu.wgmma(acc, xo_smem, hi_smem.T)
        plgpu.wgmma_wait(0)  # before the next step overwrites the planes

    # a fresh accumulator per step, added to a float32 running sum in registers (grouped:
    # times the step's group scales)
    def step(idx, xe_smem, xo_smem, c_smem, *rest):
        *s_smem, total = rest
        to_e4m3(c_smem)

        def product(acc):
            mma(acc, xe_smem, xo_smem)
            return acc[...]

        part = pl.run_scoped(product, plgpu.ACC((BM, bn), jnp.float32))
        if grouped:
            part = part * plgpu.load(s_smem[0].at[0], layout=lay.reduce(0))[None, :]
        return total + part

    zeros = plgpu.layout_cast(jnp.zeros((BM, bn), jnp.float32), lay)
    pipeline = plgpu.emit_pipeline(step, grid=(per_split,), in_specs=specs, init_carry=zeros,
                                   max_concurrent_steps=min(MAX_STAGES, per_split))  # fmt: skip
    y = pipeline(*operands)

    def load_scales(*refs):
        # the activation scales (rows), and per-row weight scales (columns; grouped: above)
        *smem, barrier = refs
        plgpu.copy_gmem_to_smem(sx_gmem.at[0, rows], smem[0], barrier)
        if not grouped:
            plgpu.copy_gmem_to_smem(sw_gmem.at[0, ocols], smem[1], barrier)
        plgpu.barrier_wait(barrier)
        out = [plgpu.load(smem[0], layout=lay.reduce(1))[:, None]]
        if not grouped:
            out.append(plgpu.load(smem[1], layout=lay.reduce(0))[None, :])
        return tuple(out)

    scratch = [plgpu.SMEM((BM,), jnp.float32)]
    if not grouped:
        scratch.append(plgpu.SMEM((bn,), jnp.float32))
    for s in pl.run_scoped(load_scales, *scratch, plgpu.Barrier(num_arrivals=len(scratch))):
        y = y * s
    y_smem[...] = y
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(y_smem, y_gmem.at[si, rows, ocols])
    plgpu.wait_smem_to_gmem(0)


def matmul(x, w, interpret: bool, block_n: int | None = None,
           split_k: int | None = None) -> jax.Array:  # fmt: skip
    """``deq(x) · deq(w)ᵀ`` as float32 on the Mosaic GPU kernel.

    ``x`` ``(M, K)`` E4M3 and ``w`` ``(N, K)`` INT4 :class:`jaxq.QArray`\\ s that
    :func:`why_not` accepts. ``block_n``: output columns per program, 64 or 128 (otherwise:
    128, or 64 where that divides ``N`` and 128 does not); ``split_k``: at most this many
    programs per output tile along ``K`` (default: from the shapes).

    Example (interpret mode needs JAX >= 0.12):
        >>> import jax, jax.numpy as jnp, jaxq
        >>> from jaxq.kernels import registry, w4a8
        >>> x = jaxq.quantize(jax.random.normal(jax.random.key(0), (3, 256)), "e4m3")
        >>> w = jaxq.quantize(jax.random.normal(jax.random.key(1), (96, 256)), "int4",
        ...                   block_size=128)
        >>> if registry.jax_version() >= (0, 12):
        ...     y = matmul(x, w, interpret=True)
        ...     ok = bool(jnp.allclose(y, w4a8.reference(x, w), rtol=1e-5, atol=1e-4))
        ... else:
        ...     ok = True
        >>> ok
        True
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m, n, kc = x.shape[0], w.shape[0], w.codes.shape[1]
    cols = _cols(w)
    grouped = w.layout.kind == "block"
    bn = block_n if block_n in (64, 128) else R.dividing_tile(n, 128, 64)
    # even and odd activation columns: the low and high nibbles' partners
    xe, xo = x.codes[:, 0::2], x.codes[:, 1::2]
    sx = jnp.broadcast_to(x.scale.reshape(1, -1), (1, m)).astype(jnp.float32)
    sw = w.scale.T if grouped else w.scale.reshape(1, n)  # (K/g, N): a row per group
    # whole tiles only (registry.pad_to): zero rows and columns add exact zeros
    xe, xo = R.pad_to(xe, (BM, None)), R.pad_to(xo, (BM, None))
    sx = R.pad_to(sx, (None, BM))
    codes = R.pad_to(w.codes, (bn, None))
    sw = R.pad_to(sw.astype(jnp.float32), (None, bn))
    gm, gn = xe.shape[0] // BM, codes.shape[0] // bn
    total = kc // cols
    split = _split(total, gm * gn, m, split_k)
    body = functools.partial(_body, grouped=grouped, bn=bn, cols=cols,
                             per_split=total // split)  # fmt: skip
    plane = functools.partial(plgpu.SMEM, (bn, cols), jnp.float8_e4m3fn,
                              transforms=_tiled(cols, 1))  # fmt: skip
    y = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((split, gm * BM, gn * bn), jnp.float32),
        scratch_types=[plane(), plane(),
                       plgpu.SMEM((BM, bn), jnp.float32, transforms=_tiled(bn, 4))],
        grid=(gm, gn, split),
        grid_names=("m", "n", "s"),
        interpret=plgpu.InterpretGPUParams(uninitialized_memory="zero") if interpret else None,
        kernel_name="jaxq_w4a8_mosaic",
    )(xe, xo, codes, sx, sw)
    return (y[0] if split == 1 else jnp.sum(y, axis=0))[:m, :n]
