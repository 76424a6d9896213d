"""The FP8 matmul of unit-scaled models: E4M3 forward, E5M2 backward, static scales.

:class:`Fp8DotGeneral` is a hashable configuration of :func:`jaxq.recipes.FP8Static`; the
product itself is :func:`jaxq.ops.dot_general` (jaxq has one FP8 matmul).

Unit scaling keeps activations, weights and gradients near unit scale, so FP8 casts can
use *fixed* scales (1 by default) instead of amax-based dynamic scaling. Operands are
divided by their static scale, cast (round-to-nearest-even, saturating at the format's
max), multiplied with float32 accumulation, and the product is multiplied back. In the
backward pass the incoming gradient is cast to the backward format and the two operand
gradients are computed from the *cast* forward operands.

Casts are ``jaxq.cast`` (bit-exact with ml_dtypes round-to-nearest-even; finite values
beyond the format's max saturate to ``+-max``). Non-finite values are never hidden: NaN
stays NaN, ``+-inf`` becomes NaN in E4M3 (which has no inf) and stays ``+-inf`` in E5M2,
so an overflowing step shows up as a non-finite loss/gradient (which
:func:`jaxq.unit_scaling.optim.adamw` skips).
"""

from __future__ import annotations

import dataclasses

from jaxq import formats
from jaxq.formats import FloatFormat

__all__ = ["Fp8DotGeneral", "fp8_dot_general"]


@dataclasses.dataclass(frozen=True)
class Fp8DotGeneral:
    """A ``dot_general`` with FP8 operands: a frozen, hashable drop-in for ``jax.lax.dot_general``.

    Attributes:
        fwd_format: format of both forward operands (default E4M3).
        bwd_format: format of the output gradient (default E5M2).
        lhs_scale, rhs_scale, grad_scale: static scales (> 0): a tensor is stored as
            ``cast(x / scale) * scale``. Unit-scaled models use 1.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> dot = Fp8DotGeneral()
        >>> x, w = jnp.ones((2, 3)), jnp.full((3, 4), 1.06)
        >>> dot(x, w, (((1,), (0,)), ((), ()))).tolist()[0]
        [3.0, 3.0, 3.0, 3.0]
    """

    fwd_format: FloatFormat = formats.E4M3
    bwd_format: FloatFormat = formats.E5M2
    lhs_scale: float = 1.0
    rhs_scale: float = 1.0
    grad_scale: float = 1.0

    def __post_init__(self):
        for name in ("fwd_format", "bwd_format"):
            if not isinstance(getattr(self, name), FloatFormat):
                raise TypeError(f"{name} must be a jaxq FloatFormat, got {getattr(self, name)!r}")
        for name in ("lhs_scale", "rhs_scale", "grad_scale"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v < float("inf")):
                raise ValueError(f"{name} must be a finite positive number, got {v!r}")

    @property
    def recipe(self):
        """The equivalent :func:`jaxq.recipes.FP8Static` recipe (which computes the product)."""
        from jaxq.recipes import FP8Static

        return FP8Static(lhs_scale=self.lhs_scale, rhs_scale=self.rhs_scale,
                         grad_scale=self.grad_scale, fwd_format=self.fwd_format,
                         bwd_format=self.bwd_format)  # fmt: skip

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                 **kwargs):  # fmt: skip
        """Computes the FP8 product with :func:`jaxq.ops.dot_general`; ``precision`` is
        ignored, the result has ``preferred_element_type`` or the operands' dtype."""
        from jaxq.ops import dot_general

        return dot_general(lhs, rhs, dimension_numbers, None, preferred_element_type,
                           recipe=self.recipe)  # fmt: skip


fp8_dot_general = Fp8DotGeneral()
"""E4M3-forward / E5M2-backward ``dot_general`` with unit static scales."""
