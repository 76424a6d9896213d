"""The weight-only GEMM as a Pallas Mosaic GPU kernel (Hopper ``wgmma``).

:func:`jaxq.kernels.weight_only_matmul`'s product (see :mod:`jaxq.kernels.weight_only`)

.. math::

    y_{mn} = \\sum_k x_{mk}\\, \\mathrm{dec}(c_{nk})\\, s_{n, \\lfloor k / g \\rfloor}

for bfloat16 or float16 activations ``x`` ``(M, K)`` and a weight of ``(N, K)`` codes
(INT4, NF4 or E2M1 packed two per byte along ``K``, code ``2j`` in the low nibble of byte
``j``, or INT8) with float32 scales per group of ``g`` (32, 64, 128 or 256) along ``K`` or
per output row, accumulated in float32.

As in the Triton kernel, the packed weight is never unpacked in memory: the wrapper splits
the activations into their even and odd columns ``x_e = x[:, 0::2]``, ``x_o = x[:, 1::2]``
(an activation-sized pass), so that the low and high nibbles of byte ``j`` multiply
``x_e[:, j]`` and ``x_o[:, j]``:

.. math::

    y = x_e \\cdot \\mathrm{lo}(C)^\\top + x_o \\cdot \\mathrm{hi}(C)^\\top

One program (``plgpu.kernel`` grid point) computes a ``64 × bn`` output tile (64 is
``wgmma``'s M; decode shapes are padded to it); inside it ``plgpu.emit_pipeline`` streams,
for each step of ``E`` weight columns along ``K``, the ``64 × E/2`` tiles of ``x_e`` and
``x_o``, the ``bn × E/2`` tile of code bytes and the step's scales into shared memory by
TMA. Each step then

1. loads the code bytes into registers, widens them to int32 and takes the nibbles apart
   with shifts and masks (INT8: the byte itself);
2. decodes them to float32 (:func:`~jaxq.kernels.weight_only.decode_nibbles`), multiplies
   them by their group's scale (a step spans one group, part of one, or several, whose
   scales are selected per column) and rounds the product once to the activation dtype;
3. stores the two dequantized ``bn × E/2`` planes to swizzled shared memory and
   accumulates ``wgmma(acc, x_e, lo.T)`` and ``wgmma(acc, x_o, hi.T)`` in float32, both
   operands in shared memory and the weight plane read K-major through its transposed
   view.

With one scale per output row the codes enter ``wgmma`` unscaled (INT4 and INT8 codes are
exact in bfloat16 and float16) and the scales multiply the float32 tile once at the end.
Decode shapes (one 64-row tile) split ``K`` over extra programs (split-K: an equal number of
steps each) whose float32 partial tiles XLA adds. A batch ``(B, M, K) × (B, N, K)`` is a
further grid axis.

Whole tiles only: the wrapper zero-pads ``M`` and ``N`` to the tile (zero codes, activations
and scales add exact zeros) and slices the result; ``E`` divides ``K``, so every TMA copy
reads and writes a whole tile. The output is float32. Tolerance: that of
:mod:`jaxq.kernels.weight_only` for bfloat16/float16 activations. Float32 activations are
left to the Triton kernel (``wgmma`` would round them to TF32), and so are MXFP4 and NVFP4
weights. Needs JAX >= 0.12 and, to run compiled, a Hopper GPU (compute capability 9.0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from . import registry as R

__all__ = ["matmul", "why_not", "FORMATS"]

BM = 64  # rows per program: one warpgroup's wgmma M
FORMATS = ("int4", "nf4", "e2m1", "int8")
_ACT = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
# concurrent pipeline steps. Shared memory at most (INT8, 128-column steps, bn = 128):
# 3 × 33 KiB of operand tiles, 32 KiB of dequantized weight and 32 KiB of output tile,
# about 165 KiB of a Hopper block's 227 KiB
MAX_STAGES = 3
SPLIT_PROGRAMS = 264  # decode: split K until about two programs per SM of an H100


def why_not(x, w, fmt_name: str) -> str | None:
    """Why the Mosaic GPU kernel cannot multiply these arguments (``None``: it can), for
    arguments that :func:`jaxq.kernels.weight_only.why_not` already accepts in general."""
    if fmt_name not in FORMATS:
        return f"{fmt_name} weights: the Triton kernel only"
    if np.dtype(x.dtype) not in _ACT:
        return (f"activation dtype {np.dtype(x.dtype).name} (bfloat16 or float16; wgmma "
                "would round float32 to TF32)")  # fmt: skip
    if _step(w) is None:
        return f"K = {w.shape[-1]} needs a multiple of {32 if w.packed else 16}"
    return None


def _step(w) -> int | None:
    """Weight columns (elements along ``K``) per kernel step, or ``None``.

    At most 128, and at least 16 activation columns per plane (``wgmma``'s K for 16-bit
    operands); a step and a scale group are powers of two, so one holds the other."""
    per_byte = 2 if w.packed else 1
    k = w.shape[-1]
    for e in (128, 64, 32, 16):
        if k % e == 0 and e // per_byte >= 16:
            return e
    return None


def _tiled(cols: int, itemsize: int):
    """Shared-memory tiling and swizzle for a tile ``cols`` elements wide."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    swizzle = plgpu.find_swizzle(cols * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _body(*refs, nx, fmt_name, group, bn, cols, rows_s, per_split, split):
    """One ``64 × bn`` output tile; ``cols``: code bytes per step and plane, ``group``: code
    bytes per scale group (``None``: per-row scales), ``rows_s``: scale rows per step."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from .weight_only import decode_nibbles

    x_gmem, (c_gmem, s_gmem, y_gmem) = refs[:nx], refs[nx:nx + 3]
    w_smem, y_smem = refs[nx + 3:nx + 3 + nx], refs[2 * nx + 3]
    mi, ni, bs = lax.axis_index("m"), lax.axis_index("n"), lax.axis_index("bs")
    bi, off = bs // split, (bs % split) * per_split
    rows, ocols = pl.ds(mi * BM, BM), pl.ds(ni * bn, bn)
    lay = plgpu.Layout.WGMMA
    xt = _tiled(cols, 2)
    specs = [plgpu.BlockSpec((BM, cols), lambda k: (0, k + off), transforms=xt)] * nx
    specs.append(plgpu.BlockSpec((bn, cols), lambda k: (0, k + off)))
    operands = [xg.at[bi, rows] for xg in x_gmem] + [c_gmem.at[bi, ocols]]
    if group is not None:
        if cols >= group:  # the step's groups: rows_s whole rows of scales
            specs.append(plgpu.BlockSpec((rows_s, bn), lambda k: (k + off, 0)))
        else:  # part of one group: its row (blocks of one row are indexed by row)
            per = group // cols
            specs.append(plgpu.BlockSpec((1, bn), lambda k: ((k + off) // per, 0)))
        operands.append(s_gmem.at[bi, :, ocols])

    def dequantize(c_smem, s_smem):
        c = plgpu.load(c_smem, layout=lay).astype(jnp.int32)
        if nx == 2:
            planes = (decode_nibbles(c & 15, fmt_name), decode_nibbles(c >> 4, fmt_name))
        else:
            planes = (c.astype(jnp.float32),)
        if s_smem is not None:
            def scale(j):
                return plgpu.load(s_smem.at[j], layout=lay.reduce(1))[:, None]

            s = scale(0)
            if cols > group:  # several groups: each column takes its group's scale
                col = plgpu.broadcasted_iota(jnp.int32, (bn, cols), 1, layout=lay)
                for j in range(1, cols // group):
                    s = jnp.where(col >= j * group, scale(j), s)
            planes = tuple(p * s for p in planes)
        for ws, p in zip(w_smem, planes, strict=True):
            ws[...] = p.astype(ws.dtype)  # the one rounding of the dequantized weight
        plgpu.commit_smem()  # visible to wgmma

    def run(acc):
        def step(idx, *tiles):
            x_smem, (c_smem, *s_smem) = tiles[:nx], tiles[nx:]
            dequantize(c_smem, s_smem[0] if s_smem else None)
            for xs, ws in zip(x_smem, w_smem, strict=True):
                plgpu.wgmma(acc, xs, ws.T)  # ws.T: the weight plane read K-major
            plgpu.wgmma_wait(0)  # before the next step overwrites the planes

        plgpu.emit_pipeline(step, grid=(per_split,), in_specs=specs,
                            max_concurrent_steps=min(MAX_STAGES, per_split))(*operands)
        return acc[...]

    y = pl.run_scoped(run, plgpu.ACC((BM, bn), jnp.float32))
    if group is None:  # per-row scales: the columns of the output tile

        def load_scales(s_smem, barrier):
            plgpu.copy_gmem_to_smem(s_gmem.at[bi, 0, ocols], s_smem, barrier)
            plgpu.barrier_wait(barrier)
            return plgpu.load(s_smem, layout=lay.reduce(0))

        s = pl.run_scoped(load_scales, plgpu.SMEM((bn,), jnp.float32),
                          plgpu.Barrier(num_arrivals=1))  # fmt: skip
        y = y * s[None, :]
    y_smem[...] = y
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(y_smem, y_gmem.at[bs, rows, ocols])
    plgpu.wait_smem_to_gmem(0)


def _split(total: int, programs: int, m: int, want: int | None) -> int:
    """Programs per output tile along ``K``: a divisor of ``total`` steps (each program runs
    the same number), at most ``want`` when given; for decode (one 64-row tile) enough to
    give about ``SPLIT_PROGRAMS`` programs, else 1."""
    if want is None:
        want = max(1, SPLIT_PROGRAMS // programs) if m <= BM else 1
    return max(d for d in range(1, min(want, total) + 1) if total % d == 0)


def matmul(x, w, fmt_name: str, interpret: bool, block_n: int | None = None,
           split_k: int | None = None) -> jax.Array:  # fmt: skip
    """``x · deq(w)ᵀ`` as float32 on the Mosaic GPU kernel.

    ``x`` ``(M, K)`` or ``(B, M, K)`` and the :class:`jaxq.QArray` ``w`` ``(N, K)`` or
    ``(B, N, K)`` are arguments that :func:`why_not` accepts. ``block_n``: output columns
    per program, 64 or 128 (otherwise: 128, or 64 where that divides ``N`` and 128 does not);
    ``split_k``: at most this many programs per output tile along ``K`` (default: from the
    shapes).

    Example (interpret mode needs JAX >= 0.12):
        >>> import jax, jax.numpy as jnp, jaxq
        >>> from jaxq.kernels import registry, weight_only
        >>> w = jaxq.quantize(jax.random.normal(jax.random.key(0), (96, 256)), "int4",
        ...                   block_size=64)
        >>> x = jax.random.normal(jax.random.key(1), (3, 256)).astype(jnp.bfloat16)
        >>> if registry.jax_version() >= (0, 12):
        ...     y = matmul(x, w, "int4", interpret=True)
        ...     ok = bool(jnp.allclose(y, weight_only.reference(x, w), atol=0.1))
        ... else:
        ...     ok = True
        >>> ok
        True
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    batched = x.ndim == 3
    if not batched:
        x, w_codes, scale = x[None], w.codes[None], w.scale[None]
    else:
        w_codes, scale = w.codes, w.scale
    nb, m, k = x.shape
    n = w_codes.shape[1]
    e = _step(w)
    packed = w.packed
    cols = e // 2 if packed else e
    group = None
    if w.layout.kind == "block":
        group = w.layout.block_size // (2 if packed else 1)  # code bytes per group
        scale = jnp.swapaxes(scale.reshape(nb, n, -1), 1, 2)  # (B, K/g, N): a row per group
    else:
        scale = scale.reshape(nb, 1, n)
    bn = block_n if block_n in (64, 128) else R.dividing_tile(n, 128, 64)
    # whole tiles only (registry.pad_to): zero rows and columns add exact zeros
    xs = (x[..., 0::2], x[..., 1::2]) if packed else (x,)
    xs = tuple(R.pad_to(xi, (None, BM, None)) for xi in xs)
    codes = R.pad_to(w_codes, (None, bn, None))
    scale = R.pad_to(scale.astype(jnp.float32), (None, None, bn))
    gm, gn = xs[0].shape[1] // BM, codes.shape[1] // bn
    total = k // e
    split = _split(total, nb * gm * gn, m, split_k)
    rows_s = max(1, cols // group) if group else 1
    body = functools.partial(
        _body, nx=len(xs), fmt_name=fmt_name, group=group, bn=bn, cols=cols, rows_s=rows_s,
        per_split=total // split, split=split,
    )  # fmt: skip
    plane = functools.partial(plgpu.SMEM, (bn, cols), x.dtype, transforms=_tiled(cols, 2))
    y = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((nb * split, gm * BM, gn * bn), jnp.float32),
        scratch_types=[plane() for _ in xs]
        + [plgpu.SMEM((BM, bn), jnp.float32, transforms=_tiled(bn, 4))],
        grid=(gm, gn, nb * split),
        grid_names=("m", "n", "bs"),
        interpret=plgpu.InterpretGPUParams(uninitialized_memory="zero") if interpret else None,
        kernel_name=f"jaxq_weight_only_{fmt_name}_mosaic",
    )(*xs, codes, scale)
    y = y.reshape(nb, split, gm * BM, gn * bn)
    y = (y[:, 0] if split == 1 else jnp.sum(y, axis=1))[:, :m, :n]
    return y if batched else y[0]
