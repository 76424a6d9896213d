"""The named low-precision recipes: FP8 (current, delayed, static, blockwise), MX, NVFP4,
INT8/INT4 QAT and ternary. Each returns a :class:`jaxq.ops.Recipe`.

| recipe | forward operands | gradient | scales |
|---|---|---|---|
| ``FP8Current`` | E4M3 | E5M2 | per tensor, amax of the tensor |
| ``FP8Delayed`` | E4M3 | E5M2 | per tensor, amax history |
| ``FP8Static`` | E4M3 | E5M2 | fixed (unit-scaled models) |
| ``FP8Blockwise`` | E4M3, 1×128 activations, 128×128 weights | E4M3 1×128 | float32 or 2^k |
| ``MXFP8`` | MXFP8 (E4M3, 32, E8M0) | MXFP8 | per 32 along K |
| ``MXFP4`` | MXFP4 | MXFP4, stochastic | per 32 along K |
| ``NVFP4`` | NVFP4 1×16, weights 16×16 | NVFP4 stochastic, RHT | E4M3 + fp32 tensor |
| ``Int8`` | int8 (per-token × per-channel) | float (STE) | current |
| ``Int4`` | weights int4 g128 (activations opt.) | float (STE) | learned (LSQ) |
| ``Ternary`` | int8 per token × {-1,0,1}·mean|w| | float (STE) | absmean |
"""

from __future__ import annotations

from jaxq import formats as F
from jaxq.ops.spec import Quantizer, Recipe

__all__ = [
    "FP8Current", "FP8Delayed", "FP8Static", "FP8Blockwise", "MXFP8", "MXFP4", "NVFP4",
    "Int8", "Int4", "Ternary", "WeightOnly", "NAMED",
]  # fmt: skip


def FP8Current(*, fwd_format="e4m3", bwd_format="e5m2", backward_operands="quantized") -> Recipe:
    """FP8 with per-tensor current scaling: ``scale = amax(x) / max`` of the tensor itself.

    ``backward_operands="float"`` multiplies the FP8 gradient by the unquantized forward
    operands (see :class:`jaxq.ops.Recipe`); so do the other gradient-quantizing recipes.

    Example:
        >>> FP8Current().grad.fmt.name
        'float8_e5m2'
    """
    return Recipe("fp8_current", Quantizer(fwd_format), Quantizer(fwd_format),
                  Quantizer(bwd_format), backward_operands=backward_operands)  # fmt: skip


def FP8Delayed(
    *, history_length: int = 1024, margin: int = 0, amax_compute: str = "max",
    fwd_format="e4m3", bwd_format="e5m2", backward_operands="quantized",
) -> Recipe:  # fmt: skip
    """FP8 with delayed scaling (Transformer Engine, ``flax.linen.fp8_ops``).

    The scale of each tensor is ``amax_h · 2^margin / max`` where ``amax_h`` is the
    maximum (``amax_compute="max"``) or the newest entry (``"most_recent"``) of the last
    ``history_length`` amaxes of that tensor; the history is :class:`jaxq.ops.OpState`,
    advanced by :func:`jaxq.recipes.update`. An all-zero history (the first step) scales by
    the current amax.

    Example:
        >>> FP8Delayed(history_length=16).init().lhs_history.shape
        (16,)
    """
    def q(fmt):
        return Quantizer(fmt, scaling="delayed", margin=margin)

    return Recipe("fp8_delayed", q(fwd_format), q(fwd_format), q(bwd_format),
                  history_length=history_length, amax_compute=amax_compute,
                  backward_operands=backward_operands)  # fmt: skip


def FP8Static(
    scale: float = 1.0, *, lhs_scale=None, rhs_scale=None, grad_scale=None,
    fwd_format="e4m3", bwd_format="e5m2",
) -> Recipe:  # fmt: skip
    """FP8 with fixed scales, for unit-scaled models whose tensors sit near 1.

    A tensor is stored as ``cast(x / s) · s``. ``scale`` is the default of the three.

    Example:
        >>> FP8Static().lhs.static_scale
        1.0
    """
    def q(fmt, s):
        return Quantizer(fmt, scaling="static", static_scale=float(scale if s is None else s))

    return Recipe("fp8_static", q(fwd_format, lhs_scale), q(fwd_format, rhs_scale),
                  q(bwd_format, grad_scale))  # fmt: skip


def FP8Blockwise(
    *, block_size: int = 128, power_of_two_scales: bool = False, backward_operands="quantized"
) -> Recipe:
    """DeepSeek-V3's FP8 recipe: E4M3 everywhere with fine-grained float32 scales.

    Activations and gradients use ``1 × block_size`` tiles along the contraction axis
    (re-tiled along the token axis for the weight gradient); weights use
    ``block_size × block_size`` blocks, the same in both orientations.

    Example:
        >>> FP8Blockwise().rhs.granularity
        'block2d'
    """
    def q(gran):
        return Quantizer("e4m3", gran, block_size, power_of_two=power_of_two_scales)

    return Recipe("fp8_blockwise", q("block"), q("block2d"), q("block"),
                  backward_operands=backward_operands)  # fmt: skip


def _mx_scales(scale_rounding: str) -> bool:
    if scale_rounding not in ("up", "ocp"):
        raise ValueError(f"scale_rounding must be 'up' or 'ocp', got {scale_rounding!r}")
    return scale_rounding == "up"


