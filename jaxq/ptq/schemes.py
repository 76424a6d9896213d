"""Serving schemes: the recipes :func:`jaxq.ptq.convert` turns into packed weights.

A scheme is an ordinary :class:`jaxq.ops.Recipe` (so the same rule list can wrap a model
for QAT with :func:`jaxq.quantize_model` and convert it for serving). Its ``rhs`` quantizer
says how the weight is stored; its ``lhs`` quantizer how activations are quantized at
serving time: ``None`` (weight-only), ``scaling="current"`` (dynamic, per token or per
tensor) or ``scaling="delayed"`` (a static per-tensor scale whose amax ``convert``
calibrates on the given batches with the quantizer's ``calibration``).

| scheme | weights | bits/weight (K=256) | activations |
|---|---|---|---|
| ``W8()`` | int8 per channel | 8 + 32/K | float |
| ``W4(128)`` | int4, groups of 128 along K | 4.25 | float |
| ``W3(128)``, ``W2(128)`` | int3 / int2, groups of 128 | 3.25 / 2.25 | float |
| ``NF4(64)`` | NF4, groups of 64 | 4.5 | float |
| ``FP4(32)`` | E2M1, groups of 32, float32 scales | 5 | float |
| ``MXFP4()`` | E2M1, 32, E8M0 scales (exponents searched) | 4.25 | float |
| ``NVFP4()`` | E2M1, 16, E4M3 scales (MSE) + tensor scale | 4.5 | float |
| ``FP8Weights()`` | E4M3 per channel | 8 + 32/K | float |
| ``W8A8("int8")`` | int8 per channel | 8 + 32/K | int8, static per tensor |
| ``W8A8("e4m3")`` | E4M3 per channel | 8 + 32/K | E4M3, static per tensor |
| ``W4A8()`` | int4 per channel (or groups) | 4 + 32/K | E4M3, static per tensor |
"""

from __future__ import annotations

from jaxq import formats as F
from jaxq.ops.spec import Quantizer, Recipe
from jaxq.quantization.calibration import MSE, Absmax, Calibration

__all__ = ["W8", "W4", "W3", "W2", "NF4", "FP4", "MXFP4", "NVFP4", "FP8Weights", "W8A8", "W4A8",
           "weights", "static_activations"]  # fmt: skip


def weights(fmt, group: int | None = None, calibration: Calibration = Absmax()) -> Quantizer:
    """A weight quantizer: per output channel, or groups of ``group`` along ``K``, each
    group's range chosen by ``calibration`` (absmax, or the MSE search over clipping
    ratios; for MX formats over the E8M0 exponents)."""
    fmt = F.get(fmt)
    if isinstance(fmt, F.BlockFormat):
        return Quantizer(fmt, "block", calibration=calibration)
    if group:
        return Quantizer(fmt, "block", group, calibration=calibration)
    return Quantizer(fmt, "row", calibration=calibration)


def static_activations(fmt, calibration: Calibration = Absmax()) -> Quantizer:
    """A per-tensor activation quantizer with a calibrated (static) scale."""
    return Quantizer(fmt, "tensor", scaling="delayed", calibration=calibration)


def W8(fmt="int8") -> Recipe:
    """Weight-only 8-bit, per output channel.

    Example:
        >>> W8().rhs.granularity, W8().lhs is None
        ('row', True)
    """
    return Recipe("w8", None, weights(fmt))


def W4(group: int | None = 128, fmt="int4", *, calibration: Calibration = Absmax()) -> Recipe:
    """Weight-only int4 with groups of ``group`` along the contraction (``None``: per
    channel). ``calibration=jaxq.MSE()`` clips each group where its squared error is
    smallest instead of at its absmax (round-to-nearest with MSE clipping; GPTQ then
    computes its group scales the same way)."""
    bits = F.get(fmt).bits
    return Recipe(f"w{bits}g{group}" if group else f"w{bits}", None,
                  weights(fmt, group, calibration))  # fmt: skip


def W3(group: int | None = 128, *, calibration: Calibration = Absmax()) -> Recipe:
    """Weight-only int3 (levels -3..3, eight codes per three bytes), groups of ``group``."""
    return W4(group, "int3", calibration=calibration)


def W2(group: int | None = 128, *, calibration: Calibration = Absmax()) -> Recipe:
    """Weight-only int2 (levels -1..1), groups of ``group``.

    Example:
        >>> W2().name, W3().rhs.fmt.qmax
        ('w2g128', 3)
    """
    return W4(group, "int2", calibration=calibration)


def NF4(group: int = 64) -> Recipe:
    """Weight-only NF4 (QLoRA's normal-float levels) with absmax groups."""
    return Recipe(f"nf4g{group}", None, weights("nf4", group))


def FP4(group: int = 32) -> Recipe:
    """Weight-only FP4 (E2M1) with float32 group scales."""
    return Recipe(f"fp4g{group}", None, weights("e2m1", group))


def MXFP4(*, calibration: Calibration = MSE()) -> Recipe:
    """Weight-only OCP MXFP4 (E2M1 elements, 32-element blocks, E8M0 scales).

    Weights are fixed, so by default each block's exponent is searched (``MSE()``): the
    OCP exponent ``floor(log2 amax) − 2``, one above it (nothing saturates at 6), or lower
    ones, whichever gives the block the smallest squared error. ``Absmax()`` is the plain
    OCP rule.

    Example:
        >>> MXFP4().rhs.calibration, MXFP4(calibration=Absmax()).rhs.calibration
        (MSE(num_ratios=64, min_ratio=0.01), Absmax())
    """
    return Recipe("mxfp4", None, weights(F.MXFP4, calibration=calibration))


def NVFP4(*, calibration: Calibration = MSE()) -> Recipe:
    """Weight-only NVFP4 (E2M1, 16-element blocks, E4M3 scales and a tensor scale).

    By default each block's E4M3 scale comes from the MSE search over clipping ratios of
    the block's amax (the tensor scale stays the absmax one); ``Absmax()`` scales each block
    by its amax."""
    return Recipe("nvfp4", None, weights(F.NVFP4, calibration=calibration))


def FP8Weights() -> Recipe:
    """Weight-only FP8 (E4M3) per output channel."""
    return Recipe("fp8w", None, weights("e4m3"))


def W8A8(fmt="int8", *, calibration: Calibration = Absmax()) -> Recipe:
    """8-bit weights (per channel) × 8-bit activations with a static per-tensor scale.

    ``fmt="int8"`` multiplies int8 codes with int32 accumulation; ``"e4m3"`` runs an FP8
    GEMM where the hardware has one.

    Example:
        >>> r = W8A8("e4m3")
        >>> r.lhs.scaling, r.rhs.fmt.name
        ('delayed', 'float8_e4m3fn')
    """
    fmt = F.get(fmt)
    return Recipe(f"w8a8_{fmt.short}", static_activations(fmt, calibration), weights(fmt),
                  history_length=1)  # fmt: skip


def W4A8(group: int | None = None, *, calibration: Calibration = Absmax()) -> Recipe:
    """FireQ's W4A8: int4 weights (per channel, or groups of ``group``) × E4M3 activations
    with a static per-tensor scale."""
    name = f"w4a8g{group}" if group else "w4a8"
    return Recipe(name, static_activations("e4m3", calibration), weights("int4", group),
                  history_length=1)  # fmt: skip
