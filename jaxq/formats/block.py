"""Block (microscaling) formats: MXFP8/MXFP6/MXFP4 (OCP MX v1.0) and NVFP4.

A block format groups ``block_size`` consecutive elements along one axis and stores one
shared scale per block in ``scale_format``:

* **MX** (OCP Microscaling Formats v1.0): block 32, E8M0 scale
  ``X = 2^(floor(log2(amax_block)) - emax_elem)``; elements ``P_i = sat(x_i / X)`` cast to the
  element format with round-to-nearest-even and saturation.
* **NVFP4**: E2M1 elements, blocks of 16, an E4M3 block scale and an fp32 per-tensor scale:
  ``s_t = amax / (448 * 6)``, ``s_b = E4M3(amax_block / (6 * s_t))``,
  ``P_i = sat_E2M1(x_i / (s_b * s_t))``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxq.formats.element import E2M1, E2M3, E3M2, E4M3, E5M2, E8M0, FloatFormat

__all__ = [
    "BlockFormat",
    "MXFP8",
    "MXFP8_E5M2",
    "MXFP6_E2M3",
    "MXFP6_E3M2",
    "MXFP4",
    "NVFP4",
]


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    """A block-scaled format: element format + block size + scale format.

    Attributes:
        name: e.g. ``"mxfp4"``.
        element: the element format of the codes.
        block_size: elements sharing one scale.
        scale_format: format of the stored block scales (E8M0 for MX, E4M3 for NVFP4).
        tensor_scale: whether a second-level fp32 per-tensor scale exists (NVFP4).

    Example:
        >>> from jaxq.formats import MXFP4, NVFP4
        >>> MXFP4.bits_per_element, NVFP4.bits_per_element
        (4.25, 4.5)
    """

    name: str
    element: FloatFormat
    block_size: int
    scale_format: FloatFormat
    tensor_scale: bool = False
    kind: Literal["block"] = "block"

    @property
    def short(self) -> str:
        return self.name

    @property
    def bits(self) -> int:
        """Bits of one element code (scales not included)."""
        return self.element.bits

    @property
    def bits_per_element(self) -> float:
        """Average storage bits per element including the block scale (not the tensor scale)."""
        return self.element.bits + self.scale_format.bits / self.block_size

    @property
    def max(self) -> float:
        return self.element.max

    @property
    def has_nan(self) -> bool:
        return self.scale_format.has_nan

    @property
    def has_inf(self) -> bool:
        return False

    @property
    def storage_dtype(self):
        return self.element.storage_dtype

    @property
    def is_mx(self) -> bool:
        return self.scale_format == E8M0

    def __repr__(self) -> str:
        return f"BlockFormat({self.name})"


MXFP8 = BlockFormat("mxfp8", E4M3, 32, E8M0)
MXFP8_E5M2 = BlockFormat("mxfp8_e5m2", E5M2, 32, E8M0)
MXFP6_E2M3 = BlockFormat("mxfp6_e2m3", E2M3, 32, E8M0)
MXFP6_E3M2 = BlockFormat("mxfp6_e3m2", E3M2, 32, E8M0)
MXFP4 = BlockFormat("mxfp4", E2M1, 32, E8M0)
NVFP4 = BlockFormat("nvfp4", E2M1, 16, E4M3, tensor_scale=True)
