"""``jaxq formats``: storage cost and quantization error of every format on four kinds of data.

For each format the demo quantizes and dequantizes four float32 arrays of shape
``(rows, 256)`` (same seed, same arrays for every format) and reports

* **bits per element** including scales: ``8 * q.nbytes / x.size`` from the real bytes of
  the :class:`jaxq.QArray` (codes, scales, zero points, tensor scale);
* **SQNR** in dB: ``10 log10( sum x^2 / sum (x - dequantize(quantize(x)))^2 )``.

The data: ``gaussian`` N(0, 1); ``laplace`` Laplace(0, 1); ``student-t3`` Student-t with 3
degrees of freedom (heavy tails, infinite kurtosis); ``outliers`` N(0, 1) activations in
which 4 of the 256 channels (columns) are 100x larger, as in LLM activations. The outlier
channels hold most of that array's energy, so its SQNR mostly measures them; the column
``outliers: other ch.`` is the SQNR over the 252 ordinary channels of the same round trip,
which is what a scale shared with an outlier channel destroys.

Granularity: element formats get one per-tensor scale; ``INT8 per-channel`` has one scale
per row (per output channel of a ``(out, in)`` weight, per token of activations);
``g128``/``g64`` and the block formats (MX: 32, NVFP4: 16) scale blocks of consecutive
elements along the last axis.

Theory for per-tensor float formats: with a mantissa of ``m`` bits, round-to-nearest
error uniform within the ulp and mantissas spread log-uniformly over each binade (values in
the normal range), the SQNR is ``10 log10(18 / ln 2) + 20 log10(2) m = 14.1 + 6.02 m`` dB,
independent of the data's scale: 32.2 dB for E4M3 (m = 3) and 26.2 dB for E5M2 (m = 2).
Formats with 2 exponent bits (E2M1, E2M3) put much of the data in their subnormal range and
fall below this line.

Example:
    >>> from jaxq.demo.formats_table import measure_formats, format_table
    >>> rows = measure_formats(formats=["e4m3", "int8"], size=8192, seed=0)
    >>> [r.name for r in rows]
    ['E4M3', 'INT8 per-channel']
    >>> 30 < rows[0].sqnr["gaussian"] < 34
    True
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

__all__ = [
    "COLS",
    "DATASETS",
    "COLUMNS",
    "FormatCase",
    "CASES",
    "FormatRow",
    "make_data",
    "sqnr_db",
    "measure_formats",
    "format_table",
    "float_sqnr_theory",
]

COLS = 256
"""Columns (channels) of every demo array; blocks and groups run along them."""

DATASETS = ("gaussian", "laplace", "student-t3", "outliers")
COLUMNS = DATASETS + ("outliers: other ch.",)
"""Table columns: the four datasets, and the outlier data's SQNR over its ordinary channels."""
OUTLIER_CHANNELS = 4
OUTLIER_GAIN = 100.0


@dataclasses.dataclass(frozen=True)
class FormatCase:
    """One row of the demo: a format and the ``jaxq.quantize`` options it uses.

    Attributes:
        key: the name ``--format`` matches (lower case), e.g. ``"int4"``.
        name: the label printed, e.g. ``"INT4 g128"``.
        fmt: a format name for :func:`jaxq.quantize`.
        options: keyword arguments for :func:`jaxq.quantize` (``axis``, ``block_size``).
        granularity: how scales are shared, in words.
    """

    key: str
    name: str
    fmt: str
    options: tuple[tuple[str, int], ...] = ()
    granularity: str = "per-tensor"


CASES: tuple[FormatCase, ...] = (
    FormatCase("e4m3", "E4M3", "e4m3"),
    FormatCase("e5m2", "E5M2", "e5m2"),
    FormatCase("e2m3", "E2M3", "e2m3"),
    FormatCase("e3m2", "E3M2", "e3m2"),
    FormatCase("e2m1", "E2M1", "e2m1"),
    FormatCase("int8", "INT8 per-channel", "int8", (("axis", 0),), "per-row"),
    FormatCase("int4", "INT4 g128", "int4", (("block_size", 128),), "block 128"),
    FormatCase("int2", "INT2 g64", "int2", (("block_size", 64),), "block 64"),
    FormatCase("nf4", "NF4 g64", "nf4", (("block_size", 64),), "block 64"),
    FormatCase("mxfp8", "MXFP8", "mxfp8", (), "block 32, E8M0"),
    FormatCase("mxfp6_e2m3", "MXFP6_E2M3", "mxfp6_e2m3", (), "block 32, E8M0"),
    FormatCase("mxfp6_e3m2", "MXFP6_E3M2", "mxfp6_e3m2", (), "block 32, E8M0"),
    FormatCase("mxfp4", "MXFP4", "mxfp4", (), "block 32, E8M0"),
    FormatCase("nvfp4", "NVFP4", "nvfp4", (), "block 16, E4M3 + fp32"),
)