def MXFP8(*, scale_rounding="up", backward_operands="quantized") -> Recipe:
    """OCP MXFP8: E4M3 elements, one E8M0 scale per 32 along the contraction axis, for the
    forward operands and the gradient (each re-blocked per product).

    ``scale_rounding="up"`` (default) scales each block by the smallest power of two
    ``2^e`` with ``2^e · 448 ≥ amax``, so no element saturates (NVIDIA's MXFP8 training
    recipe); ``"ocp"`` uses the OCP rule ``2^(floor(log2 amax) − 8)``, under which elements
    of a block above ``448 · 2^e`` saturate (up to 12.5% of the block's amax is lost).

    ``backward_operands="float"`` multiplies the MXFP8 gradient by the float forward
    operands instead of re-blocking them along the token axis (qwix's MX backward).

    Example:
        >>> MXFP8(backward_operands="float").backward_quantizer("lhs") is None
        True
    """
    q = Quantizer(F.MXFP8, "block", power_of_two=_mx_scales(scale_rounding))
    return Recipe("mxfp8", q, q, q, backward_operands=backward_operands)


def MXFP4(
    *, stochastic_rounding_grads: bool = True, scale_rounding="up", backward_operands="quantized"
) -> Recipe:
    """OCP MXFP4 (E2M1, 32, E8M0) forward and backward; gradients rounded stochastically.

    ``scale_rounding`` as for :func:`MXFP8` (``"up"``: no element saturates at 6). Over a
    600-step GPT run (seeds 0 and 1) rounding up ended 2.00% above float32, the OCP rule
    2.66%, although a single product's error is about the same either way.
    """
    up = _mx_scales(scale_rounding)
    q = Quantizer(F.MXFP4, "block", power_of_two=up)
    g = Quantizer(F.MXFP4, "block", power_of_two=up,
                  rounding="stochastic" if stochastic_rounding_grads else "nearest")  # fmt: skip
    return Recipe("mxfp4", q, q, g, backward_operands=backward_operands)


def NVFP4(
    *, random_hadamard: bool = True, stochastic_rounding_grads: bool = True,
    weight_blocks_2d: bool = True, backward_operands="quantized",
) -> Recipe:  # fmt: skip
    """NVIDIA's NVFP4 pre-training recipe (NVFP4: E2M1, blocks of 16, E4M3 + fp32 scales).

    * weights in 16×16 blocks (``weight_blocks_2d``), so forward and backward see the same
      quantized weight;
    * activations and gradients in 1×16 blocks along each product's contraction axis;
    * gradients rounded stochastically (unbiased);
    * a random 16-point Hadamard transform on both weight-gradient operands along the
      token axis (``random_hadamard``).

    Example:
        >>> r = NVFP4()
        >>> r.needs_key, r.rhs.granularity
        (True, 'block2d')
    """
    w = Quantizer(F.NVFP4, "block2d" if weight_blocks_2d else "block")
    g = Quantizer(F.NVFP4, "block",
                  rounding="stochastic" if stochastic_rounding_grads else "nearest")  # fmt: skip
    return Recipe("nvfp4", Quantizer(F.NVFP4, "block"), w, g, hadamard_wgrad=random_hadamard,
                  backward_operands=backward_operands)  # fmt: skip


def Int8(*, activations: bool = True, learned_step: bool = False) -> Recipe:
    """INT8 quantization-aware training: per-token activations × per-channel weights.

    Without ``learned_step`` the forward is a real int8 × int8 → int32 product with
    absmax scales and the backward is straight-through in float. With it, both step sizes
    are learned (LSQ) and the forward is the fake-quantized product.
    """
    a = Quantizer("int8", "tensor" if learned_step else "row") if activations else None
    return Recipe("int8", a, Quantizer("int8", "row"), None, learned_step=learned_step)


def Int4(
    *, block_size: int | None = 128, learned_step: bool = True, activations=None
) -> Recipe:
    """INT4 weight QAT with groups of ``block_size`` along the contraction axis (``None``:
    per channel), learned step sizes by default (LSQ), straight-through backward.

    ``activations`` optionally quantizes the inputs too, e.g. ``"e4m3"`` for W4A8 or
    ``"int8"``; by default they stay in float (W4A16).

    Example:
        >>> Int4().rhs.block_size, Int4().learned_step
        (128, True)
    """
    w = (Quantizer("int4", "block", block_size) if block_size else Quantizer("int4", "row"))
    a = None if activations is None else Quantizer(activations)
    if learned_step and a is not None and not isinstance(a.fmt, F.IntFormat):
        raise ValueError(f"Int4: learned steps need integer activations, got {a.fmt.name}")
    return Recipe("int4", a, w, None, learned_step=learned_step)


def Ternary() -> Recipe:
    """BitNet b1.58: ternary weights ``{-1, 0, 1} · mean|w|`` (absmean, per tensor) and
    8-bit per-token absmax activations; real int8 × ternary → int32 forward,
    straight-through backward.

    Example:
        >>> Ternary().rhs.fmt.qmax
        1
    """
    return Recipe("ternary", Quantizer("int8", "row"),
                  Quantizer("int2", "tensor", calibration="absmean"), None)  # fmt: skip


def WeightOnly(fmt="int8", *, block_size: int | None = None) -> Recipe:
    """Weight-only quantization (W8A16, W4A16): the weight is dequantized inside the op.

    Example:
        >>> WeightOnly("int4", block_size=64).rhs.block_size
        64
    """
    w = Quantizer(fmt, "block", block_size) if block_size else Quantizer(fmt, "row")
    return Recipe(f"w{F.get(fmt).bits}a16", None, w, None)


NAMED = {
    "fp8_current": FP8Current, "fp8_delayed": FP8Delayed, "fp8_static": FP8Static,
    "fp8_blockwise": FP8Blockwise, "mxfp8": MXFP8, "mxfp4": MXFP4, "nvfp4": NVFP4,
    "int8": Int8, "int4": Int4, "ternary": Ternary,
}  # fmt: skip
"""Recipe constructors by their tab-friendly names."""
