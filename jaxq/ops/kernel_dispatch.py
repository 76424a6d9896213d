"""Which products of :mod:`jaxq.ops` run on a :mod:`jaxq.kernels` kernel.

:func:`jaxq.ops.operand.matmul` asks :func:`kernel_product` first. For canonical operands
``a`` ``(B, M, K)`` and ``b`` ``(B, N, K)`` it returns ``deq(a) · deq(b)ᵀ`` (float32,
``(B, M, N)``) computed by a Pallas kernel where one is available for their formats and
layouts, and ``None`` otherwise; ``matmul`` then computes the product with XLA as before.

=============================================  ==========================================
operands                                       kernel
=============================================  ==========================================
float × INT4 / NF4 / E2M1 / INT8 (groups or    :func:`jaxq.kernels.weight_only_matmul`
rows; W4A16, W8A16), MXFP4, NVFP4              (block scales decoded in registers)
E4M3 (tensor or row scales) × INT4 (W4A8)      :func:`jaxq.kernels.w4a8_matmul`
FP8 × FP8 with ``1 × 128`` blocks along K on   :func:`jaxq.kernels.scaled_fp8_matmul`
both (DeepSeek-V3: 128 × 128 weight blocks     (float32 promotion of each 128-wide
are stored as per-row K-blocks)                partial sum)
MXFP8 × MXFP8 blocked along K (the forward     :func:`jaxq.kernels.scaled_fp8_matmul`
and input-gradient products; Hopper:           (32-wide partial sums scaled by ``2^e``)
Blackwell takes ``jax.nn.scaled_matmul``)
MXFP4 × MXFP4 or NVFP4 × NVFP4 blocked along   :func:`jaxq.kernels.fp4_matmul` (scaled
K (Hopper; Blackwell as above)                 elements exact in bfloat16 MMAs)
=============================================  ==========================================

A kernel runs only where there is a single device (a Pallas call is not partitioned across
devices; interpret mode excepted) and, for the FP8 and W4A8 kernels, for a batch ``B`` of
1 (a plain ``Dense``/``Linear`` product). Each kernel's availability check decides the
rest (platform, GPU generation, shapes); on CPU nothing changes. The results agree with
the XLA path within each kernel's stated tolerance (:func:`jaxq.kernels.registry.table`).
The other backward products and the quantizers stay on XLA for now.

The environment variable ``JAXQ_KERNELS`` steers it: ``xla`` keeps every product on XLA;
``interpret`` runs the kernels in Pallas interpret mode on any platform, which tests the
dispatch without an accelerator (slowly).

Example:
    >>> import jax, jax.numpy as jnp, jaxq
    >>> from jaxq.ops.kernel_dispatch import kernel_product
    >>> x = jnp.ones((1, 4, 64))
    >>> w = jaxq.quantize(jnp.ones((1, 8, 64)), "int4", block_size=32)
    >>> kernel_product(x, w) is None  # on CPU: XLA computes it
    True
"""

from __future__ import annotations

import jax

from jaxq.kernels import fp4_gemm, fp8_gemm, registry, w4a8, weight_only
from jaxq.quantization.qarray import Layout, QArray

__all__ = ["kernel_product", "interpret_requested"]


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