@dataclasses.dataclass(frozen=True)
class FormatRow:
    """Result for one format.

    Attributes:
        name: label, e.g. ``"MXFP4"``.
        granularity: how scales are shared.
        bits_per_element: stored bits per element, scales included.
        sqnr: dataset name -> SQNR in dB.
    """

    name: str
    granularity: str
    bits_per_element: float
    sqnr: dict[str, float]


def float_sqnr_theory(mantissa_bits: int) -> float:
    """SQNR (dB) of round-to-nearest on a float grid for log-uniform mantissas.

    ``10 log10(18 / ln 2) + 20 log10(2) * m``: the relative error of a value in a binade
    ``[2^e, 2^(e+1))`` is uniform within ``±2^(e-m-1)``, so the noise power is
    ``4^(e-m) / 12`` against a mean signal power of ``3 * 4^e / (2 ln 2)``.

    Example:
        >>> round(float_sqnr_theory(3), 1)
        32.2
    """
    return 10 * math.log10(18 / math.log(2)) + 20 * math.log10(2) * mantissa_bits


def make_data(size: int, *, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The four float32 demo arrays of ``size`` elements, shape ``(size // 256, 256)``.

    Returns:
        ``(arrays by dataset name, indices of the outlier channels)``.

    Raises:
        ValueError: if ``size`` is not a positive multiple of 256.
    """
    if not isinstance(size, int) or size <= 0 or size % COLS:
        raise ValueError(f"size must be a positive multiple of {COLS} elements, got {size!r}")
    rng = np.random.default_rng(seed)
    shape = (size // COLS, COLS)
    outl = rng.normal(size=shape)
    channels = rng.choice(COLS, size=OUTLIER_CHANNELS, replace=False)
    outl[:, channels] *= OUTLIER_GAIN
    data = {
        "gaussian": rng.normal(size=shape),
        "laplace": rng.laplace(size=shape),
        "student-t3": rng.standard_t(3, size=shape),
        "outliers": outl,
    }
    return {k: v.astype(np.float32) for k, v in data.items()}, np.sort(channels)


def sqnr_db(x: np.ndarray, xhat: np.ndarray) -> float:
    """``10 log10(sum x^2 / sum (x - xhat)^2)`` in float64 (``inf`` for an exact match).

    Example:
        >>> import numpy as np
        >>> round(sqnr_db(np.array([1.0, -1.0]), np.array([1.1, -0.9])), 2)
        20.0
    """
    x = np.asarray(x, np.float64)
    err = np.sum((x - np.asarray(xhat, np.float64)) ** 2)
    sig = np.sum(x**2)
    if err == 0:
        return math.inf
    return float(10 * np.log10(sig / err))


def _select(formats) -> list[FormatCase]:
    if formats is None:
        return list(CASES)
    keys = [f.strip().lower() for f in formats if f.strip()]
    by_key = {c.key: c for c in CASES}
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        raise ValueError(f"unknown format(s) {unknown}; choose from {', '.join(by_key)}")
    return [c for c in CASES if c.key in keys]


def measure_formats(*, formats=None, size: int = 2**18, seed: int = 0) -> list[FormatRow]:
    """Quantizes the demo data with each format and measures bits and SQNR.

    Args:
        formats: keys of :data:`CASES` to run (``None``: all), e.g. ``["e4m3", "nvfp4"]``.
        size: elements per array (a multiple of 256).
        seed: seed of the data (numpy ``default_rng``).

    Returns:
        One :class:`FormatRow` per selected format, in the order of :data:`CASES`.

    Raises:
        ValueError: unknown format or bad size.
    """
    import jaxq

    cases = _select(formats)
    data, channels = make_data(size, seed=seed)
    ordinary = np.setdiff1d(np.arange(COLS), channels)
    rows = []
    dequantize = jax.jit(jaxq.dequantize)
    for case in cases:
        quantize = jax.jit(lambda x, c=case: jaxq.quantize(x, c.fmt, **dict(c.options)))
        sq, bits = {}, None
        for name, x in data.items():
            q = quantize(x)
            bits = 8.0 * q.nbytes / x.size  # real bytes of codes + scales
            xhat = np.asarray(dequantize(q))
            sq[name] = sqnr_db(x, xhat)
            if name == "outliers":
                sq[COLUMNS[-1]] = sqnr_db(x[:, ordinary], xhat[:, ordinary])
        rows.append(FormatRow(case.name, case.granularity, bits, sq))
    return rows


def format_table(rows: list[FormatRow]) -> str:
    """A Markdown table of the rows: bits per element and SQNR (dB) per dataset."""
    head = "| format | scales | bits/elem | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(COLUMNS)]
    for r in rows:
        cells = " | ".join(f"{r.sqnr[d]:.1f}" for d in COLUMNS)
        lines.append(f"| {r.name} | {r.granularity} | {r.bits_per_element:.3g} | {cells} |")
    return "\n".join(lines)
