"""Element number formats: floating point (FP8/FP6/FP4/E8M0), integers and NF4.

A format is a frozen dataclass, hashable, usable as a static argument under ``jit``.
Float formats are named exactly as ``ml_dtypes`` names their dtypes.

For a float format with ``e`` exponent bits, ``m`` mantissa bits and bias ``b``, the
representable magnitudes are ``2^(E-b) * (1 + f/2^m)`` for normal exponents ``E >= 1``
and ``2^(1-b) * f/2^m`` for subnormals (``E = 0``), hence

* ``min_normal = 2^(1-b)``, ``min_subnormal = 2^(1-b-m)``;
* ``max`` depends on how the format spends its top codes on inf/NaN (see each format).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import ml_dtypes
import numpy as np

__all__ = [
    "FloatFormat",
    "IntFormat",
    "LookupFormat",
    "E4M3",
    "E5M2",
    "E2M3",
    "E3M2",
    "E2M1",
    "E8M0",
    "INT8",
    "INT4",
    "INT3",
    "INT2",
    "UINT8",
    "UINT4",
    "UINT2",
    "NF4",
    "NF4_LEVELS",
]


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """A floating-point element format.

    Attributes:
        name: the ``ml_dtypes`` dtype name, e.g. ``"float8_e4m3fn"``.
        short: short alias, e.g. ``"e4m3"``.
        exponent_bits: width of the exponent field.
        mantissa_bits: width of the stored mantissa (fraction) field.
        bias: exponent bias.
        signed: whether a sign bit exists (``False`` only for E8M0).
        has_inf: whether +-inf are encodable.
        has_nan: whether NaN is encodable.
        max: largest finite value.

    Example:
        >>> from jaxq.formats import E4M3
        >>> E4M3.max, E4M3.bits, E4M3.min_subnormal
        (448.0, 8, 0.001953125)
    """

    name: str
    short: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    signed: bool
    has_inf: bool
    has_nan: bool
    max: float
    kind: Literal["float"] = "float"

    @property
    def bits(self) -> int:
        """Bits per element: sign + exponent + mantissa."""
        return int(self.signed) + self.exponent_bits + self.mantissa_bits

    @property
    def dtype(self) -> np.dtype:
        """The ``ml_dtypes`` numpy dtype that holds this format (also a valid JAX dtype)."""
        return np.dtype(getattr(ml_dtypes, self.name))

    @property
    def storage_dtype(self) -> np.dtype:
        """Dtype of codes in a ``QArray``: the format's own dtype, or ``uint8`` when packed."""
        return self.dtype if self.bits == 8 else np.dtype(np.uint8)

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value: ``1 - bias`` (``-bias`` for E8M0, which
        has no zero and no subnormals, so exponent field 0 is the normal ``2^-127``)."""
        return -self.bias if not self.signed else 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite value: ``floor(log2(max))``."""
        return int(np.floor(np.log2(self.max)))

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value ``2^(1-bias)``."""
        return float(2.0**self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value: ``2^(1-bias-m)`` (equal to ``min_normal`` without mantissa)."""
        return float(2.0 ** (self.emin - self.mantissa_bits))

    def values(self) -> np.ndarray:
        """Every distinct finite value of the format, ascending, as float64."""
        codes = np.arange(2**self.bits, dtype=np.uint8 if self.bits <= 8 else np.uint16)
        vals = codes.view(self.dtype) if self.bits == 8 else _decode_small(self, codes)
        vals = vals.astype(np.float64)
        return np.unique(vals[np.isfinite(vals)])

    def __repr__(self) -> str:
        return f"FloatFormat({self.name})"


def _decode_small(fmt: FloatFormat, codes: np.ndarray) -> np.ndarray:
    """Decodes sub-byte codes (bit patterns in the low ``bits`` bits) with ml_dtypes."""
    return codes.astype(np.uint8).view(fmt.dtype)


