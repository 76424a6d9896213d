"""The comparison ``jaxq demo`` prints and writes: one table (Markdown and JSON), the loss
curves of every run in one PNG, and a per-tensor scale plot of one FP8 run.

Every row is relative to the float32 run: ``vs float32`` is
:math:`\\mathcal{L}_\\text{val} / \\mathcal{L}_\\text{val}^\\text{fp32} - 1` and the step-time
column is the fastest train step's wall time (after compilation) over float32's.

Example:
    >>> from jaxq.demo.report import fmt_bytes
    >>> fmt_bytes(3 * 2**20)
    '3.00 MiB'
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

__all__ = ["rows", "markdown", "write_json", "plot_losses", "fmt_bytes"]


def fmt_bytes(n: int | None) -> str:
    """``n`` bytes in KiB/MiB (``"—"`` for ``None``)."""
    if n is None:
        return "—"
    if n >= 2**20:
        return f"{n / 2**20:.2f} MiB"
    return f"{n / 2**10:.1f} KiB"


def rows(train_results, serve_results, float_disk_bytes: int | None = None) -> list[dict]:
    """One dict per run, float32 first, with the ratios to the float32 run filled in."""
    base = next((r for r in train_results if r.spec.name == "float32"), None)
    out = []
    for r in train_results:
        out.append({
            "name": r.spec.name, "label": r.label, "kind": "train",
            "val_loss": r.val_loss, "final_train_loss": float(r.losses[-1]),
            "step_seconds": r.step_seconds, "weight_bytes": r.weight_bytes,
            "optimizer_bytes": r.optimizer_bytes,
            "disk_bytes": float_disk_bytes if r.spec.name == "float32" else None,
            "seconds": r.seconds, "losses": [float(x) for x in r.losses],
        })  # fmt: skip
    for r in serve_results:
        out.append({
            "name": r.spec.name, "label": r.label, "kind": "serve",
            "val_loss": r.val_loss, "step_seconds": None, "weight_bytes": r.weight_bytes,
            "optimizer_bytes": None, "disk_bytes": r.disk_bytes, "seconds": r.seconds,
            "float_layers": r.float_layers,
        })  # fmt: skip
    for row in out:
        row["vs_float32"] = row["val_loss"] / base.val_loss - 1 if base else None
        row["step_ratio"] = (row["step_seconds"] / base.step_seconds
                             if base and row["step_seconds"] is not None else None)  # fmt: skip
        row["weight_ratio"] = row["weight_bytes"] / base.weight_bytes if base else None
    return out


def _pct(x) -> str:
    if x is None:
        return "—"
    if not math.isfinite(x):
        return "diverged"
    return f"{100 * x:+.2f}%"


def markdown(table: list[dict]) -> str:
    """The comparison as a Markdown table."""
    lines = [
        "| run | val loss | vs float32 | step time | weights | optimizer state | on disk |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        step = "—" if r["step_ratio"] is None else f"{r['step_ratio']:.2f}x"
        weights = fmt_bytes(r["weight_bytes"])
        if r["kind"] == "serve" and r["weight_ratio"] is not None:
            weights += f" ({r['weight_ratio']:.2f}x)"
        val = f"{r['val_loss']:.4f}" if math.isfinite(r["val_loss"]) else "nan"
        lines.append(f"| {r['label']} | {val} | {_pct(r['vs_float32'])} | {step} | {weights} | "
                     f"{fmt_bytes(r['optimizer_bytes'])} | {fmt_bytes(r['disk_bytes'])} |")
    return "\n".join(lines)


def write_json(path: Path, table: list[dict], meta: dict) -> None:
    """The table and the run's settings (``meta``) as JSON (NaN written as ``null``)."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean({"meta": meta, "runs": table}), indent=1))


def plot_losses(path: Path, train_results, *, title: str = "") -> Path | None:
    """Training-loss curves of every run in one PNG (a 10-step moving average over the raw
    losses, drawn faintly). Returns ``None`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(13, 5))
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(train_results):
        losses = np.asarray(r.losses, np.float64)
        steps = np.arange(1, len(losses) + 1)
        k = min(10, len(losses))
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        style = "-" if r.spec.name in ("float32", "bf16") else "--" if i % 2 else "-."
        for a in (ax, zoom):
            a.plot(steps, losses, color=cmap(i), alpha=0.15, linewidth=0.8)
            a.plot(steps[k - 1:], smooth, style, color=cmap(i), linewidth=1.6,
                   label=f"{r.label} ({r.val_loss:.3f})")  # fmt: skip
    n = max(len(r.losses) for r in train_results)
    finite = [x for r in train_results for x in r.losses[n // 2:] if math.isfinite(x)]
    if finite:
        lo, hi = min(finite), np.percentile(finite, 95)
        zoom.set_xlim(n // 2, n)
        zoom.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
    ax.set_title(title or "training loss")
    zoom.set_title("second half, zoomed")
    for a in (ax, zoom):
        a.set_xlabel("step")
        a.set_ylabel("train loss (nats/byte)")
        a.grid(alpha=0.3)
    zoom.legend(fontsize=7, title="run (val loss)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
