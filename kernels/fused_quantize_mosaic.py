"""FP8 cast-transpose with amax as a Pallas Mosaic GPU kernel.

:func:`jaxq.kernels.cast_transpose`'s computation (see :mod:`jaxq.kernels.fused_quantize`)

.. math::

    c = \\mathrm{fp8}(x / s), \\quad c^\\top, \\quad
    a_x = \\max_{x_{ij}\\ \\mathrm{finite}} |x_{ij}|

with one program (``plgpu.kernel`` grid point) per ``b × b`` tile of ``x``:

1. TMA copies the tile of ``x`` and the scale into shared memory;
2. the codes are computed in registers with :mod:`jaxq.quantization`'s encoder (so they
   equal ``jaxq.quantize`` bit for bit), stored as bytes into a swizzled shared-memory tile
   and copied by TMA to tile ``(i, j)`` of the codes;
3. the transpose: Mosaic GPU lowers neither a register transpose nor a store through a
   transposed shared-memory view of 8-bit data on Hopper, so the tensor cores transpose
   the bytes. The code bytes, read as int8, are the K-major ``B`` of an int8 ``wgmma``
   whose ``A`` is the ``b × b`` identity: ``I · Cᵀ`` accumulates in int32 one product
   ``1 · c`` and zeros per element, which is exact for every bit pattern (NaN and inf
   codes included, which a float MMA would spread). The int32 result, narrowed back to
   bytes, is tile ``(j, i)`` of the transposed codes;
4. the row maxima of the tile's finite ``|x|`` go to a small output that XLA reduces.

Whole tiles only: the wrapper zero-pads ``x`` to the tile (a zero adds nothing to the
amax) and slices the codes, so every TMA copy reads and writes a whole tile. The codes are
written as int8 and reinterpreted as FP8 by XLA (a bitcast). Needs JAX >= 0.12 and, to run
compiled, a Hopper GPU (compute capability 9.0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxq.quantization.codes import encode

from . import registry as R

__all__ = ["cast_transpose", "BLOCKS"]

BLOCKS = (64, 128)  # square tiles: a multiple of wgmma's M (64), at most its N (256)


def _tiled(cols: int, itemsize: int):
    """Shared-memory tiling and swizzle for a tile ``cols`` elements wide."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    swizzle = plgpu.find_swizzle(cols * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _body(x_gmem, s_gmem, c_gmem, ct_gmem, a_gmem, x_smem, s_smem, c_smem, ct_smem, e_smem,
          a_smem, *, fmt, b):  # fmt: skip
    from jax.experimental.pallas import mosaic_gpu as plgpu

    i, j = lax.axis_index("i"), lax.axis_index("j")
    rows, cols = pl.ds(i * b, b), pl.ds(j * b, b)

    def load(barrier):
        plgpu.copy_gmem_to_smem(x_gmem.at[rows, cols], x_smem, barrier)
        plgpu.copy_gmem_to_smem(s_gmem, s_smem, barrier)
        plgpu.barrier_wait(barrier)

    pl.run_scoped(load, plgpu.Barrier(num_arrivals=2))
    x = plgpu.load(x_smem, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
    codes = encode(x / s_smem[0], fmt)
    c_smem[...] = lax.bitcast_convert_type(codes, jnp.int8)
    r = plgpu.broadcasted_iota(jnp.int32, (b, b), 0, layout=plgpu.Layout.WGMMA)
    k = plgpu.broadcasted_iota(jnp.int32, (b, b), 1, layout=plgpu.Layout.WGMMA)
    e_smem[...] = (r == k).astype(jnp.int8)
    ax = jnp.abs(x)
    a_smem[...] = jnp.max(jnp.where(ax < jnp.inf, ax, 0.0), axis=1)
    plgpu.commit_smem()  # the stores above are visible to wgmma and TMA

    def transpose(acc):
        plgpu.wgmma(acc, e_smem, c_smem.T)  # I · Cᵀ, exact in int32
        plgpu.wgmma_wait(0)
        ct_smem[...] = acc[...].astype(jnp.int8)

    pl.run_scoped(transpose, plgpu.ACC((b, b), jnp.int32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(c_smem, c_gmem.at[rows, cols])
    plgpu.copy_smem_to_gmem(ct_smem, ct_gmem.at[cols, rows])
    plgpu.copy_smem_to_gmem(a_smem, a_gmem.at[i, j])
    plgpu.wait_smem_to_gmem(0)


def cast_transpose(x, fmt, s, interpret: bool, block: int = 64):
    """``(codes, codesᵀ, finite max |x|)`` of the 2-D ``x`` under the scalar scale ``s``.

    Example (interpret mode needs JAX >= 0.12):
        >>> import jax, jax.numpy as jnp, jaxq
        >>> from jaxq.kernels import registry
        >>> x = jax.random.normal(jax.random.key(0), (70, 100))
        >>> if registry.jax_version() >= (0, 12):
        ...     c, ct, a = cast_transpose(x, jaxq.formats.E4M3, jnp.float32(0.01), True)
        ...     ok = bool((ct == c.T).all()) and float(a) == float(jnp.abs(x).max())
        ... else:
        ...     ok = True
        >>> ok
        True
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if block not in BLOCKS:
        raise ValueError(f"cast_transpose: the Mosaic GPU tile must be one of {BLOCKS}, "
                         f"got {block}")  # fmt: skip
    m, n = x.shape
    xp = R.pad_to(x, (block, block))  # whole tiles only (registry.pad_to)
    gm, gn = xp.shape[0] // block, xp.shape[1] // block
    byte_tile = functools.partial(plgpu.SMEM, (block, block), jnp.int8,
                                  transforms=_tiled(block, 1))  # fmt: skip
    codes, codes_t, rows = plgpu.kernel(
        functools.partial(_body, fmt=fmt, b=block),
        out_type=[jax.ShapeDtypeStruct(xp.shape, jnp.int8),
                  jax.ShapeDtypeStruct(xp.shape[::-1], jnp.int8),
                  jax.ShapeDtypeStruct((gm, gn, block), jnp.float32)],  # fmt: skip
        scratch_types=[plgpu.SMEM((block, block), x.dtype), plgpu.SMEM((16,), jnp.float32),
                       byte_tile(), byte_tile(), byte_tile(),
                       plgpu.SMEM((block,), jnp.float32)],  # fmt: skip
        grid=(gm, gn),
        grid_names=("i", "j"),
        interpret=plgpu.InterpretGPUParams(uninitialized_memory="zero") if interpret else None,
        kernel_name="jaxq_cast_transpose",
    )(xp, jnp.broadcast_to(jnp.reshape(s, (1,)).astype(jnp.float32), (16,)))
    codes = lax.bitcast_convert_type(codes[:m, :n], fmt.dtype)
    codes_t = lax.bitcast_convert_type(codes_t[:n, :m], fmt.dtype)
    return codes, codes_t, jnp.max(rows)