@dataclasses.dataclass(frozen=True)
class IntFormat:
    """An integer element format.

    Symmetric formats (``signed=True``) use codes in ``[-(2^(b-1)-1), 2^(b-1)-1]`` (the most
    negative two's-complement code is left unused so that the grid is symmetric about
    zero); set ``narrow=False`` to allow ``-2^(b-1)``. Asymmetric formats (``signed=False``)
    use unsigned codes in ``[0, 2^b-1]`` together with a zero point.

    Example:
        >>> from jaxq.formats import INT4, UINT4
        >>> INT4.qmin, INT4.qmax, UINT4.qmin, UINT4.qmax
        (-7, 7, 0, 15)
    """

    name: str
    bits: int
    signed: bool = True
    narrow: bool = True
    kind: Literal["int"] = "int"

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + int(self.narrow)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def max(self) -> float:
        """Largest code magnitude a scale maps the absmax onto (``qmax``)."""
        return float(self.qmax)

    @property
    def short(self) -> str:
        return self.name

    @property
    def has_nan(self) -> bool:
        return False

    @property
    def has_inf(self) -> bool:
        return False

    @property
    def min_normal(self) -> float:
        return 1.0

    @property
    def min_subnormal(self) -> float:
        return 1.0

    @property
    def storage_dtype(self) -> np.dtype:
        if self.bits == 8:
            return np.dtype(np.int8 if self.signed else np.uint8)
        return np.dtype(np.uint8)

    def values(self) -> np.ndarray:
        """Every code value, ascending, as float64."""
        return np.arange(self.qmin, self.qmax + 1, dtype=np.float64)

    def __repr__(self) -> str:
        return f"IntFormat({self.name})"


# The 16 NormalFloat4 levels of QLoRA (Dettmers et al. 2023): quantiles of N(0, 1)
# normalised to [-1, 1], with an exact zero; 8 positive and 7 negative levels.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


@dataclasses.dataclass(frozen=True)
class LookupFormat:
    """A 4-bit (or smaller) format whose codes index a table of levels in ``[-1, 1]``.

    Rounding picks the nearest level (ties to the lower index).

    Example:
        >>> from jaxq.formats import NF4
        >>> NF4.bits, NF4.max, len(NF4.levels)
        (4, 1.0, 16)
    """

    name: str
    bits: int
    levels: tuple[float, ...]
    kind: Literal["lookup"] = "lookup"

    @property
    def short(self) -> str:
        return self.name

    @property
    def max(self) -> float:
        return float(max(abs(v) for v in self.levels))

    @property
    def has_nan(self) -> bool:
        return False

    @property
    def has_inf(self) -> bool:
        return False

    @property
    def min_normal(self) -> float:
        return float(min(abs(v) for v in self.levels if v != 0))

    min_subnormal = min_normal

    @property
    def storage_dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def values(self) -> np.ndarray:
        return np.asarray(sorted(self.levels), dtype=np.float64)

    def __repr__(self) -> str:
        return f"LookupFormat({self.name})"


E4M3 = FloatFormat("float8_e4m3fn", "e4m3", 4, 3, 7, True, False, True, 448.0)
"""FP8 E4M3 (OCP ``fn`` variant): no inf, NaN = S.1111.111, max 448."""
E5M2 = FloatFormat("float8_e5m2", "e5m2", 5, 2, 15, True, True, True, 57344.0)
"""FP8 E5M2 (IEEE-like): inf and NaN, max 57344."""
E2M3 = FloatFormat("float6_e2m3fn", "e2m3", 2, 3, 1, True, False, False, 7.5)
"""FP6 E2M3 (OCP MX): no inf/NaN, max 7.5."""
E3M2 = FloatFormat("float6_e3m2fn", "e3m2", 3, 2, 3, True, False, False, 28.0)
"""FP6 E3M2 (OCP MX): no inf/NaN, max 28."""
E2M1 = FloatFormat("float4_e2m1fn", "e2m1", 2, 1, 1, True, False, False, 6.0)
"""FP4 E2M1 (OCP MX): no inf/NaN, values 0, 0.5, 1, 1.5, 2, 3, 4, 6."""
E8M0 = FloatFormat("float8_e8m0fnu", "e8m0", 8, 0, 127, False, False, True, 2.0**127)
"""E8M0 (OCP MX scale): unsigned powers of two 2^-127..2^127, no zero, NaN = 0xFF."""

INT8 = IntFormat("int8", 8)
INT4 = IntFormat("int4", 4)
INT3 = IntFormat("int3", 3)
INT2 = IntFormat("int2", 2)
UINT8 = IntFormat("uint8", 8, signed=False)
UINT4 = IntFormat("uint4", 4, signed=False)
UINT2 = IntFormat("uint2", 2, signed=False)
NF4 = LookupFormat("nf4", 4, NF4_LEVELS)
