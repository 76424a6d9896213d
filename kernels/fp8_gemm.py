"""Scaled FP8 GEMM: per-row × per-column scales, 1×128 × 128×128 block scales, or MXFP8.

For FP8 operands ``a`` ``(M, K)`` and ``b`` ``(N, K)`` (:class:`jaxq.QArray`\\ s of E4M3 or
E5M2 codes, contraction last) the product is

.. math::

    y_{mn} = \\sum_{j} s^a_{m,j}\\, s^b_{n,j} \\sum_{k \\in \\text{block } j}
             a_{mk} b_{nk}

* rowwise: tensor or per-row scales on both sides (one "block" spanning ``K``): the codes
  are multiplied by the FP8 tensor cores and the scales applied once to the output;
* blockwise (DeepSeek-V3): ``a`` blocked 1×128 along ``K`` (scale ``(M, K/128)``) and
  ``b`` blocked along ``K`` in 128s with scale ``(N, K/128)`` — a 128×128 weight block is
  this layout with the scale repeated over its 128 rows, as :mod:`jaxq.ops` stores it
  (:func:`expand_block_scales` turns a ``(N/128, K/128)`` scale into it). Each 128-wide
  partial product leaves the tensor cores in float32 and is scaled and added to a float32
  accumulator ("promotion"), so no FP8 partial sum spans more than 128 terms;
* mx: MXFP8 on both sides (E4M3 codes, one E8M0 scale per 32 along ``K``): as blockwise
  with 32-wide steps, the FP8 tensor cores' smallest ``K``. This is how a Hopper GPU,
  which has no block-scaled MMA, multiplies MX operands; the scales ``2^e`` enter as
  float32 (``2^-127`` is subnormal there, and a GPU may flush it to zero).

The output is ``out_dtype`` (float32 or bfloat16); ``with_amax=True`` also returns
``max |y|`` over the finite float32 outputs, computed in the same kernel (for delayed
scaling of the next quantization).

Tolerance: products of two FP8 values are exact in float32; only summation order and the
scaling of partial sums differ from the reference, so
``|y - y_ref| <= 1e-5 · Σ_k |a_{mk} b_{nk}|`` (float32 output; ``2^-8`` relative for
bfloat16 output).

Example:
    >>> import jax, jax.numpy as jnp, jaxq
    >>> from jaxq.kernels import scaled_fp8_matmul
    >>> a = jaxq.quantize(jax.random.normal(jax.random.key(0), (8, 256)), "e4m3",
    ...                   block_size=128)
    >>> b = jaxq.quantize(jax.random.normal(jax.random.key(1), (40, 256)), "e4m3",
    ...                   block_size=128)
    >>> y, amax = scaled_fp8_matmul(a, b, with_amax=True, implementation="pallas",
    ...                             interpret=True)
    >>> y.shape, bool(jnp.allclose(amax, jnp.abs(y).max()))
    ((8, 40), True)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxq import formats as F
from jaxq.quantization.cast import e8m0_values
from jaxq.quantization.qarray import QArray

from . import registry as R

__all__ = ["scaled_fp8_matmul", "reference", "expand_block_scales", "Config", "why_not",
           "kernel_for"]

_FP8 = (F.E4M3, F.E5M2)
_STEP = {"blockwise": 128, "mx": 32}
_OUT = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16))


Config = R.GemmConfig  # tiling of the Triton kernel


def expand_block_scales(scale: jax.Array, n: int, block: int = 128) -> jax.Array:
    """A ``(ceil(N/block), K/block)`` 2-D block scale as the ``(N, K/block)`` per-row
    scale the kernel (and :class:`jaxq.QArray`'s block layout) uses.

    Example:
        >>> import jax.numpy as jnp
        >>> expand_block_scales(jnp.array([[1.0, 2.0], [3.0, 4.0]]), 200).shape
        (200, 2)
    """
    return jnp.repeat(scale, block, axis=0)[:n]


def _finite_amax(y: jax.Array) -> jax.Array:
    return jnp.max(jnp.where(jnp.isfinite(y), jnp.abs(y), 0.0), initial=0.0)


def reference(a: QArray, b: QArray, *, out_dtype=jnp.float32, with_amax: bool = False):
    """The dequantized product in float32 at the highest precision (the XLA path)."""
    y = R.dequantized_product(a, b)
    out = y.astype(out_dtype)
    return (out, _finite_amax(y)) if with_amax else out


def _mode(a: QArray, b: QArray) -> str | None:
    """``"rowwise"``, ``"blockwise"``, ``"mx"`` or ``None`` (no kernel for these layouts)."""

    def rowwise(q):
        return q.fmt in _FP8 and (q.layout.kind == "tensor" or (
            q.layout.kind == "channel" and q.layout.axes == (0,)))  # fmt: skip

    def blocked(q, size):
        return q.layout.kind == "block" and q.layout.axes == (1,) and q.layout.block_size == size

    if rowwise(a) and rowwise(b):
        return "rowwise"
    if a.fmt in _FP8 and b.fmt in _FP8 and blocked(a, 128) and blocked(b, 128):
        return "blockwise"
    if a.fmt == F.MXFP8 and b.fmt == F.MXFP8 and blocked(a, 32) and blocked(b, 32):
        return "mx"
    return None


def _float_scale(q: QArray) -> jax.Array:
    """A QArray's scale as float32 (an E8M0 scale as the power of two it encodes; NaN for
    the NaN code)."""
    if q.fmt == F.MXFP8:
        return e8m0_values(jax.lax.bitcast_convert_type(q.scale, jnp.uint8))
    return q.scale.astype(jnp.float32)


def _check_args(a, b, out_dtype) -> None:
    for name, q in (("a", a), ("b", b)):
        if not isinstance(q, QArray):
            raise TypeError(f"scaled_fp8_matmul: {name} must be a jaxq.QArray, got "
                            f"{type(q).__name__}")  # fmt: skip
        if (q.fmt not in _FP8 and q.fmt != F.MXFP8) or q.ndim != 2:
            raise ValueError(f"scaled_fp8_matmul: {name} must be a 2-D E4M3/E5M2 or MXFP8 "
                             f"QArray, got {q.fmt.name} of shape {q.shape}")  # fmt: skip
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"scaled_fp8_matmul: a has shape {a.shape} and b {b.shape}; expected "
                         "the same contraction size K (last axis of both)")  # fmt: skip
    if np.dtype(out_dtype) not in _OUT:
        raise ValueError(f"scaled_fp8_matmul: out_dtype must be float32 or bfloat16, got "
                         f"{np.dtype(out_dtype)}")  # fmt: skip


def _step(k: int) -> int | None:
    return next((s for s in (128, 64, 32) if k % s == 0), None)


def why_not(impl: R.Implementation, a: QArray, b: QArray, *, interpret=False) -> str | None:
    """Why ``impl`` cannot multiply these operands here (``None``: it can)."""
    if impl.name == "mosaic_gpu":
        from . import fp8_gemm_mosaic

        return fp8_gemm_mosaic.why_not(a, b) or R.check_mosaic_gpu(impl, 9.0, interpret)
    reason = R.check_triton(impl, 8.9, interpret)
    if reason:
        return reason
    if _mode(a, b) is None:
        return (f"layouts {a.layout} x {b.layout}: need tensor/per-row scales on both, "
                "1x128 blocks along K on both, or MXFP8 on both")  # fmt: skip
    if _step(a.shape[1]) is None:
        return f"K = {a.shape[1]} is not a multiple of 32"
    if _mode(a, b) == "mx" and not interpret and (R.gpu_compute_capability() or 0) >= 10:
        return "MXFP8 on compute capability >= 10: jax.nn.scaled_matmul (cuDNN) takes it"
    return None


def _kernel(a_ref, b_ref, sa_ref, sb_ref, *out_refs, blockwise, step, m, n):
    o_ref = out_refs[0]
    bm, bn = o_ref.shape
    dims = (((1,), (1,)), ((), ()))

    def body(i, acc):
        a = a_ref[:, pl.ds(i * step, step)]
        b = b_ref[:, pl.ds(i * step, step)]
        part = jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
        if blockwise:  # promote each step-wide partial sum to the float32 accumulator
            part = part * sa_ref[:, pl.ds(i, 1)] * sb_ref[pl.ds(i, 1), :]
        return acc + part

    acc = jax.lax.fori_loop(0, a_ref.shape[1] // step, body, jnp.zeros((bm, bn), jnp.float32))
    if not blockwise:
        acc = acc * sa_ref[...] * sb_ref[...]
    o_ref[...] = acc.astype(o_ref.dtype)
    if len(out_refs) == 2:
        rows = pl.program_id(0) * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
        cols = pl.program_id(1) * bn + jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 1)
        keep = (rows < m) & (cols < n) & (jnp.abs(acc) < jnp.inf)
        tile = jnp.max(jnp.where(keep, jnp.abs(acc), 0.0))
        out_refs[1][...] = jnp.full(out_refs[1].shape, tile, jnp.float32)


def _triton(a: QArray, b: QArray, out_dtype, with_amax, cfg: Config, interpret: bool):
    from jax.experimental.pallas import triton as plt

    (m, k), n = a.shape, b.shape[0]
    mode = _mode(a, b)
    blockwise = mode in _STEP
    step = _STEP[mode] if blockwise else _step(k)
    bm = cfg.block_m or (16 if m <= 16 else 64)
    bn = cfg.block_n or R.dividing_tile(n, 64 if m <= 16 else 128)
    gm, gn = pl.cdiv(m, bm), pl.cdiv(n, bn)
    if blockwise:
        sa, sb = _float_scale(a), _float_scale(b).T  # (M, K/step), (K/step, N)
    else:
        sa = jnp.broadcast_to(a.scale.reshape(-1, 1), (m, 1))
        sb = jnp.broadcast_to(b.scale.reshape(1, -1), (1, n))
    # whole tiles only (registry.pad_to); the kernel masks the padding out of the amax
    ac, sa = R.pad_to(a.codes, (bm, None)), R.pad_to(sa, (bm, None))
    bc, sb = R.pad_to(b.codes, (bn, None)), R.pad_to(sb, (None, bn))
    sa_spec = pl.BlockSpec((bm, sa.shape[1]), lambda i, j: (i, 0))
    sb_spec = pl.BlockSpec((sb.shape[0], bn), lambda i, j: (0, j))
    out_shape = [jax.ShapeDtypeStruct((gm * bm, gn * bn), out_dtype)]
    out_specs = [pl.BlockSpec((bm, bn), lambda i, j: (i, j))]
    if with_amax:  # one float32 per tile, padded to a 16x16 block for the Triton backend
        out_shape.append(jax.ShapeDtypeStruct((gm * 16, gn * 16), jnp.float32))
        out_specs.append(pl.BlockSpec((16, 16), lambda i, j: (i, j)))
    kernel = functools.partial(_kernel, blockwise=blockwise, step=step, m=m, n=n)
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(gm, gn),
        in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                  pl.BlockSpec((bn, k), lambda i, j: (j, 0)), sa_spec, sb_spec],  # fmt: skip
        out_specs=out_specs,
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"jaxq_fp8_{mode}",
    )(ac, bc, sa.astype(jnp.float32), sb.astype(jnp.float32))
    if with_amax:
        return outs[0][:m, :n], jnp.max(outs[1])
    return outs[0][:m, :n]


def kernel_for(a, b, *, interpret: bool = False,
               modes=("rowwise", "blockwise", "mx")) -> str | None:  # fmt: skip
    """The Pallas implementation ``scaled_fp8_matmul(a, b, interpret=interpret)`` would
    run here for scale layouts in ``modes`` (``"rowwise"``, ``"blockwise"``, ``"mx"``), or
    ``None``.
    Never raises for unsupported arguments."""
    def check():
        _check_args(a, b, jnp.float32)
        if _mode(a, b) not in modes:
            raise ValueError(f"scale layouts {a.layout} x {b.layout} are not in {modes}")

    return R.pallas_for("scaled_fp8_matmul", check,
                        lambda i: why_not(i, a, b, interpret=interpret))  # fmt: skip


def scaled_fp8_matmul(
    a: QArray,
    b: QArray,
    *,
    out_dtype=jnp.float32,
    with_amax: bool = False,
    implementation: str | None = None,
    interpret: bool = False,
    config: Config | None = None,
):
    """``deq(a) · deq(b)ᵀ`` of two FP8 QArrays (module docstring).

    Args:
        a: ``(M, K)`` E4M3/E5M2 QArray, per-tensor/per-row scales or 1×128 blocks along K,
            or an MXFP8 QArray.
        b: ``(N, K)`` E4M3/E5M2 QArray with the matching kind of scales.
        out_dtype: float32 or bfloat16.
        with_amax: also return the finite ``max |y|`` (float32 scalar).
        implementation: ``None``, ``"pallas"``, ``"mosaic_gpu"`` (Hopper GPU, JAX >= 0.12,
            :mod:`~jaxq.kernels.fp8_gemm_mosaic`), ``"triton"`` or ``"xla"``.
        interpret: run the Pallas kernel in interpret mode.
        config: tiling of the Triton kernel (``block_n`` also of the Mosaic GPU kernel).

    Returns:
        ``y`` of shape ``(M, N)``, or ``(y, amax)``.

    Raises:
        TypeError: an operand is not a QArray.
        ValueError: non-FP8 or non-2-D operands, different ``K``, a bad ``out_dtype``, or
            an ``implementation`` that cannot run here.
    """
    _check_args(a, b, out_dtype)
    impl = R.choose("scaled_fp8_matmul", implementation,
                    lambda i: why_not(i, a, b, interpret=interpret))  # fmt: skip
    if impl == "xla":
        return reference(a, b, out_dtype=out_dtype, with_amax=with_amax)
    if impl == "mosaic_gpu":
        from . import fp8_gemm_mosaic

        block_n = config.block_n if config else None
        return fp8_gemm_mosaic.matmul(a, b, out_dtype, with_amax, interpret, block_n)
    return _triton(a, b, np.dtype(out_dtype), with_amax, config or Config(), interpret)


R.register(R.Kernel(
    name="scaled_fp8_matmul",
    module=__name__,
    reference=reference,
    implementations=(
        R.Implementation("mosaic_gpu", ("gpu",), "NVIDIA GPU, compute capability >= 9.0 "
                         "(Hopper wgmma), JAX >= 0.12; K a multiple of 32 (rowwise, MXFP8) "
                         "or 128 (blockwise)"),
        R.Implementation("triton", ("gpu",), "NVIDIA GPU, compute capability >= 8.9 (FP8 "
                         "tensor cores); K a multiple of 32 (rowwise, MXFP8) or 128 "
                         "(blockwise)"),
        R.XLA,
    ),
    tolerance="1e-5 · Σ|a·b| (float32 out), 2^-8 · Σ|a·b| (bfloat16 out)",
))  # fmt: skip
