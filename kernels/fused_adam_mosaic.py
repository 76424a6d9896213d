"""The fused 8-bit Adam update for E4M3 moments as a Pallas Mosaic GPU kernel.

:func:`jaxq.kernels.fused_adam.adam_update`'s computation for :func:`jaxq.optim.adamw_fp8`
(both moments E4M3 codes, one scale per block of ``B`` values): per element, in float32,

.. math::

    \\hat g = \\begin{cases} \\mathrm{clip}(g, \\pm 2^{63}) & |g| < \\infty \\\\
              0 & \\text{else} \\end{cases}, \\quad
    m = \\beta_1\\, \\mathrm{E4M3}^{-1}(c_m)\\, s_m + (1 - \\beta_1)\\hat g, \\quad
    v = \\beta_2\\, \\mathrm{E4M3}^{-1}(c_v)\\, s_v + (1 - \\beta_2)\\hat g^2, \\quad
    u = \\frac{m / (1 - \\beta_1^t)}{\\sqrt{v} / \\sqrt{1 - \\beta_2^t} + \\epsilon}

(``u = 0`` and the old moments kept where ``g`` is not finite), then per block
``s = round_up(max|m| / 448)`` (``max|m|`` and ``s`` below float32's smallest normal: 0)
and ``c = E4M3(clip(m · (1 / s), ±448))`` rounded to nearest even, a positive second
moment never rounded to 0. These are the operations of :mod:`jaxq.kernels.fused_adam`'s
``_block_update`` on the same helpers (``_round_up``, :func:`e4m3_values`,
:func:`e4m3_bits`), in the same order, so in interpret mode the state equals
:func:`fused_adam.reference` bit for bit (on a GPU that module's tolerance applies);
finiteness is ``|g| < inf`` (false for NaN), as Mosaic GPU lowers no ``isfinite``.

The method: a block is a *row*. The wrapper reshapes ``(rows, n)`` to ``(rows · n / B,
B)`` (free, row-major) and one program (``plgpu.kernel`` grid point, one warpgroup) takes
128 blocks, each thread one whole block, so the block maxima are reductions inside a
thread:

1. TMA copies the program's gradients, both moments' codes and scales, and the step's
   scalars into shared memory (``128 · B · (itemsize(g) + 2)`` bytes: ``B <= 256``);
2. pass one walks the block in column chunks of up to 32 (register vectors of 8), decodes
   and steps both moments and keeps the running ``max |m|``, ``max |v|``;
3. the new scales follow; pass two recomputes each chunk's moments (the same operations,
   so the same bits: two reads of shared memory instead of ``2 B`` live registers per
   thread), stores ``u`` straight from the registers to global memory and the new codes
   over the old ones in shared memory, which TMA then writes out with the scales.

A block count that is not a multiple of 128 is not padded: the last program starts 128
blocks before the end and recomputes blocks of the previous one, writing the same bits.
Fewer than 128 blocks are padded with zero blocks (a copy of under 128 blocks).

Not here: the 256-value dynamic maps of :func:`jaxq.optim.adamw_8bit`. Their decode
(``map[c]``) and nearest-code search (a bucket-table entry) are per-element table
lookups; Pallas Mosaic GPU lowers no ``gather`` and no load from a ref indexed by an
array. An exact lookup-free form (a 255-select tree to decode, 255 comparisons to encode)
lowers, but at over 1500 operations per element for the two moments against about 100
here it would trail the Triton kernel's gathers, so those maps stay with Triton
(:func:`why_not` says so). Needs JAX >= 0.12 and, to run compiled, a Hopper GPU (compute
capability 9.0); no GPU has run or timed it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jaxq import formats as F
from jaxq.quantization.cast import e4m3_bits, e4m3_values

from . import fused_adam as fa
from . import registry as R
from .block_quantize_mosaic import ROWS, _row_layout

__all__ = ["adam_update", "why_not", "ROWS", "MAX_BLOCK"]

MAX_BLOCK = 256  # 128 blocks of gradients and codes fit in shared memory
_CHUNK = 32  # columns per step of a pass (thread t holds row t, in vectors of 8)
_E4M3_MAX = np.float32(F.E4M3.max)
_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


def why_not(g, m_scale, m_map, v_map) -> str | None:
    """Why this kernel cannot run the update (``None``: it can), for operands that
    :func:`jaxq.kernels.fused_adam.why_not` accepts in general."""
    for name, spec in (("m_map", m_map), ("v_map", v_map)):
        if spec != "e4m3":
            return (f"{name} is a 256-value map: its decode and nearest-code search are "
                    "per-element table lookups, and Pallas Mosaic GPU lowers no gather "
                    "(nor a load indexed by an array)")  # fmt: skip
    bs = g.shape[1] // max(m_scale.shape[1], 1)
    if bs > MAX_BLOCK:
        return (f"block size {bs} > {MAX_BLOCK}: {ROWS} blocks of gradients and codes do not "
                "fit in shared memory")  # fmt: skip
    if np.dtype(g.dtype) not in _DTYPES:
        return f"gradient dtype {np.dtype(g.dtype).name} (float32, bfloat16 or float16)"
    return None


def _load(ref, layout):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    # no bank-conflict-free plan exists for a 32-byte vector per thread: 32-bit unoptimized
    return plgpu.load(ref, layout=layout, optimized=ref.dtype.itemsize < 4)


def _chunk(h, g, mc, ma, vc, va):
    """``_block_update``'s step on one chunk: ``(m, v, u)`` with the non-finite rule."""
    b1, c1, b2, c2, bc1, bc2_sqrt, eps = h
    g32 = g.astype(jnp.float32)
    finite = jnp.abs(g32) < np.float32(np.inf)  # false for NaN and ±inf
    g32 = jnp.where(finite, jnp.clip(g32, -fa._GRAD_LIMIT, fa._GRAD_LIMIT), 0.0)
    m0 = e4m3_values(mc) * ma[:, None]
    v0 = e4m3_values(vc) * va[:, None]
    m = b1 * m0 + c1 * g32
    v = b2 * v0 + c2 * (g32 * g32)
    u = (m / bc1) / (jnp.sqrt(v) / bc2_sqrt + eps)
    return jnp.where(finite, m, m0), jnp.where(finite, v, v0), jnp.where(finite, u, 0.0)


