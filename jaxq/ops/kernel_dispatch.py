"""Which products and quantizers of :mod:`jaxq.ops` run on a :mod:`jaxq.kernels` kernel.

:func:`jaxq.ops.operand.matmul` asks :func:`kernel_product` first. For canonical operands
``a`` ``(B, M, K)`` and ``b`` ``(B, N, K)`` it returns ``deq(a) · deq(b)ᵀ`` (float32,
``(B, M, N)``) computed by a Pallas kernel where one is available for their formats and
layouts, and ``None`` otherwise; ``matmul`` then computes the product with XLA as before.
Likewise :func:`jaxq.ops.operand.quantize_operand` asks :func:`kernel_quantize` first,
which returns the very :class:`jaxq.QArray` that ``jaxq.quantize`` gives, computed by a
fused quantizer, or ``None``.

=============================================  ==========================================
operands                                       kernel
=============================================  ==========================================
float × INT4 / NF4 / E2M1 / INT8 (groups or    :func:`jaxq.kernels.weight_only_matmul`
rows; W4A16, W8A16), MXFP4, NVFP4              (block scales decoded in registers)
E4M3 (tensor or row scales) × INT4 (W4A8)      :func:`jaxq.kernels.w4a8_matmul`
FP8 × FP8 with ``1 × 128`` blocks along K on   :func:`jaxq.kernels.scaled_fp8_matmul`
both (DeepSeek-V3: 128 × 128 weight blocks     (float32 promotion of each 128-wide
are stored as per-row K-blocks)                partial sum)
MXFP8 × MXFP8 blocked along K (forward, input :func:`jaxq.kernels.scaled_fp8_matmul`
and weight gradient; Hopper: Blackwell takes   (32-wide partial sums scaled by ``2^e``)
``jax.nn.scaled_matmul``)
MXFP4 × MXFP4 or NVFP4 × NVFP4 blocked along   :func:`jaxq.kernels.fp4_matmul` (scaled
K (Hopper; Blackwell as above)                 elements exact in bfloat16 MMAs)
=============================================  ==========================================

=============================================  ==========================================
quantizer                                      kernel
=============================================  ==========================================
E4M3 / E5M2, one tensor scale: current         :func:`jaxq.kernels.cast_transpose` (its
scaling (absmax), delayed or static            codes, and their transposed copy for the
                                               backward products)
MXFP8 / MXFP4 (OCP scales) or NVFP4 in blocks  :func:`jaxq.kernels.block_quantize`
along K, absmax calibration
=============================================  ==========================================

A quantizer runs on its kernel only where the kernel computes exactly what
``quantize_operand`` computes: a single operand (``B == 1``) quantized along its last
axis, round-to-nearest, :class:`jaxq.Absmax` calibration, no ``power_of_two`` scales (MX
recipes round their scales up by default: set ``scale_rounding="ocp"``), no ``block2d``
tiles, a float32, bfloat16 or float16 operand. Stochastic rounding, ``Percentile``/``MSE``
and ``"absmean"`` calibration, row and other block scales stay on XLA. A Pallas call has
no derivative: the kernel's result is wrapped in a ``jax.custom_jvp`` whose tangents are
those of the XLA quantizer, so differentiating through ``quantize_operand`` (a
straight-through estimator around it, a second-order gradient through the backward pass
of :func:`jaxq.ops.dot_general`) gives exactly what it gives on XLA. (Within
:func:`jaxq.ops.dot_general` every quantizer runs inside the forward or backward rule of a
``jax.custom_vjp``, which JAX never differentiates for a first-order gradient; learned
step sizes do not use ``quantize_operand``.)

A tensor-scaled FP8 layer contracts x, w and the gradient along both of their axes (x
along K, then along the tokens for the weight gradient; w along K, then along N; the
gradient along N, then along the tokens). Where the cast-transpose kernel quantizes them
(:func:`kernel_cast_transpose`, :func:`jaxq.ops.operand.quantize_operand_and_transpose`),
:func:`jaxq.ops.dot_general` saves its transposed copy for the backward product instead of
the codes, as Transformer Engine does, and no code is transposed again.

The backward products reach the same kernels. The weight gradient of a recipe whose
gradient has ``1 × b`` blocks quantizes both operands in blocks along the tokens; their
codes are transposed (:func:`jaxq.ops.operand.transpose`: 4-bit codes repacked), so the
tokens become the kernel's contraction axis with its blocks along it. An input gradient
through weights in square tiles (``"block2d"``: DeepSeek-V3's 128 × 128 FP8 blocks,
NVFP4's 16 × 16) reads the tiles as blocks along the output axis
(:func:`jaxq.ops.operand.transpose_tiles`). Both are exact relayouts of the codes and
scales, one byte or less per element, instead of a float32 dequantized product.

A kernel runs only where there is a single device (a Pallas call is not partitioned across
devices; interpret mode excepted) and, for the FP8 and W4A8 products, for a batch ``B`` of
1 (a plain ``Dense``/``Linear`` product). Each kernel's availability check decides the
rest (platform, GPU generation, shapes); on CPU nothing changes. The products agree with
the XLA path within each kernel's stated tolerance (:func:`jaxq.kernels.registry.table`);
the quantizers' codes and scales are XLA's bit for bit in interpret mode (NaN codes equal
as NaN).

The environment variable ``JAXQ_KERNELS`` steers it: ``xla`` keeps every product and
quantizer on XLA; ``interpret`` runs the kernels in Pallas interpret mode on any
platform, which tests the dispatch without an accelerator (slowly).

Example:
    >>> import jax, jax.numpy as jnp, jaxq
    >>> from jaxq.ops.kernel_dispatch import kernel_product, kernel_quantize
    >>> x = jnp.ones((1, 4, 64))
    >>> w = jaxq.quantize(jnp.ones((1, 8, 64)), "int4", block_size=32)
    >>> kernel_product(x, w) is None  # on CPU: XLA computes it
    True
    >>> kernel_quantize(x, jaxq.ops.Quantizer("mxfp8", "block")) is None
    True
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import formats as F
from jaxq.kernels import fp4_gemm, fp8_gemm, fused_quantize, registry, w4a8, weight_only
from jaxq.quantization.calibration import Absmax
from jaxq.quantization.qarray import Layout, QArray
from jaxq.quantization.qdq import quantize

__all__ = ["kernel_product", "kernel_quantize", "kernel_cast_transpose", "interpret_requested"]

_TENSOR_FP8 = (F.E4M3, F.E5M2)
_BLOCK_FORMATS = (F.MXFP8, F.MXFP4, F.NVFP4)
_FLOATS = tuple(np.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


def interpret_requested() -> bool:
    """Whether ``JAXQ_KERNELS=interpret`` asks for the kernels in interpret mode."""
    return registry.forced() == "interpret"


def _drop_batch(q: QArray) -> QArray | None:
    """The ``(M, K)`` view of a canonical ``(1, M, K)`` QArray (``None`` if ``B > 1`` or its
    scales are not per tensor, per row or in blocks along K)."""
    layout = q.layout
    if q.shape[0] != 1 or q.zero_point is not None:
        return None
    if layout.kind == "tensor":
        new, scale = layout, q.scale
    elif layout.kind == "channel" and tuple(layout.axes) in ((1,), (0, 1)):
        new, scale = Layout("channel", (0,)), q.scale[0]
    elif layout.kind == "block" and tuple(layout.axes) == (2,):
        new, scale = Layout("block", (1,), layout.block_size), q.scale[0]
    else:
        return None
    return QArray(q.codes[0], scale, None, q.tensor_scale, q.fmt, q.shape[1:], q.dtype, new)


def kernel_product(a, b) -> jax.Array | None:
    """``deq(a) · deq(b)ᵀ`` of canonical operands by a kernel, or ``None`` (module doc)."""
    interpret = interpret_requested()
    if not isinstance(b, QArray) or not (interpret or jax.device_count() == 1):
        return None
    if not isinstance(a, QArray):  # float activations: weight-only
        impl = weight_only.kernel_for(a, b, interpret=interpret)
        if impl is None:
            return None
        return weight_only.weight_only_matmul(a, b, implementation=impl, interpret=interpret)
    a2, b2 = _drop_batch(a), _drop_batch(b)
    if a2 is None or b2 is None:
        return None
    # per-tensor and per-row FP8 stay with XLA, whose FP8 GEMM takes those scales
    impl = fp8_gemm.kernel_for(a2, b2, interpret=interpret, modes=("blockwise", "mx"))
    if impl is not None:
        return fp8_gemm.scaled_fp8_matmul(a2, b2, implementation=impl, interpret=interpret)[None]
    impl = w4a8.kernel_for(a2, b2, interpret=interpret)
    if impl is not None:
        return w4a8.w4a8_matmul(a2, b2, implementation=impl, interpret=interpret)[None]
    impl = fp4_gemm.kernel_for(a2, b2, interpret=interpret)
    if impl is not None:
        return fp4_gemm.fp4_matmul(a2, b2, implementation=impl, interpret=interpret)[None]
    return None


# ------------------------------------------------------------------------------ quantizers


def _quantizer_kernel(x3, q, amax, axis: int) -> str | None:
    """The fused quantizer that computes ``quantize_operand(x3, q)`` exactly, or ``None``.

    ``cast_transpose(x, fmt, amax=a)`` is ``quantize(x, fmt, amax=a)`` (``a=None``: the
    finite absmax of ``x``) and ``block_quantize(x, fmt)`` is ``quantize(x, fmt)`` along
    the last axis with absmax block scales (MX: the OCP exponent; NVFP4: the tensor scale
    from the finite absmax), which are what ``quantize_operand`` asks of ``jaxq.quantize``
    for such a quantizer; anything that changes the amax, the rounding or the scale layout
    is not.
    """
    if q is None or axis != 2 or jnp.ndim(x3) != 3 or x3.shape[0] != 1:
        return None
    if np.dtype(x3.dtype) not in _FLOATS or q.rounding != "nearest" or q.power_of_two:
        return None
    if not isinstance(q.calibration, Absmax):
        return None
    one_amax = amax is None or jnp.ndim(amax) == 0
    if q.fmt in _TENSOR_FP8 and q.granularity == "tensor" and one_amax:
        return "cast_transpose"  # current (amax None), delayed or static scaling
    if q.fmt in _BLOCK_FORMATS and q.granularity == "block" and amax is None:
        return "block_quantize"
    return None


def _xla_quantize(x3, amax, fmt) -> QArray:
    """``quantize_operand``'s own ``jaxq.quantize`` call for the quantizers routed here."""
    if fmt in _BLOCK_FORMATS:
        return quantize(x3, fmt, axis=2, calibration=Absmax())
    if amax is None:
        return quantize(x3, fmt, calibration=Absmax())
    return quantize(x3, fmt, amax=amax)


