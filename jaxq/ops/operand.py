"""Quantizing one matmul operand in canonical form, and multiplying two of them.

Every product is brought to the canonical batched form ``(B, M, K) × (B, N, K) →
(B, M, N)`` (contraction on the last axis of both operands). An operand is quantized
with :func:`jaxq.quantize` along that axis; the result is a :class:`jaxq.QArray`, or the
operand itself where its :class:`~jaxq.ops.Quantizer` is ``None``.

:func:`matmul` is the one dispatch point of the quantized products. It first asks
:func:`jaxq.ops.kernel_dispatch.kernel_product` whether a :mod:`jaxq.kernels` kernel takes
the product here (weight-only, W4A8, blockwise FP8 and, on Hopper, MXFP8 on a GPU; never
on CPU); otherwise:

* FP8 × FP8 with scales constant along ``K`` (tensor or row): ``lax.dot_general`` on the
  float8 codes with ``preferred_element_type=float32``, scales applied to the output
  (XLA lowers it to an FP8 GEMM on Hopper). On CPU and for dimensions that are not
  multiples of 16 (cuBLAS' FP8 alignment) the same codes are multiplied as float32:
  products of two FP8 values are exact in float32, so only the summation order differs.
* INT × INT (8 bits or less, signed) with such scales: int8 codes, int32 accumulation.
* MX × MX and NVFP4 × NVFP4 blocked along ``K``: ``jax.nn.scaled_matmul`` where cuDNN
  has a block-scaled GEMM (Blackwell GPUs); its definition is the dequantized product, and
  :func:`scaled_matmul_operands` is tested against that definition on every platform.
* Everything else (block scales along ``K`` elsewhere, sub-byte floats, NF4, mixed
  formats, weight-only): dequantize to float32 and multiply in float32 at the highest
  precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import formats as F
from jaxq.ops.kernel_dispatch import kernel_cast_transpose, kernel_product, kernel_quantize
from jaxq.ops.spec import Quantizer
from jaxq.quantization import packing
from jaxq.quantization.calibration import Absmax, finite_abs
from jaxq.quantization.codes import decode
from jaxq.quantization.qarray import Layout, QArray
from jaxq.quantization.qdq import dequantize, quantize

__all__ = ["quantize_operand", "matmul", "observe_amax", "to_float", "is_quantized"]

Operand = QArray | jax.Array
_CANON = (((2,), (2,)), ((0,), (0,)))
_FP8 = (F.E4M3, F.E5M2)


def observe_amax(x: jax.Array) -> jax.Array:
    """``max |x|`` over the finite elements (0 if none): what an amax history records."""
    return jnp.max(finite_abs(x.astype(jnp.float32)), initial=0.0)


def _pow2_amax(amax: jax.Array, m: float) -> jax.Array:
    """An amax whose scale ``amax / m`` is the next power of two at or above ``amax / m``."""
    ratio = jnp.maximum(amax / np.float32(m), np.float32(2.0**-126))
    k = jnp.ceil(jnp.log2(ratio))
    s = jnp.exp2(k)
    # log2 may be off by an ulp: make sure s covers amax and is the smallest such power.
    s = jnp.where(s * np.float32(m) < amax, s * 2, s)
    s = jnp.where((s / 2) * np.float32(m) >= amax, s / 2, s)
    return jnp.where(amax > 0, s * np.float32(m), amax)


def _tile_amax(x3: jax.Array, bs: int) -> jax.Array:
    """Finite ``max |x|`` of each ``bs × bs`` tile of ``(B, R, K)``, as ``(B, R, K // bs)``."""
    b, r, k = x3.shape
    t = finite_abs(x3.astype(jnp.float32)).reshape(b, r // bs, bs, k // bs, bs)
    amax = jnp.max(t, axis=(2, 4))  # (B, R/bs, K/bs)
    return jnp.repeat(amax, bs, axis=1)


def quantize_operand(
    x3: jax.Array,
    q: Quantizer | None,
    *,
    amax: jax.Array | None = None,
    key: jax.Array | None = None,
    where: str = "operand",
    axis: int = 2,
) -> Operand:
    """Quantizes a canonical operand ``(B, R, K)`` along ``K`` as ``q`` says.

    ``axis=1`` blocks a ``"block"`` quantizer along ``R`` instead, without moving the data:
    the blocks, scales and codes are those of the transposed operand quantized along its
    last axis, kept in ``(B, R, K)`` order (scales ``(B, R / b, K)``).

    A fused quantizer of :mod:`jaxq.kernels` computes the same QArray where one runs
    (:func:`jaxq.ops.kernel_dispatch.kernel_quantize`; never on CPU without
    ``JAXQ_KERNELS=interpret``).

    Args:
        x3: the operand, contraction on the last axis.
        q: its quantizer; ``None`` returns ``x3`` unchanged.
        amax: tensor amax of delayed scaling (``None`` or ``0``: the current amax).
        key: PRNG key for stochastic rounding.
        where: names the operand in error messages.

    Raises:
        ValueError: a block size that does not divide the axis it tiles.
    """
    if q is None:
        return x3
    kw, given = _quantizer_arguments(x3, q, amax, key, where, axis)
    return _quantize(x3, q, kw, given, axis)


def quantize_operand_and_transpose(
    x3: jax.Array,
    q: Quantizer | None,
    *,
    amax: jax.Array | None = None,
    key: jax.Array | None = None,
    where: str = "operand",
) -> tuple[Operand, Operand | None]:
    """``quantize_operand(x3, q)`` and, where the cast-transpose kernel of
    :mod:`jaxq.kernels` writes it in the same pass, its :func:`transpose` (else ``None``).

    A tensor-scaled FP8 layer contracts each operand along both of its axes: ``x`` along
    K in the forward and along the tokens for the weight gradient, ``w`` along K and then
    along N, the gradient along N and then along the tokens. The kernel that reads ``x``
    once for its amax and codes writes the codes in both orientations (Transformer
    Engine's cast-transpose), so the backward product reads a transposed copy that is
    already there instead of transposing the codes again. Arguments as for
    :func:`quantize_operand`.

    Example:
        >>> import jax.numpy as jnp
        >>> q, qt = quantize_operand_and_transpose(jnp.ones((1, 4, 8)), Quantizer("e4m3"))
        >>> q.shape, qt is None  # on CPU: no kernel, no copy
        ((1, 4, 8), True)
    """
    if q is None:
        return x3, None
    kw, given = _quantizer_arguments(x3, q, amax, key, where, 2)
    both = kernel_cast_transpose(x3, q, amax=given)
    return both if both is not None else (_quantize(x3, q, kw, given, 2), None)


def _quantizer_arguments(x3, q: Quantizer, amax, key, where: str, axis: int):
    """Checks ``x3`` against ``q``; returns ``jaxq.quantize``'s keyword arguments and the
    amax it is given (``None``: the calibration decides)."""
    b, r, k = x3.shape
    fmt, bs = q.fmt, q.block_size
    if axis == 1 and (q.granularity != "block" or r % bs):
        raise ValueError(
            f"{where}: blocks along the rows need a 'block' quantizer whose block size {bs} "
            f"divides the row dimension {r} (operand (batch, rows, contraction) = "
            f"{tuple(x3.shape)}), got granularity {q.granularity!r}"
        )
    if axis == 2 and q.granularity in ("block", "block2d") and k % bs:
        raise ValueError(
            f"{where}: block size {bs} does not divide the contraction dimension {k} "
            f"(operand viewed as (batch, rows, contraction) = {tuple(x3.shape)}); "
            "choose a block size that divides it or keep this matmul in high precision"
        )
    if q.granularity == "block2d" and r % bs:
        raise ValueError(
            f"{where}: {bs}x{bs} tiles need the row dimension {r} to be a multiple of {bs} "
            f"(operand viewed as (batch, rows, contraction) = {tuple(x3.shape)})"
        )
    rounding = q.rounding
    kw: dict = {"rounding": rounding, "key": key if rounding == "stochastic" else None}
    if q.granularity == "tensor":
        kw.update(axis=None)
    elif q.granularity == "row":
        kw.update(axis=(0, 1))
    else:
        kw.update(axis=axis, block_size=None if isinstance(fmt, F.BlockFormat) else bs)
    m = q.element.max
    given = scaling_amax(x3, q, amax)
    if q.granularity == "block2d":
        given = _tile_amax(x3, bs)
    elif q.calibration == "absmean":
        given = _group_stat(x3, q, jnp.mean, axis)
    if q.power_of_two and not (isinstance(fmt, F.BlockFormat) and not fmt.is_mx):
        # MX: an amax of s·max gives the E8M0 exponent log2(s) (the round-up rule).
        given = _pow2_amax(_group_stat(x3, q, jnp.max, axis) if given is None else given, m)
    return kw, given


def _quantize(x3, q: Quantizer, kw: dict, given, axis: int) -> QArray:
    """The fused quantizer's QArray where one runs, else ``jaxq.quantize``'s (the same)."""
    fused = kernel_quantize(x3, q, amax=given, axis=axis)
    if fused is not None:
        return fused
    if given is not None:
        return quantize(x3, q.fmt, amax=given, **kw)
    calibration = q.calibration if not isinstance(q.calibration, str) else Absmax()
    return quantize(x3, q.fmt, calibration=calibration, **kw)


def scaling_amax(x: jax.Array, q: Quantizer, amax: jax.Array | None) -> jax.Array | None:
    """The tensor amax a ``"static"`` or ``"delayed"`` quantizer imposes on ``x``, or
    ``None`` for ``"current"`` scaling (the quantizer's calibration then decides).

    Static: ``static_scale · max``; delayed: ``amax · 2^margin`` (the history's amax), or
    the current amax of ``x`` while the history is still zero.
    """
    if q.scaling == "static":
        return jnp.float32(q.static_scale * q.element.max)
    if q.scaling == "delayed":
        return jnp.where(amax > 0, amax * np.float32(2.0**q.margin), observe_amax(x))
    return None


def _group_stat(x3: jax.Array, q: Quantizer, reduce, axis: int = 2) -> jax.Array:
    """``reduce`` of ``|x|`` (finite elements) over each scale group, in the scale shape
    (``axis=1``: blocks along the rows)."""
    b, r, k = x3.shape

    def stat(a):
        if q.granularity == "tensor":
            return reduce(a)
        if q.granularity == "row":
            return reduce(a, axis=2, keepdims=True)
        if axis == 1:
            return reduce(a.reshape(b, r // q.block_size, q.block_size, k), axis=2)
        return reduce(a.reshape(b, r, k // q.block_size, q.block_size), axis=-1)

    xf = x3.astype(jnp.float32)
    if reduce is jnp.max:
        # One reduction of |x| as it is in the common case, the masked one only if a group's
        # maximum is not finite (XLA:CPU otherwise writes the masked |x| out before reducing).
        raw = stat(jnp.abs(xf))
        return jax.lax.cond(jnp.all(jnp.isfinite(raw)), lambda: raw,
                            lambda: stat(finite_abs(xf)))  # fmt: skip
    return stat(finite_abs(xf))


def is_quantized(x: Operand) -> bool:
    return isinstance(x, QArray)


def to_float(x: Operand) -> jax.Array:
    """The values an operand stands for, as float32."""
    if isinstance(x, QArray):
        return dequantize(x, jnp.float32)
    return x.astype(jnp.float32)


def _element(q: QArray):
    return q.fmt.element if isinstance(q.fmt, F.BlockFormat) else q.fmt


def _factorable(q: QArray) -> bool:
    """Scales constant along the contraction axis (tensor, or per (batch, row))."""
    return q.layout.kind == "tensor" or (q.layout.kind == "channel" and 2 not in q.layout.axes)


def _row_scale(q: QArray, side: str) -> jax.Array:
    """The scale as a factor of the ``(B, M, N)`` output."""
    s = q.scale.astype(jnp.float32)
    if q.layout.kind == "tensor":
        return s
    s = s.reshape(s.shape[0], s.shape[1])
    return s[:, :, None] if side == "lhs" else s[:, None, :]


def _int_codes(q: QArray) -> jax.Array:
    elem = _element(q)
    codes = q.codes
    if elem.bits < 8:
        codes = packing.unpack(codes, bits=elem.bits, n=q.shape[-1])
        codes = decode(codes, elem).astype(jnp.int8)
    return codes


def _aligned(*dims: int) -> bool:
    return all(d % 16 == 0 for d in dims)


def _fp8_dot(a: jax.Array, b: jax.Array, native: bool) -> jax.Array:
    if native:
        return jax.lax.dot_general(a, b, _CANON, preferred_element_type=jnp.float32)
    return jax.lax.dot_general(
        a.astype(jnp.float32), b.astype(jnp.float32), _CANON,
        precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
    )  # fmt: skip


def scaled_matmul_available() -> bool:
    """Whether ``jax.nn.scaled_matmul`` has a kernel here: cuDNN's block-scaled GEMM, on
    NVIDIA GPUs of compute capability 10 (Blackwell) and newer. XLA:CPU has none."""
    if jax.default_backend() != "gpu":
        return False
    cc = getattr(jax.devices()[0], "compute_capability", None)
    try:
        return cc is not None and float(cc) >= 10.0
    except (TypeError, ValueError):
        return False


def _block_pair(a: Operand, b: Operand) -> bool:
    """Both MX, or both NVFP4, blocked along the contraction with the format's block."""
    if not (is_quantized(a) and is_quantized(b)):
        return False
    fa, fb = a.fmt, b.fmt
    if not (isinstance(fa, F.BlockFormat) and isinstance(fb, F.BlockFormat)):
        return False
    return (
        fa.scale_format == fb.scale_format
        and fa.block_size == fb.block_size
        and a.layout.kind == b.layout.kind == "block"
        and a.layout.axes == b.layout.axes == (2,)
    )


def scaled_matmul_operands(a: QArray, b: QArray):
    """Arguments of ``jax.nn.scaled_matmul`` for two block-format operands, and the factor
    (the NVFP4 tensor scales) that multiplies its output.

    ``jax.nn.scaled_matmul(lhs, rhs, lhs_scales, rhs_scales) * post`` is by definition
    ``Σ_k lhs_{mk} s^l_{m,k/b} rhs_{nk} s^r_{n,k/b} · post``, which is ``matmul(a, b)``.
    """

    def elems(q):
        elem = q.fmt.element
        if elem.bits == 8:
            return q.codes
        codes = packing.unpack(q.codes, bits=elem.bits, n=q.shape[-1])
        return decode(codes, elem).astype(elem.dtype)

    post = jnp.float32(1.0)
    if a.tensor_scale is not None:
        post = a.tensor_scale * b.tensor_scale
    return elems(a), elems(b), a.scale, b.scale, post


def compute_path(a: Operand, b: Operand) -> str:
    """How :func:`matmul` multiplies ``a · b``: ``"fp8"``, ``"int"``, ``"scaled_matmul"``
    (block formats where cuDNN has a kernel) or ``"dequantize"``."""
    if _block_pair(a, b) and scaled_matmul_available():
        return "scaled_matmul"
    if not (is_quantized(a) and is_quantized(b) and _factorable(a) and _factorable(b)):
        return "dequantize"
    ea, eb = _element(a), _element(b)
    if ea in _FP8 and eb in _FP8:
        return "fp8"
    if isinstance(ea, F.IntFormat) and isinstance(eb, F.IntFormat):
        return "int"
    return "dequantize"


def matmul(a: Operand, b: Operand) -> jax.Array:
    """``a · bᵀ`` of canonical operands ``(B, M, K)``, ``(B, N, K)`` as float32 ``(B, M, N)``.

    The value is ``Σ_k deq(a)_{bmk} deq(b)_{bnk}`` accumulated in float32, whatever path
    computes it (module docstring).
    """
    y = kernel_product(a, b)  # a jaxq.kernels kernel where one runs here (GPU/TPU)
    if y is not None:
        return y
    path = compute_path(a, b)
    if path == "scaled_matmul":
        la, lb, sa, sb, post = scaled_matmul_operands(a, b)
        return jax.nn.scaled_matmul(la, lb, sa, sb, preferred_element_type=jnp.float32) * post
    if path == "fp8":
        _, m, k = a.shape
        n = b.shape[1]
        native = jax.default_backend() == "gpu" and _aligned(m, n, k)
        out = _fp8_dot(a.codes, b.codes, native)
    elif path == "int":
        out = jax.lax.dot_general(
            _int_codes(a), _int_codes(b), _CANON, preferred_element_type=jnp.int32
        ).astype(jnp.float32)
    else:
        return jax.lax.dot_general(
            to_float(a), to_float(b), _CANON,
            precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
        )  # fmt: skip
    return out * _row_scale(a, "lhs") * _row_scale(b, "rhs")


def contract(a: Operand, b: Operand, axes: tuple[int, int]) -> jax.Array | None:
    """``Σ deq(a)·deq(b)`` over axis ``axes[0]`` of ``a`` and ``axes[1]`` of ``b`` (batch axis
    0 of both; the output has ``a``'s remaining axis, then ``b``'s), in float32, with the
    operands as they lie: no transposed copy.

    Returns ``None`` where the product needs :func:`matmul`'s canonical layout: a GEMM on
    integer codes, a block-scaled GEMM, or an FP8 GEMM on a GPU. FP8 codes with tensor
    scales elsewhere are multiplied as float32 and scaled once, as :func:`matmul` does.
    """
    dims = (((axes[0],), (axes[1],)), ((0,), (0,)))

    def dot(x, y):
        return jax.lax.dot_general(x.astype(jnp.float32), y.astype(jnp.float32), dims,
                                   precision=jax.lax.Precision.HIGHEST,
                                   preferred_element_type=jnp.float32)  # fmt: skip

    path = compute_path(a, b)
    if path == "dequantize":
        return dot(to_float(a), to_float(b))
    tensors = transposes_as_codes(a) and transposes_as_codes(b)
    if path == "fp8" and tensors and jax.default_backend() != "gpu":
        return dot(a.codes, b.codes) * a.scale.astype(jnp.float32) * b.scale.astype(jnp.float32)
    return None


def transposes_as_codes(x: Operand) -> bool:
    """Whether :func:`transpose` keeps ``x`` quantized as tensor-scaled unpacked codes (the
    FP8 path of :func:`contract` multiplies such codes as they lie)."""
    return isinstance(x, QArray) and x.layout.kind == "tensor" and not x.packed


def _swapped_codes(q: QArray) -> jax.Array:
    """``q``'s codes with the row and contraction axes swapped; sub-byte codes, packed
    along the last axis, are unpacked, swapped and packed along the new last axis."""
    if not q.packed:
        return q.codes.transpose(0, 2, 1)
    bits = _element(q).bits
    codes = packing.unpack(q.codes, bits=bits, n=q.shape[-1]).transpose(0, 2, 1)
    return packing.pack(codes, bits=bits)


def transpose(x: Operand) -> Operand:
    """Swaps the row and contraction axes of a canonical operand.

    Tensor-scaled 8-bit codes transpose as they are, and codes in blocks along the rows
    (``quantize_operand(..., axis=1)``) become codes in blocks along the contraction, the
    layout of a block-scaled GEMM (sub-byte codes repacked); any other QArray becomes its
    float32 values (exact), to be multiplied by the dequantize path.
    """
    if not isinstance(x, QArray):
        return x.transpose(0, 2, 1)
    b, r, k = x.shape
    if transposes_as_codes(x):
        return QArray(_swapped_codes(x), x.scale, x.zero_point, x.tensor_scale, x.fmt,
                      (b, k, r), x.dtype, x.layout)  # fmt: skip
    if x.layout.kind == "block" and tuple(x.layout.axes) == (1,):
        swap = lambda a: None if a is None else a.transpose(0, 2, 1)  # noqa: E731
        layout = Layout("block", (2,), x.layout.block_size)
        return QArray(_swapped_codes(x), swap(x.scale), swap(x.zero_point), x.tensor_scale,
                      x.fmt, (b, k, r), x.dtype, layout)  # fmt: skip
    return to_float(x).transpose(0, 2, 1)


def transpose_tiles(x: QArray, tile: int) -> QArray:
    """The transpose of an operand quantized in ``tile × tile`` tiles (``"block2d"``), in
    blocks of ``tile`` along its new contraction axis.

    Such a QArray holds blocks of ``tile`` along its contraction axis ``K`` whose scales
    repeat over each ``tile`` rows: ``s_{b, r, j}`` depends on ``r`` only through
    ``⌊r / tile⌋``. Transposed, the element ``(k, r)`` keeps its scale
    ``s_{b, tile·⌊r/tile⌋, ⌊k/tile⌋}``, one per block of ``tile`` along ``r``: the same
    values and codes, in the layout of a block-scaled GEMM over ``r``.
    """
    b, r, k = x.shape
    tiles = x.scale[:, ::tile, :]  # (B, R / tile, K / tile)
    scale = jnp.repeat(tiles.transpose(0, 2, 1), tile, axis=1)  # (B, K, R / tile)
    return QArray(_swapped_codes(x), scale, None, x.tensor_scale, x.fmt, (b, k, r), x.dtype,
                  Layout("block", (2,), tile))  # fmt: skip


def nbytes(x: Operand) -> int:
    """Bytes an operand holds (codes and scales for a QArray)."""
    if isinstance(x, QArray):
        return x.nbytes
    return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
