"""Block-scaled FP4 GEMM: MXFP4 × MXFP4 or NVFP4 × NVFP4 on GPUs without block-scaled MMAs.

For :class:`jaxq.QArray` operands ``a`` ``(M, K)`` and ``b`` ``(N, K)`` of one block FP4
format, E2M1 codes ``c`` packed two per byte along ``K`` (element ``2j`` in the low
nibble of byte ``j``) with one scale per block of ``g`` along ``K`` (MXFP4: E8M0,
``g = 32``; NVFP4: E4M3, ``g = 16``, and a float32 tensor scale ``t`` per operand):

.. math::

    y_{mn} = t^a t^b \\sum_k \\big(c^a_{mk}\\, s^a_{m, \\lfloor k/g \\rfloor}\\big)
             \\big(c^b_{nk}\\, s^b_{n, \\lfloor k/g \\rfloor}\\big)

Each factor in parentheses is exact in bfloat16: an E2M1 value has two significant bits,
an E4M3 scale four and an E8M0 scale one, so their product has at most six of
bfloat16's eight, with bfloat16's exponent range (only a product below ``2^-126``, a
subnormal that a GPU's MMA may flush to zero, is not representable). The kernel therefore
decodes both operands in registers, multiplies each by its block scales, and multiplies
them on the bfloat16 tensor cores with float32 accumulation: every product is exact, and
only the order of the float32 sum differs from the reference. Per step of 32 elements of
``K`` it loads 16 bytes of each operand and runs two ``K = 16`` dots, low nibbles times
low nibbles and high times high (the even and the odd elements of ``K``); an NVFP4 step
covers two blocks, each scaling its half of the bytes. The tensor scales multiply the
float32 result.

This is how a Hopper GPU, which has FP8 but no FP4 or block-scaled MMA, runs an MX or
NVFP4 product; on compute capability 10 and newer ``jax.nn.scaled_matmul`` takes these
products, and the kernels decline. On Hopper with JAX >= 0.12 a Pallas Mosaic GPU kernel
(:mod:`jaxq.kernels.fp4_gemm_mosaic`: the same planes stored to shared memory for bfloat16
``wgmma``) comes first; the Triton kernel runs elsewhere (compute capability 8.0 to 9.x).

Tolerance: ``|y - y_ref| <= 1e-5 · Σ_k |a_{mk} b_{nk}|`` (float32 summation order).

Example:
    >>> import jax, jax.numpy as jnp, jaxq
    >>> from jaxq.kernels import fp4_matmul
    >>> a = jaxq.quantize(jax.random.normal(jax.random.key(0), (8, 128)), "mxfp4")
    >>> b = jaxq.quantize(jax.random.normal(jax.random.key(1), (40, 128)), "mxfp4")
    >>> y = fp4_matmul(a, b, implementation="pallas", interpret=True)
    >>> ref = fp4_matmul(a, b, implementation="xla")
    >>> y.shape, bool(jnp.allclose(y, ref, rtol=1e-5, atol=1e-4))
    ((8, 40), True)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxq import formats as F
from jaxq.quantization.qarray import QArray

from . import registry as R
from .weight_only import decode_nibbles, step_scales

__all__ = ["fp4_matmul", "reference", "Config", "why_not", "kernel_for"]

_FORMATS = {F.MXFP4: "mxfp4", F.NVFP4: "nvfp4"}
_STEP = 16  # bytes of K per kernel step: 32 elements, one MXFP4 block or two NVFP4 blocks


Config = R.GemmConfig  # tiling of the Triton kernel (the Mosaic GPU kernel takes block_n)


def reference(a: QArray, b: QArray) -> jax.Array:
    """``deq(a) · deq(b)ᵀ`` in float32 at the highest precision (the XLA implementation)."""
    return R.dequantized_product(a, b)


def _check_args(a, b) -> None:
    for name, q in (("a", a), ("b", b)):
        if not isinstance(q, QArray):
            raise TypeError(f"fp4_matmul: {name} must be a jaxq.QArray, got {type(q).__name__}")
        if q.fmt not in _FORMATS or q.ndim != 2:
            raise ValueError(f"fp4_matmul: {name} must be a 2-D MXFP4 or NVFP4 QArray, got "
                             f"{q.fmt.name} of shape {q.shape}")  # fmt: skip
    if a.fmt != b.fmt:
        raise ValueError(f"fp4_matmul: a is {a.fmt.name} and b {b.fmt.name}; expected one "
                         "format on both")  # fmt: skip
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"fp4_matmul: a has shape {a.shape} and b {b.shape}; expected the "
                         "same contraction size K (last axis)")  # fmt: skip


def _operands_why_not(a: QArray, b: QArray) -> str | None:
    """What the kernels (both take the same operands) cannot multiply, or ``None``."""
    for name, q in (("a", a), ("b", b)):
        lay = q.layout
        if lay.kind != "block" or lay.axes != (1,) or lay.block_size != q.fmt.block_size:
            return f"{name}: layout {lay} (blocks of {q.fmt.block_size} along K)"
    if a.shape[1] % (2 * _STEP):
        return f"K = {a.shape[1]} is not a multiple of {2 * _STEP}"
    return None


def why_not(impl: R.Implementation, a: QArray, b: QArray, *, interpret=False) -> str | None:
    """Why ``impl`` cannot multiply these operands here (``None``: it can)."""
    if impl.name == "mosaic_gpu":  # operands no kernel takes are refused first
        reason = _operands_why_not(a, b) or R.check_mosaic_gpu(impl, 9.0, interpret)
    else:
        reason = R.check_triton(impl, 8.0, interpret) or _operands_why_not(a, b)
    if reason:
        return reason
    if not interpret and (R.gpu_compute_capability() or 0) >= 10:
        return "FP4 on compute capability >= 10: jax.nn.scaled_matmul (cuDNN) takes it"
    return None


def _kernel(a_ref, b_ref, sa_ref, sb_ref, o_ref, *, fmt_name, groups):
    dims = (((1,), (1,)), ((), ()))

    def body(i, acc):
        ca = a_ref[:, pl.ds(i * _STEP, _STEP)].astype(jnp.int32)
        cb = b_ref[:, pl.ds(i * _STEP, _STEP)].astype(jnp.int32)
        sa = step_scales(sa_ref, i, fmt_name, groups, _STEP)
        sb = step_scales(sb_ref, i, fmt_name, groups, _STEP)
        for half in (lambda c: c & 15, lambda c: c >> 4):  # even, then odd elements of K
            av = (decode_nibbles(half(ca), "e2m1") * sa).astype(jnp.bfloat16)
            bv = (decode_nibbles(half(cb), "e2m1") * sb).astype(jnp.bfloat16)
            acc += jax.lax.dot_general(av, bv, dims, preferred_element_type=jnp.float32)
        return acc

    acc = jnp.zeros(o_ref.shape, jnp.float32)
    o_ref[...] = jax.lax.fori_loop(0, a_ref.shape[1] // _STEP, body, acc)


def _triton(a: QArray, b: QArray, cfg: Config, interpret: bool) -> jax.Array:
    from jax.experimental.pallas import triton as plt

    (m, k), n = a.shape, b.shape[0]
    fmt_name = _FORMATS[a.fmt]
    groups = 2 * _STEP // a.fmt.block_size
    bm = cfg.block_m or (16 if m <= 16 else 64)
    bn = cfg.block_n or R.dividing_tile(n, 64 if m <= 16 else 128)
    bits = lambda s: jax.lax.bitcast_convert_type(s, jnp.uint8)  # noqa: E731
    # whole tiles only (registry.pad_to); the scale bytes are decoded in the kernel
    ac, sa = R.pad_to(a.codes, (bm, None)), R.pad_to(bits(a.scale), (bm, None))
    bc, sb = R.pad_to(b.codes, (bn, None)), R.pad_to(bits(b.scale), (bn, None))
    mp, np_, kc = ac.shape[0], bc.shape[0], k // 2
    y = pl.pallas_call(
        functools.partial(_kernel, fmt_name=fmt_name, groups=groups),
        out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.float32),
        grid=(mp // bm, np_ // bn),
        in_specs=[pl.BlockSpec((bm, kc), lambda i, j: (i, 0)),
                  pl.BlockSpec((bn, kc), lambda i, j: (j, 0)),
                  pl.BlockSpec((bm, sa.shape[1]), lambda i, j: (i, 0)),
                  pl.BlockSpec((bn, sb.shape[1]), lambda i, j: (j, 0))],  # fmt: skip
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"jaxq_fp4_{fmt_name}",
    )(ac, bc, sa, sb)[:m, :n]
    if a.tensor_scale is not None:
        y = y * (a.tensor_scale * b.tensor_scale)
    return y


def kernel_for(a, b, *, interpret: bool = False) -> str | None:
    """The Pallas implementation ``fp4_matmul(a, b, interpret=interpret)`` would run here,
    or ``None``. Never raises for unsupported arguments."""
    return R.pallas_for("fp4_matmul", lambda: _check_args(a, b),
                        lambda i: why_not(i, a, b, interpret=interpret))  # fmt: skip


def fp4_matmul(
    a: QArray,
    b: QArray,
    *,
    implementation: str | None = None,
    interpret: bool = False,
    config: Config | None = None,
) -> jax.Array:
    """``deq(a) · deq(b)ᵀ`` as float32 for two MXFP4 or two NVFP4 QArrays (module doc).

    Args:
        a: ``(M, K)`` MXFP4 or NVFP4 QArray, blocks along ``K``.
        b: ``(N, K)`` QArray of the same format.
        implementation: ``None``, ``"pallas"``, ``"mosaic_gpu"`` (Hopper GPU, JAX >= 0.12,
            :mod:`~jaxq.kernels.fp4_gemm_mosaic`), ``"triton"`` or ``"xla"``.
        interpret: run the Pallas kernel in interpret mode.
        config: tiling of the Triton kernel (the Mosaic GPU kernel takes its ``block_n``).

    Returns:
        float32 ``(M, N)``.

    Raises:
        TypeError: an operand is not a QArray.
        ValueError: operands not 2-D MXFP4/NVFP4 of one format, different ``K``, or an
            ``implementation`` that cannot run here.
    """
    _check_args(a, b)
    impl = R.choose("fp4_matmul", implementation,
                    lambda i: why_not(i, a, b, interpret=interpret))  # fmt: skip
    if impl == "xla":
        return reference(a, b)
    if impl == "mosaic_gpu":
        from . import fp4_gemm_mosaic

        return fp4_gemm_mosaic.matmul(a, b, interpret, config.block_n if config else None)
    return _triton(a, b, config or Config(), interpret)


R.register(R.Kernel(
    name="fp4_matmul",
    module=__name__,
    reference=reference,
    implementations=(
        R.Implementation("mosaic_gpu", ("gpu",), "NVIDIA GPU, compute capability 9.x "
                         "(Hopper bfloat16 wgmma), JAX >= 0.12; MXFP4 or NVFP4 on both "
                         "sides, K a multiple of 32"),
        R.Implementation("triton", ("gpu",), "NVIDIA GPU, compute capability 8.0 to 9.x "
                         "(bfloat16 tensor cores; 10+ takes jax.nn.scaled_matmul); MXFP4 or "
                         "NVFP4 on both sides, K a multiple of 32"),
        R.XLA,
    ),
    tolerance="1e-5 · Σ|a·b| (float32 out)",
))  # fmt: skip