def _swap_tensor_codes(q: QArray) -> QArray:
    """A tensor-scaled ``(B, R, K)`` QArray as its ``(B, K, R)`` transpose (the same scale)."""
    b, r, k = q.shape
    return QArray(q.codes.transpose(0, 2, 1), q.scale, q.zero_point, q.tensor_scale, q.fmt,
                  (b, k, r), q.dtype, q.layout)  # fmt: skip


@functools.partial(jax.jit, static_argnames=("fmt", "impl", "interpret"))
def _fused_jit(x3, amax, *, fmt, impl, interpret) -> tuple[QArray, QArray | None]:
    """The fused quantizer on ``x3[0]``, its 2-D QArray rebuilt as ``jaxq.quantize``'s 3-D
    one (``Layout("tensor")``, or blocks along axis 2 with scales ``(1, R, K / b)``), and
    for the cast-transpose kernel its transposed copy ``(1, K, R)`` (else ``None``)."""
    x2 = x3[0]
    b, r, k = x3.shape
    dt = np.dtype(x3.dtype)
    if fmt in _TENSOR_FP8:
        q, qt, _ = fused_quantize.cast_transpose(x2, fmt, amax=amax, implementation=impl,
                                                 interpret=interpret)  # fmt: skip
        tensor = Layout("tensor")
        return (QArray(q.codes[None], q.scale, None, None, fmt, (b, r, k), dt, tensor),
                QArray(qt.codes[None], qt.scale, None, None, fmt, (b, k, r), dt, tensor))
    q = fused_quantize.block_quantize(x2, fmt, implementation=impl, interpret=interpret)
    layout = Layout("block", (2,), fmt.block_size)
    return QArray(q.codes[None], q.scale[None], None, q.tensor_scale, fmt, (b, r, k), dt,
                  layout), None  # fmt: skip


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _fused(x3, amax, fmt, impl, interpret) -> tuple[QArray, QArray | None]:
    return _fused_jit(x3, amax, fmt=fmt, impl=impl, interpret=interpret)


