"""MXFP8 / MXFP4 / NVFP4 block quantization as a Pallas Mosaic GPU kernel.

:func:`jaxq.kernels.block_quantize`'s computation (see :mod:`jaxq.kernels.fused_quantize`):
for each block ``b`` of ``bs`` consecutive elements along the last axis of ``x``, with
``a_b = max_{i ∈ b, x_i finite} |x_i|``,

.. math::

    \\text{MX:}\\quad e_b = \\mathrm{clip}(\\lfloor \\log_2 a_b \\rfloor - e_{max}, -127, 127)
    \\ (0 \\text{ if } a_b = 0), \\quad c_i = \\mathrm{enc}(x_i \\cdot 2^{-e_b}),
    \\quad \\text{scale byte } e_b + 127

    \\text{NVFP4:}\\quad s_b = \\mathrm{E4M3}(\\min(a_b / (6 s_t), 448)), \\quad
    c_i = \\mathrm{enc}(x_i / (s_b s_t))

with ``bs = 32`` (MXFP8: E4M3 codes, MXFP4: E2M1) or 16 (NVFP4: E2M1 under the float32
tensor scale ``s_t``, which XLA computes before the kernel from the finite amax of ``x``). A
block holding a NaN or an infinity gets the NaN scale (byte 255 for E8M0, the E4M3 NaN) when
its element format cannot encode it (E2M1); MXFP8 keeps the scale and encodes NaN codes.
E2M1 codes are packed two per byte, even columns in the low nibble.

The method: a block is a *row*. ``x`` ``(M, N)`` is row-major, so the wrapper's reshape to
``(M·N/bs, bs)`` is free, and each block's amax becomes a row maximum. One program
(``plgpu.kernel`` grid point, one warpgroup) takes 128 rows:

1. TMA copies the 128 rows and the tensor scale into shared memory;
2. they are loaded into registers in a layout that gives each of the 128 threads one whole
   row, in vectors of 8 elements, so that the row maxima are reductions inside a thread;
   the amax, the poison flag (any non-finite element), the scale and the codes are computed
   there with :mod:`jaxq.quantization`'s own encoders (``encode``, ``floor_log2``,
   ``pow2``, and ``e4m3_bits`` / ``e4m3_values`` for the NVFP4 block scale, which equal
   the E4M3 conversion on its clipped range), so they equal ``jaxq.quantize`` bit for bit;
   vectors of 8 also make the E2M1 encoder's boolean intermediates whole bytes, which
   Mosaic GPU requires of a conversion;
3. for E2M1 the wrapper passes the even and the odd columns as two planes ``(M·N/bs,
   bs/2)`` (an extra pass over ``x``: Mosaic GPU has no strided register access), the
   block amax is the larger of the two planes' row maxima and the code byte is
   ``lo | hi << 4`` on int32, narrowed to a byte;
4. the code bytes go out by TMA through shared memory, or, where a row of bytes is under
   TMA's 16-byte minimum (NVFP4: 8 bytes), are stored from the registers to global memory
   directly; the scale bytes go out by TMA.

Whole tiles only: the wrapper zero-pads the rows to a multiple of 128 (a zero row is a
block of its own, so it changes no other block) and slices the codes and scales. Codes and
scales are produced as bytes and reinterpreted by XLA (a bitcast) as E4M3 codes and E8M0
or E4M3 scales. Float32 tiles are read from shared memory with a non-optimized transfer
(Mosaic GPU finds no bank-conflict-free plan for a 32-byte vector per thread); 16-bit ones
with the optimized one. Needs JAX >= 0.12 and, to run compiled, a Hopper GPU (compute
capability 9.0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jaxq import formats as F
from jaxq.quantization.cast import e4m3_bits, e4m3_values, floor_log2, pow2
from jaxq.quantization.codes import encode

from . import registry as R

__all__ = ["block_quantize", "why_not", "ROWS", "DTYPES"]

ROWS = 128  # blocks (rows) per program: one per thread of a warpgroup
DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
_VEC = 8  # elements per register vector


def why_not(x) -> str | None:
    """Why the Mosaic GPU kernel cannot quantize ``x`` (``None``: it can), for arguments
    that :func:`jaxq.kernels.fused_quantize.why_not` already accepts in general."""
    if np.dtype(x.dtype) not in DTYPES:
        return f"input dtype {np.dtype(x.dtype).name} (float32, bfloat16 or float16)"
    return None


def _row_layout(w: int):
    """Register layout of a ``(128, w)`` tile giving thread ``t`` row ``t`` (``w`` a
    multiple of 8), in vectors of 8 elements."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if w == _VEC:
        return plgpu.Layout.TILED(plgpu.Tiling(((ROWS, w), (32, w))), warp_dims=(-4,),
                                  lane_dims=(-2,), vector_dim=-1)  # fmt: skip
    return plgpu.Layout.TILED(plgpu.Tiling(((ROWS, w), (32, w), (_VEC,))), warp_dims=(-5,),
                              lane_dims=(-3,), vector_dim=-1)  # fmt: skip


