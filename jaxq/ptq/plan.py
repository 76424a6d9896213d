"""``Plan``: what the post-training algorithms decided, per layer, before conversion.

The algorithms (:func:`jaxq.ptq.rotate`, :func:`jaxq.ptq.smoothquant`,
:func:`jaxq.ptq.awq`, :func:`jaxq.ptq.gptq`) each take a plan and return a new one, so
they compose in order (rotation, then smoothing, then GPTQ); :func:`jaxq.ptq.convert`
applies the final plan. For a layer at ``path``, :class:`LayerPlan` holds

* ``rotation``: the key data of a random block Hadamard transform ``Q`` of the
  activations along the contraction axis (the weight is rotated by the same ``Q``);
* ``in_scale``: a per-channel divisor ``s`` of the (rotated) activations (the weight is
  multiplied by ``s``), so ``(x Qᵀ / s)(w Qᵀ s)ᵀ = x wᵀ``;
* ``weight``: a quantized weight (a :class:`jaxq.QArray` in the canonical ``(B, N, K)``
  orientation) that replaces round-to-nearest quantization of the transformed weight.

Arrays of stacked layers (``nnx.scan``/``nn.scan``) carry the stack's leading axes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

__all__ = ["LayerPlan", "Plan"]


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One layer's transforms (see the module docstring)."""

    rotation: jax.Array | None = None
    rotation_block: int | None = None
    in_scale: jax.Array | None = None
    weight: Any = None
    algorithm: tuple[str, ...] = ()

    def replace(self, **changes) -> LayerPlan:
        return dataclasses.replace(self, **changes)


class Plan(dict):
    """``{module path: LayerPlan}``; an empty plan converts by round-to-nearest.

    Example:
        >>> Plan().get("mlp/up", LayerPlan()).in_scale is None
        True
    """

    def layer(self, path: str) -> LayerPlan:
        return self.get(path, LayerPlan())

    def with_layer(self, path: str, **changes) -> Plan:
        new = Plan(self)
        new[path] = self.layer(path).replace(**changes)
        return new