@_fused.defjvp
def _fused_jvp(fmt, impl, interpret, primals, tangents):
    # A Pallas call has no derivative rule: the tangents are the XLA quantizer's own.
    def xla(x, a):
        q = _xla_quantize(x, a, fmt)
        return q, (_swap_tensor_codes(q) if fmt in _TENSOR_FP8 else None)

    _, t_out = jax.jvp(xla, primals, tangents)
    return _fused(*primals, fmt, impl, interpret), t_out


def _fused_quantizer(x3, q, amax, axis: int) -> tuple[QArray, QArray | None] | None:
    """The fused quantizer's ``(QArray, transposed copy or None)`` where one runs."""
    interpret = interpret_requested()
    if not (interpret or jax.device_count() == 1):
        return None
    name = _quantizer_kernel(x3, q, amax, axis)
    if name is None:
        return None
    x2 = jax.ShapeDtypeStruct(tuple(x3.shape[1:]), x3.dtype)
    block = q.fmt.block_size if name == "block_quantize" else None
    impl = registry.pallas_for(
        name, lambda: None,
        lambda i: fused_quantize.why_not(i, x2, interpret=interpret, block=block, fmt=q.fmt),
    )  # fmt: skip
    if impl is None:
        return None
    amax = None if amax is None else jnp.asarray(amax, jnp.float32)
    return _fused(jnp.asarray(x3), amax, q.fmt, impl, interpret)