def _body(*refs, fmt, planes):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    x_gmem, (t_gmem, c_gmem, s_gmem) = refs[:planes], refs[planes:planes + 3]
    x_smem, (t_smem, c_smem, s_smem) = refs[planes + 3:2 * planes + 3], refs[2 * planes + 3:]
    elem = fmt.element
    rows = pl.ds(lax.axis_index("i") * ROWS, ROWS)

    def load(barrier):
        for g, s in zip(x_gmem, x_smem, strict=True):
            plgpu.copy_gmem_to_smem(g.at[rows], s, barrier)
        plgpu.copy_gmem_to_smem(t_gmem, t_smem, barrier)
        plgpu.barrier_wait(barrier)

    pl.run_scoped(load, plgpu.Barrier(num_arrivals=planes + 1))
    layout = _row_layout(x_smem[0].shape[1])
    optimized = x_smem[0].dtype.itemsize < 4
    parts = [plgpu.load(s, layout=layout, optimized=optimized).astype(jnp.float32)
             for s in x_smem]  # fmt: skip
    mags = [jnp.abs(v) for v in parts]
    # NaN compares false, so "a < inf" is "finite": amax over finite |x|, and a flag for
    # any NaN or inf (explicit tests, independent of how max treats NaN)
    amax = functools.reduce(jnp.maximum, [jnp.max(jnp.where(a < jnp.inf, a, 0.0), axis=1)
                                          for a in mags])  # fmt: skip
    bad = functools.reduce(jnp.maximum, [jnp.max(jnp.where(a < jnp.inf, 0.0, 1.0), axis=1)
                                         for a in mags])  # fmt: skip
    poison = bad > 0.0
    if fmt.is_mx:
        e = jnp.where(amax > 0, jnp.clip(floor_log2(amax) - elem.emax, -127, 127), 0)
        codes = [encode(v * pow2(-e)[:, None], elem) for v in parts]
        scale = e + 127 if elem.has_nan else jnp.where(poison, 255, e + 127)  # FP8: NaN codes
    else:  # NVFP4: amax / (6 s_t) is finite and >= 0, clipped to E4M3's range
        s_t = t_smem[0]
        s_b = e4m3_bits(jnp.clip(amax / (elem.max * s_t), 0, F.E4M3.max)).astype(jnp.int32)
        d = e4m3_values(s_b) * s_t
        inv_d = jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0)
        codes = [encode(v * inv_d[:, None], elem) for v in parts]
        scale = jnp.where(poison, 0x7F, s_b)  # 0x7F: E4M3's NaN
    if planes == 2:
        c = (codes[0].astype(jnp.int32) | (codes[1].astype(jnp.int32) << 4)).astype(jnp.uint8)
    else:
        c = lax.bitcast_convert_type(codes[0], jnp.uint8)
    direct = c_gmem.shape[1] < 16  # a row of code bytes under TMA's 16-byte minimum
    if direct:
        c_gmem.at[rows][...] = c
    else:
        c_smem[...] = c
    s_smem[...] = scale.astype(jnp.uint8)
    plgpu.commit_smem()  # the stores above are visible to TMA
    if not direct:
        plgpu.copy_smem_to_gmem(c_smem, c_gmem.at[rows])
    plgpu.copy_smem_to_gmem(s_smem, s_gmem.at[rows])
    plgpu.wait_smem_to_gmem(0)


def block_quantize(x, fmt, s_t, interpret: bool):
    """``(codes, scale)`` of the 2-D ``x`` in the block format ``fmt`` (``N`` a multiple of
    its block), ``s_t`` the NVFP4 tensor scale (unused for MX formats).

    Example (interpret mode needs JAX >= 0.12):
        >>> import jax, jax.numpy as jnp, jaxq
        >>> from jaxq.kernels import registry
        >>> x = jax.random.normal(jax.random.key(0), (5, 64))
        >>> if registry.jax_version() >= (0, 12):
        ...     c, s = block_quantize(x, jaxq.formats.MXFP4, jnp.float32(1.0), True)
        ...     ref = jaxq.quantize(x, "mxfp4")
        ...     ok = bool((c == ref.codes).all()) and c.shape == (5, 32) and s.shape == (5, 2)
        ... else:
        ...     ok = True
        >>> ok
        True
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m, n = x.shape
    bs, per = fmt.block_size, 2 if fmt.element.bits == 4 else 1
    r = m * n // bs  # blocks, one per row
    if r == 0:  # no block: no program to run
        return (jnp.zeros((m, n // per), jnp.uint8 if per == 2 else fmt.element.dtype),
                jnp.zeros((m, n // bs), fmt.scale_format.dtype))  # fmt: skip
    if per == 2:  # even and odd columns, one row per block
        xs = [x[:, p::2].reshape(r, bs // 2) for p in (0, 1)]
    else:
        xs = [x.reshape(r, bs)]
    xs = [R.pad_to(v, (ROWS, None)) for v in xs]  # whole tiles only (registry.pad_to)
    rp, w = xs[0].shape
    codes, scale = plgpu.kernel(
        functools.partial(_body, fmt=fmt, planes=len(xs)),
        out_type=[jax.ShapeDtypeStruct((rp, w), jnp.uint8),
                  jax.ShapeDtypeStruct((rp,), jnp.uint8)],  # fmt: skip
        scratch_types=[plgpu.SMEM((ROWS, w), x.dtype) for _ in xs]
        + [plgpu.SMEM((16,), jnp.float32), plgpu.SMEM((ROWS, w), jnp.uint8),
           plgpu.SMEM((ROWS,), jnp.uint8)],  # fmt: skip
        grid=(rp // ROWS,),
        grid_names=("i",),
        interpret=plgpu.InterpretGPUParams(uninitialized_memory="zero") if interpret else None,
        kernel_name=f"jaxq_{fmt.name.lower()}_quantize_mosaic",
    )(*xs, jnp.broadcast_to(jnp.reshape(s_t, (1,)).astype(jnp.float32), (16,)))
    codes = codes[:r].reshape(m, n // per)
    if per == 1:
        codes = lax.bitcast_convert_type(codes, fmt.element.dtype)
    scale = lax.bitcast_convert_type(scale[:r].reshape(m, n // bs), fmt.scale_format.dtype)
    return codes, scale
