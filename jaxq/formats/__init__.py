"""Number formats as typed, frozen objects.

Element formats (``FloatFormat``, ``IntFormat``, ``LookupFormat``) and block formats
(``BlockFormat``). Look one up by name with :func:`get`.

Example:
    >>> from jaxq import formats
    >>> formats.get("e4m3") is formats.E4M3
    True
    >>> formats.get("float4_e2m1fn").max
    6.0
"""

from __future__ import annotations

from jaxq.formats.block import (
    MXFP4,
    MXFP6_E2M3,
    MXFP6_E3M2,
    MXFP8,
    MXFP8_E5M2,
    NVFP4,
    BlockFormat,
)
from jaxq.formats.element import (
    E2M1,
    E2M3,
    E3M2,
    E4M3,
    E5M2,
    E8M0,
    INT2,
    INT3,
    INT4,
    INT8,
    NF4,
    NF4_LEVELS,
    UINT2,
    UINT4,
    UINT8,
    FloatFormat,
    IntFormat,
    LookupFormat,
)

Format = FloatFormat | IntFormat | LookupFormat | BlockFormat
ElementFormat = FloatFormat | IntFormat | LookupFormat

ALL: tuple[Format, ...] = (
    E4M3, E5M2, E2M3, E3M2, E2M1, E8M0,
    INT8, INT4, INT3, INT2, UINT8, UINT4, UINT2, NF4,
    MXFP8, MXFP8_E5M2, MXFP6_E2M3, MXFP6_E3M2, MXFP4, NVFP4,
)  # fmt: skip

_BY_NAME: dict[str, Format] = {}
for _f in ALL:
    _BY_NAME[_f.name] = _f
    _BY_NAME[_f.short] = _f
_BY_NAME.update(
    {
        "fp8": E4M3, "float8": E4M3, "fp6": E2M3, "fp4": E2M1, "mxfp6": MXFP6_E2M3,
        "mxfp8_e4m3": MXFP8, "mxfp4_e2m1": MXFP4,
    }
)  # fmt: skip


def get(name: str | Format) -> Format:
    """Returns the format called ``name`` (ml_dtypes name or short alias, case-insensitive).

    A format object is returned unchanged.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
        TypeError: for anything that is neither a string nor a format.

    Example:
        >>> get("nvfp4").block_size
        16
    """
    if isinstance(name, (FloatFormat, IntFormat, LookupFormat, BlockFormat)):
        return name
    if not isinstance(name, str):
        raise TypeError(f"fmt must be a format name or a jaxq format object, got {type(name)!r}")
    try:
        return _BY_NAME[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown format {name!r}; valid names: {', '.join(sorted(_BY_NAME))}"
        ) from None


__all__ = [
    "ALL", "Format", "ElementFormat", "get",
    "FloatFormat", "IntFormat", "LookupFormat", "BlockFormat",
    "E4M3", "E5M2", "E2M3", "E3M2", "E2M1", "E8M0",
    "INT8", "INT4", "INT3", "INT2", "UINT8", "UINT4", "UINT2", "NF4", "NF4_LEVELS",
    "MXFP8", "MXFP8_E5M2", "MXFP6_E2M3", "MXFP6_E3M2", "MXFP4", "NVFP4",
]  # fmt: skip