def kernel_quantize(x3, q, *, amax=None, axis: int = 2) -> QArray | None:
    """``quantize_operand(x3, q)`` by a fused quantizer kernel, or ``None`` (module doc).

    Args:
        x3: the canonical operand ``(B, R, K)``.
        q: its :class:`~jaxq.ops.Quantizer`.
        amax: the tensor amax ``quantize_operand`` hands ``jaxq.quantize`` (delayed or
            static scaling), ``None`` where the quantizer's calibration decides.
        axis: the quantized axis (only ``2``, the contraction, has kernels).
    """
    fused = _fused_quantizer(x3, q, amax, axis)
    return None if fused is None else fused[0]


def kernel_cast_transpose(x3, q, *, amax=None) -> tuple[QArray, QArray] | None:
    """``(quantize_operand(x3, q), transpose of it)`` from one pass of the cast-transpose
    kernel, or ``None`` where it does not run (module doc).

    The transposed copy ``(B, K, R)``, the same codes and tensor scale, is what the
    backward products of a tensor-scaled FP8 layer contract: written by the kernel that
    quantizes, it saves reading the codes again to transpose them.

    Args:
        x3: the canonical operand ``(B, R, K)``.
        q: its :class:`~jaxq.ops.Quantizer`.
        amax: as for :func:`kernel_quantize`.
    """
    if _quantizer_kernel(x3, q, amax, 2) != "cast_transpose":
        return None  # not a tensor-scaled FP8 quantizer with a kernel: no copy to read
    return _fused_quantizer(x3, q, amax, 2)
