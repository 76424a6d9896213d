"""W4A8 GEMM (FireQ): packed INT4 weights times FP8 E4M3 activations.

For activations quantized to E4M3 with one scale ``s_x`` (per tensor, or per row) and an
INT4 :class:`jaxq.QArray` weight ``(N, K)`` packed two per byte along ``K`` with a scale
per output channel or per group of ``g`` along ``K``:

.. math::

    y_{mn} = s^x_m \\sum_j s^w_{n,j} \\sum_{k \\in \\text{group } j} x_{mk}\\, c_{nk}

Every INT4 code ``c ∈ [-8, 7]`` is exactly an E4M3 value, so the kernel widens the
nibbles to E4M3 in registers and multiplies them with the FP8 activations on the FP8
tensor cores (exact products, float32 accumulation); group scales multiply each group's
float32 partial sum, the activation scale the output. The activations are split into even
and odd columns (as in :mod:`jaxq.kernels.weight_only`) so the packed bytes are used as
stored.

On Hopper with JAX >= 0.12 a Pallas Mosaic GPU kernel (:mod:`jaxq.kernels.w4a8_mosaic`:
the same method on ``wgmma``, with a fresh accumulator per group) comes first; the Triton
kernel runs elsewhere (compute capability >= 8.9).

Tolerance: ``|y - y_ref| <= 1e-5 · Σ_k |x_{mk} w_{nk}|`` (float32 output).

Example:
    >>> import jax, jax.numpy as jnp, jaxq
    >>> from jaxq.kernels import w4a8_matmul
    >>> x = jaxq.quantize(jax.random.normal(jax.random.key(0), (4, 256)), "e4m3")
    >>> w = jaxq.quantize(jax.random.normal(jax.random.key(1), (48, 256)), "int4",
    ...                   block_size=128)
    >>> y = w4a8_matmul(x, w, implementation="pallas", interpret=True)
    >>> ref = w4a8_matmul(x, w, implementation="xla")
    >>> y.shape, bool(jnp.allclose(y, ref, rtol=1e-5, atol=1e-4))
    ((4, 48), True)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxq import formats as F
from jaxq.quantization.qarray import QArray

from . import registry as R

__all__ = ["w4a8_matmul", "reference", "Config", "why_not", "kernel_for"]


Config = R.GemmConfig  # tiling of the Triton kernel


def reference(x: QArray, w: QArray) -> jax.Array:
    """The dequantized product in float32 at the highest precision (the XLA path)."""
    return R.dequantized_product(x, w)


def _check_args(x, w) -> None:
    for name, q in (("x", x), ("w", w)):
        if not isinstance(q, QArray):
            raise TypeError(f"w4a8_matmul: {name} must be a jaxq.QArray, got {type(q).__name__}")
    if x.fmt != F.E4M3 or x.ndim != 2:
        raise ValueError(f"w4a8_matmul: x must be a 2-D E4M3 QArray, got {x.fmt.name} of "
                         f"shape {x.shape}")  # fmt: skip
    if w.fmt != F.INT4 or w.ndim != 2:
        raise ValueError(f"w4a8_matmul: w must be a 2-D INT4 QArray, got {w.fmt.name} of "
                         f"shape {w.shape}")  # fmt: skip
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"w4a8_matmul: x has shape {x.shape} and w {w.shape}; expected the "
                         "same contraction size K (last axis of both)")  # fmt: skip


def _x_rowwise(x: QArray) -> bool:
    return x.layout.kind == "tensor" or (x.layout.kind == "channel" and x.layout.axes == (0,))


def _w_step(w: QArray) -> int | None:
    """Packed bytes per kernel step along K: one group, or a divisor for per-row scales."""
    if w.layout.kind == "block" and w.layout.axes == (1,):
        g = w.layout.block_size
        return g // 2 if g in (64, 128, 256) else None
    if w.layout.kind == "channel" and w.layout.axes == (0,):
        return next((s for s in (64, 32) if w.codes.shape[1] % s == 0), None)
    return None


def why_not(impl: R.Implementation, x: QArray, w: QArray, *, interpret=False) -> str | None:
    """Why ``impl`` cannot multiply these operands here (``None``: it can)."""
    if impl.name == "mosaic_gpu":
        from . import w4a8_mosaic

        return w4a8_mosaic.why_not(x, w) or R.check_mosaic_gpu(impl, 9.0, interpret)
    reason = R.check_triton(impl, 8.9, interpret)
    if reason:
        return reason
    if not _x_rowwise(x):
        return f"activation layout {x.layout} (per-tensor or per-row scales)"
    if _w_step(w) is None:
        return (f"weight layout {w.layout} with K = {w.shape[1]}: groups of 64/128/256 "
                "along K, or per-row scales with K a multiple of 64")  # fmt: skip
    return None


def _kernel(xe_ref, xo_ref, c_ref, sx_ref, sw_ref, o_ref, *, step, per_group):
    dims = (((1,), (1,)), ((), ()))
    f8 = jnp.float8_e4m3fn

    def body(i, acc):
        c = c_ref[:, pl.ds(i * step, step)].astype(jnp.int32)
        lo = (((c & 15) ^ 8) - 8).astype(jnp.float32).astype(f8)
        hi = (((c >> 4) ^ 8) - 8).astype(jnp.float32).astype(f8)
        xe = xe_ref[:, pl.ds(i * step, step)]
        xo = xo_ref[:, pl.ds(i * step, step)]
        part = jax.lax.dot_general(xe, lo, dims, preferred_element_type=jnp.float32)
        part += jax.lax.dot_general(xo, hi, dims, preferred_element_type=jnp.float32)
        if per_group:
            part = part * sw_ref[pl.ds(i, 1), :]
        return acc + part

    acc = jnp.zeros(o_ref.shape, jnp.float32)
    acc = jax.lax.fori_loop(0, c_ref.shape[1] // step, body, acc)
    if not per_group:
        acc = acc * sw_ref[...]
    o_ref[...] = acc * sx_ref[...]


def _triton(x: QArray, w: QArray, cfg: Config, interpret: bool) -> jax.Array:
    from jax.experimental.pallas import triton as plt

    m, n, kc = x.shape[0], w.shape[0], w.codes.shape[1]
    step = _w_step(w)
    per_group = w.layout.kind == "block"
    bm = cfg.block_m or (16 if m <= 16 else 64)
    bn = cfg.block_n or R.dividing_tile(n, 64 if m <= 16 else 128)
    codes = x.codes
    if codes.shape[1] % 2:  # odd K: a zero column meets the zero high nibble of the pad
        codes = jnp.pad(codes, ((0, 0), (0, 1)))
    xe, xo = codes[:, 0::2], codes[:, 1::2]
    sx = jnp.broadcast_to(x.scale.reshape(-1, 1), (m, 1)).astype(jnp.float32)
    sw = w.scale.T if per_group else w.scale.reshape(1, n)  # (G, N) or (1, N)
    # whole tiles only (registry.pad_to): activation rows, and weight rows where no tile
    # divides N
    xe, xo, sx = (R.pad_to(a, (bm, None)) for a in (xe, xo, sx))
    wc, sw = R.pad_to(w.codes, (bn, None)), R.pad_to(sw, (None, bn))
    mp, np_ = xe.shape[0], wc.shape[0]
    return pl.pallas_call(
        functools.partial(_kernel, step=step, per_group=per_group),
        out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.float32),
        grid=(mp // bm, np_ // bn),
        in_specs=[
            pl.BlockSpec((bm, kc), lambda i, j: (i, 0)),
            pl.BlockSpec((bm, kc), lambda i, j: (i, 0)),
            pl.BlockSpec((bn, kc), lambda i, j: (j, 0)),
            pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
            pl.BlockSpec((sw.shape[0], bn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="jaxq_w4a8",
    )(xe, xo, wc, sx, sw.astype(jnp.float32))[:m, :n]


def kernel_for(x, w, *, interpret: bool = False) -> str | None:
    """The Pallas implementation ``w4a8_matmul(x, w, interpret=interpret)`` would run
    here, or ``None``. Never raises for unsupported arguments."""
    return R.pallas_for("w4a8_matmul", lambda: _check_args(x, w),
                        lambda i: why_not(i, x, w, interpret=interpret))  # fmt: skip


def w4a8_matmul(
    x: QArray,
    w: QArray,
    *,
    implementation: str | None = None,
    interpret: bool = False,
    config: Config | None = None,
) -> jax.Array:
    """``deq(x) · deq(w)ᵀ`` as float32 for E4M3 activations and INT4 weights.

    Args:
        x: ``(M, K)`` E4M3 QArray with a per-tensor (or per-row) scale, e.g.
            ``jaxq.quantize(x, "e4m3")``.
        w: ``(N, K)`` INT4 QArray, groups of 64/128/256 along ``K`` or per-row scales.
        implementation: ``None``, ``"pallas"``, ``"mosaic_gpu"`` (Hopper GPU, JAX >= 0.12,
            :mod:`~jaxq.kernels.w4a8_mosaic`), ``"triton"`` or ``"xla"``.
        interpret: run the Pallas kernel in interpret mode.
        config: tiling of the Triton kernel (the Mosaic GPU kernel takes its ``block_n``).

    Raises:
        TypeError: an operand is not a QArray.
        ValueError: wrong formats or shapes, or an ``implementation`` that cannot run here.
    """
    _check_args(x, w)
    impl = R.choose("w4a8_matmul", implementation,
                    lambda i: why_not(i, x, w, interpret=interpret))  # fmt: skip
    if impl == "xla":
        return reference(x, w)
    if impl == "mosaic_gpu":
        from . import w4a8_mosaic

        return w4a8_mosaic.matmul(x, w, interpret, config.block_n if config else None)
    return _triton(x, w, config or Config(), interpret)


R.register(R.Kernel(
    name="w4a8_matmul",
    module=__name__,
    reference=reference,
    implementations=(
        R.Implementation("mosaic_gpu", ("gpu",), "NVIDIA GPU, compute capability >= 9.0 "
                         "(Hopper FP8 wgmma), JAX >= 0.12; INT4 groups 64-256 or per-row "
                         "scales"),
        R.Implementation("triton", ("gpu",), "NVIDIA GPU, compute capability >= 8.9 (FP8 "
                         "tensor cores); INT4 groups 64-256 or per-row scales"),
        R.XLA,
    ),
    tolerance="1e-5 · Σ|x·w|",
))  # fmt: skip