def _scale(amax, dtype):
    """``_encode``'s E4M3 block scale from ``max |x|``: ``(stored scale, 1 / scale)``."""
    a = jnp.where(amax >= fa._TINY, amax, 0.0) / _E4M3_MAX
    a = fa._round_up(jnp.where(a >= fa._TINY, a, 0.0), dtype)
    return a, 1.0 / jnp.where(a > 0, a.astype(jnp.float32), 1.0)


def _codes(x, inv, keep_nonzero: bool):
    y = jnp.clip(x * inv[:, None], -_E4M3_MAX, _E4M3_MAX)
    bits = e4m3_bits(y)
    if keep_nonzero:  # the second moment never rounds a positive value to 0 (on int32:
        b = bits.astype(jnp.int32)  # Mosaic GPU does no 8-bit arithmetic)
        bits = jnp.where((b == 0) & (y > 0), 1, b).astype(jnp.uint8)
    return bits


def _body(h_gmem, g_gmem, mc_gmem, ms_gmem, vc_gmem, vs_gmem, u_gmem, mc_out, ms_out,
          vc_out, vs_out, h_smem, g_smem, mc_smem, ms_smem, vc_smem, vs_smem, *,
          n_blocks):  # fmt: skip
    from jax.experimental.pallas import mosaic_gpu as plgpu

    start = jnp.minimum(lax.axis_index("i") * ROWS, n_blocks - ROWS)
    rows = pl.ds(start, ROWS)
    ins = ((g_gmem, g_smem), (mc_gmem, mc_smem), (ms_gmem, ms_smem), (vc_gmem, vc_smem),
           (vs_gmem, vs_smem))  # fmt: skip

    def load(barrier):
        plgpu.copy_gmem_to_smem(h_gmem, h_smem, barrier)
        for src, dst in ins:
            plgpu.copy_gmem_to_smem(src.at[rows], dst, barrier)
        plgpu.barrier_wait(barrier)

    pl.run_scoped(load, plgpu.Barrier(num_arrivals=len(ins) + 1))
    bs = g_smem.shape[1]
    w = min(bs, _CHUNK)
    layout = _row_layout(w)
    h = tuple(h_smem[k] for k in range(fa._N_HYPER - 1))
    ma = _load(ms_smem, layout.reduce(1)).astype(jnp.float32)
    va = _load(vs_smem, layout.reduce(1)).astype(jnp.float32)

    def chunk(c):
        cols = pl.ds(c * w, w)
        return _chunk(h, _load(g_smem.at[:, cols], layout), _load(mc_smem.at[:, cols], layout),
                      ma, _load(vc_smem.at[:, cols], layout), va)  # fmt: skip

    m_max = v_max = None
    for c in range(bs // w):  # pass one: the block maxima
        m, v, _ = chunk(c)
        mm, vm = jnp.max(jnp.abs(m), axis=1), jnp.max(jnp.abs(v), axis=1)
        m_max = mm if m_max is None else jnp.maximum(m_max, mm)
        v_max = vm if v_max is None else jnp.maximum(v_max, vm)
    ms, m_inv = _scale(m_max, ms_smem.dtype)
    vs, v_inv = _scale(v_max, vs_smem.dtype)
    for c in range(bs // w):  # pass two: the update and the codes
        m, v, u = chunk(c)
        cols = pl.ds(c * w, w)
        plgpu.store(u_gmem.at[rows, cols], u, optimized=False)
        mc_smem[:, cols] = _codes(m, m_inv, keep_nonzero=False)
        vc_smem[:, cols] = _codes(v, v_inv, keep_nonzero=True)
    ms_smem[...] = ms
    vs_smem[...] = vs
    plgpu.commit_smem()  # the stores above are visible to TMA
    for dst, src in ((mc_out, mc_smem), (ms_out, ms_smem), (vc_out, vc_smem), (vs_out, vs_smem)):
        plgpu.copy_smem_to_gmem(src, dst.at[rows])
    plgpu.wait_smem_to_gmem(0)


def adam_update(g, m_codes, m_scale, v_codes, v_scale, hyper, *, interpret: bool):
    """:func:`jaxq.kernels.fused_adam.adam_update` for two E4M3 moments (operands already
    checked there): ``(u, m_codes, m_scale, v_codes, v_scale)``.

    Example (interpret mode needs JAX >= 0.12):
        >>> import jax, jax.numpy as jnp
        >>> from jaxq.kernels import fused_adam, registry
        >>> g = jax.random.normal(jax.random.key(0), (3, 512))
        >>> codes, scale = jnp.zeros((3, 512), jnp.uint8), jnp.zeros((3, 2), jnp.float32)
        >>> args = (g, codes, scale, codes, scale, fused_adam.hyperparameters(.9, .999, 1e-8, 1))
        >>> kw = dict(m_map="e4m3", v_map="e4m3")
        >>> if registry.jax_version() >= (0, 12):
        ...     got = adam_update(*args, interpret=True)
        ...     ref = fused_adam.reference(*args, **kw)
        ...     ok = all(bool((a == b).all()) for a, b in zip(got[1:], ref[1:]))
        ... else:
        ...     ok = True
        >>> ok
        True
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    rows, n = g.shape
    nb = m_scale.shape[1]
    bs = n // nb
    r = rows * nb  # blocks, one per kernel row
    blocks = lambda x: R.pad_to(x.reshape(r, bs), (ROWS, None))  # noqa: E731
    flat = lambda s: R.pad_to(s.reshape(r), (ROWS,))  # noqa: E731
    args = (blocks(g), blocks(m_codes), flat(m_scale), blocks(v_codes), flat(v_scale))
    rp = max(r, ROWS)  # fewer than ROWS blocks: padded to ROWS; more: programs overlap
    f32 = jnp.promote_types(g.dtype, jnp.float32)
    outs = plgpu.kernel(
        functools.partial(_body, n_blocks=rp),
        out_type=[jax.ShapeDtypeStruct((rp, bs), f32),
                  jax.ShapeDtypeStruct((rp, bs), jnp.uint8),
                  jax.ShapeDtypeStruct((rp,), m_scale.dtype),
                  jax.ShapeDtypeStruct((rp, bs), jnp.uint8),
                  jax.ShapeDtypeStruct((rp,), v_scale.dtype)],  # fmt: skip
        scratch_types=[plgpu.SMEM((fa._N_HYPER,), jnp.float32), plgpu.SMEM((ROWS, bs), g.dtype),
                       plgpu.SMEM((ROWS, bs), jnp.uint8), plgpu.SMEM((ROWS,), m_scale.dtype),
                       plgpu.SMEM((ROWS, bs), jnp.uint8), plgpu.SMEM((ROWS,), v_scale.dtype)],
        grid=(pl.cdiv(rp, ROWS),),
        grid_names=("i",),
        interpret=plgpu.InterpretGPUParams(uninitialized_memory="zero") if interpret else None,
        kernel_name="jaxq_adam_update_e4m3_mosaic",
    )(hyper.reshape(fa._N_HYPER).astype(jnp.float32), *args)
    u, mc, ms, vc, vs = (o[:r] for o in outs)
    full, per_block = (rows, n), (rows, nb)
    return (u.reshape(full), mc.reshape(full), ms.reshape(per_block), vc.reshape(full),
            vs.reshape(per_block))  # fmt: skip
