"""``plot_scales``: a PNG of every tensor's log2 RMS against the E4M3 and E5M2 ranges."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

from jaxq.analysis.report import PHASES, ScaleReport, format_range

__all__ = ["plot_scales"]

_PHASE_COLOR = {"input": "#555555", "forward": "#1f77b4", "backward": "#d62728"}


def _import_pyplot():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "jaxq.analysis.plot_scales needs matplotlib; install it with "
            "`pip install matplotlib` or `pip install jaxq[plot]`"
        ) from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_scales(
    report: ScaleReport,
    path: str | os.PathLike,
    *,
    phases: Iterable[str] = PHASES,
    formats: Iterable = ("e4m3", "e5m2"),
    title: str | None = None,
    dpi: int = 110,
) -> str:
    """Writes a PNG: one row per tensor, its log2 RMS against formats' representable ranges.

    Each row is one tensor of ``report`` (execution order, top to bottom; inputs grey,
    forward blue, backward red). The dot is ``log2 RMS``; the thin bar runs to
    ``log2 amax``. Shaded vertical bands are each format's range: dark from ``min_normal``
    to ``max`` (full precision), light from ``min_subnormal`` to ``min_normal`` (subnormal,
    losing mantissa bits). A dot left of a band underflows to zero in that format, a dot or
    bar right of it saturates. Row labels are red when the RMS lies outside the first
    format's range. Non-finite tensors are drawn as a black ``x`` at the right edge,
    all-zero tensors as a hollow dot at the left edge.

    Args:
        report: from :func:`jaxq.analysis.track_scales`.
        path: where to write the PNG (parent directories must exist).
        phases: which phases to draw.
        formats: float formats (objects or names) whose ranges are shaded.
        title: figure title (default: a count of tensors and flagged ones).
        dpi: resolution.

    Returns:
        ``path`` as a string.

    Raises:
        ImportError: if matplotlib is not installed (with how to install it).
        TypeError: if ``report`` is not a ScaleReport or a format is not a float format.
        ValueError: if no tensor is left to draw.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxq.analysis import track_scales, plot_scales
        >>> rep = track_scales(lambda x: jnp.sum(jnp.tanh(x)), jnp.ones(8))
        >>> plot_scales(rep, "/tmp/scales.png")
        '/tmp/scales.png'
    """
    if not isinstance(report, ScaleReport):
        raise TypeError(f"report must be a ScaleReport from track_scales, got {type(report)!r}")
    phases = tuple(phases)
    formats = tuple(formats)
    ranges = [(str(getattr(f, "short", f)).upper(), format_range(f)) for f in formats]
    rows = report.phase(*phases)
    if not rows:
        raise ValueError(f"report has no tensors in phases {phases}")
    plt = _import_pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n = len(rows)
    finite = [e.log2_rms for e in rows if math.isfinite(e.log2_rms)]
    finite += [e.log2_amax for e in rows if math.isfinite(e.log2_amax)]
    bounds = [b for _, r in ranges for b in (r[0], r[2])]
    lo = math.floor(min(finite + bounds) - 2)
    hi = math.ceil(max(finite + bounds) + 2)

    height = min(max(3.0, 0.17 * n + 1.6), 120.0)
    fig, ax = plt.subplots(figsize=(11, height))
    band_colors = ["#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
    legend = []
    for k, (label, (sub, normal, mx)) in enumerate(ranges):
        c = band_colors[k % len(band_colors)]
        ax.axvspan(normal, mx, color=c, alpha=0.13, lw=0)
        ax.axvspan(sub, normal, color=c, alpha=0.06, lw=0)
        for x in (sub, mx):
            ax.axvline(x, color=c, lw=1.0, ls="--")
        legend.append(
            Patch(
                facecolor=c,
                alpha=0.35,
                label=f"{label}: normal [2^{normal:.0f}, 2^{mx:.2f}], subnormal from 2^{sub:.0f}",
            )
        )
    ys = list(range(n))
    first = ranges[0][1] if ranges else None
    labels, colors = [], []
    for y, e in zip(ys, rows, strict=True):
        c = _PHASE_COLOR[e.phase]
        if e.nonfinite:
            ax.plot([hi - 0.5], [y], marker="x", color="black", ms=6)
        elif not math.isfinite(e.log2_rms):
            ax.plot([lo + 0.5], [y], marker="o", mfc="none", color=c, ms=5)
        else:
            ax.plot([e.log2_rms, e.log2_amax], [y, y], color=c, lw=1.0, alpha=0.6)
            ax.plot([e.log2_rms], [y], marker="o", color=c, ms=4.5)
        labels.append(e.label)
        bad = first is not None and (
            e.nonfinite
            or e.log2_rms > first[2]
            or (math.isfinite(e.log2_rms) and e.log2_rms < first[0])
        )
        colors.append("#d62728" if bad else "black")
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=7, family="monospace")
    for t, c in zip(ax.get_yticklabels(), colors, strict=True):
        t.set_color(c)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("log2 of tensor scale (dot: RMS, bar to: absmax)")
    ax.grid(axis="x", color="#dddddd", lw=0.5)
    ax.set_axisbelow(True)
    legend += [
        Line2D([], [], marker="o", ls="", color=_PHASE_COLOR[p], label=p)
        for p in PHASES
        if p in phases
    ]
    ax.tick_params(axis="x", labeltop=True, top=True)
    if title is None and ranges:
        nflag = len(report.flagged(formats[0], phases=phases))
        title = f"{n} tensors; {nflag} outside the {ranges[0][0]} range (red labels)"
    # Title and legend above the axes, where a tall figure's reader starts.
    head = 0.55 + 0.2 * math.ceil(len(legend) / 2)
    fig.subplots_adjust(top=1 - head / height)
    fig.legend(
        handles=legend,
        loc="upper center",
        ncol=2,
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, 1 - 0.3 / height),
    )
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.05 / height, va="top")
    path = os.fspath(path)
    fig.savefig(path, dpi=dpi, format="png", bbox_inches="tight")
    plt.close(fig)
    return path
