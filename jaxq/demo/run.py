"""``jaxq demo`` end to end: train every run, quantize the float32 one, write the report.

Example:
    >>> from jaxq.demo.run import select
    >>> [s.name for s in select(["fp8_current", "ptq_w4"])]
    ['float32', 'fp8_current', 'ptq_w4']
    >>> select(["fp9"])
    Traceback (most recent call last):
    ...
    ValueError: unknown run(s) ['fp9']; valid: float32, bf16, fp8_current, ...
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxq.demo import report
from jaxq.demo.serving import SERVING, calibration_batches, checkpoint_bytes, serve_run
from jaxq.demo.training import PRESETS, RUNS, Preset, corpus, prepare_run, train_run

__all__ = ["NAMES", "select", "run"]

NAMES: tuple[str, ...] = (*RUNS, *SERVING)
"""Every run's command-line name: training runs, then serving (``ptq_*``) rows."""

SCALE_PLOT_RUNS = ("fp8_delayed", "fp8_current", "fp8_blockwise", "mxfp8")


def select(names=None) -> list:
    """The specs of ``names`` (all when ``None``) in table order. The float32 run is always
    included: every ratio is against it, and the serving rows quantize it.

    Raises:
        ValueError: an unknown name; the message lists the valid ones.
    """
    if names is None:
        names = NAMES
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ValueError(f"unknown run(s) {unknown}; valid: {', '.join(NAMES)}")
    chosen = {"float32", *names}
    return [RUNS[n] for n in RUNS if n in chosen] + [SERVING[n] for n in SERVING if n in chosen]


class _Bars:
    """One progress bar per run (rich), with the last loss and the time left."""

    def __init__(self, enabled: bool):
        self.progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,  # fmt: skip
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description:<30.30}"), BarColumn(bar_width=20),
                MofNCompleteColumn(), TextColumn("{task.fields[info]:<11}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=Console(stderr=True),
            )  # fmt: skip

    def __enter__(self):
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def task(self, label: str, total: int):
        if self.progress is None:
            return lambda done, info="": None
        tid = self.progress.add_task(label, total=total, info="")

        def update(done, info=""):
            self.progress.update(tid, completed=done, info=info)

        return update


def run(names=None, *, preset: str | Preset = "default", steps: int | None = None,
        seed: int = 0, out: str | Path = "jaxq-demo", progress: bool = True,
        log=print) -> dict:  # fmt: skip
    """Runs the demo and writes ``results.md``, ``results.json``, ``loss_curves.png`` and
    ``scales_<run>.png`` into ``out``.

    Args:
        names: runs to include (:data:`NAMES`; default all); float32 always runs.
        preset: a :data:`jaxq.demo.training.PRESETS` key or a :class:`Preset`.
        steps: overrides the preset's steps.
        seed: initialisation and data seed shared by every run.
        out: output directory (created).
        progress: draw progress bars (on stderr).
        log: where progress lines go when bars are off.

    Returns:
        ``{"table": rows, "markdown": str, "header": str, "out": Path, "files": [...],
        "trained": [RunResult], "served": [ServingResult], "seconds": float}``.
    """
    specs = select(names)
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be positive, got {steps}")
        preset = dataclasses.replace(preset, steps=steps)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    trained, served, files = [], [], []
    training = [spec for spec in specs if spec.name in RUNS]
    with _Bars(progress) as bars:
        prepared = _prepare(training, preset, seed, bars, log if not progress else None)
        for spec, ready in zip(training, prepared, strict=True):
            update = bars.task(spec.label.format(g=preset.group), preset.steps)
            result = train_run(spec, preset, seed=seed, prepared=ready,
                               on_step=lambda i, loss, u=update: u(i, f"loss {loss:.3f}"))
            update(preset.steps, f"val {result.val_loss:.3f}")
            if not progress:
                log(f"  {result.label:44s} val {result.val_loss:.4f}  ({result.seconds:.0f} s)")
            trained.append(result)
        serving = [s for s in specs if s.name in SERVING]
        float_run = next(r for r in trained if r.spec.name == "float32")
        float_disk = checkpoint_bytes(_state(float_run.model))
        batches = calibration_batches(preset, seed=seed) if serving else []
        for spec in serving:
            update = bars.task(spec.label.format(g=preset.group), 1)
            result = serve_run(spec, float_run.model, preset, batches)
            update(1, f"val {result.val_loss:.3f}")
            if not progress:
                log(f"  {result.label:44s} val {result.val_loss:.4f}  ({result.seconds:.0f} s)")
            served.append(result)

    table = report.rows(trained, served, float_disk)
    md = report.markdown(table)
    meta = _meta(preset, seed, time.perf_counter() - t_start)
    header = _header(meta)
    (out / "results.md").write_text(f"{header}\n\n{md}\n")
    report.write_json(out / "results.json", table, meta)
    files += [out / "results.md", out / "results.json"]
    png = report.plot_losses(out / "loss_curves.png", trained,
                             title=f"GPT {preset.n_layers}x{preset.d_model}, "
                                   f"{preset.steps} steps, seed {seed}")  # fmt: skip
    if png is not None:
        files.append(png)
    scale_png = _scale_plot(out, trained, preset, seed)
    if scale_png is not None:
        files.append(scale_png)
    return {"table": table, "markdown": md, "header": header, "out": out, "files": files,
            "trained": trained, "served": served,
            "seconds": time.perf_counter() - t_start}  # fmt: skip


def _prepare(specs, preset: Preset, seed: int, bars, log) -> list:
    """Builds and compiles every training run before any is timed, compiling on all cores
    at once (XLA compiles outside Python's lock); training then runs one run at a time."""
    t0 = time.perf_counter()
    update = bars.task(f"compiling {len(specs)} train steps", len(specs))
    workers = max(1, min(len(specs), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(prepare_run, spec, preset, seed=seed) for spec in specs]
        for done, _ in enumerate(concurrent.futures.as_completed(futures), 1):
            update(done)
        prepared = [f.result() for f in futures]
    if log is not None:
        log(f"  compiled {len(specs)} train steps on {workers} threads "
            f"({time.perf_counter() - t0:.0f} s)")
    return prepared


def _state(model):
    from flax import nnx

    return nnx.state(model)


def _scale_plot(out: Path, trained, preset: Preset, seed: int):
    """Where the first FP8 run's matmul operands sit against E4M3/E5M2 after training.

    The trained parameters are loaded into the plain GPT, so the report lists the tensors
    the FP8 casts see (weights, each projection's output, the backward products) rather
    than the casts' own arithmetic; one batch of 4 sequences.
    """
    from flax import nnx

    from jaxq import analysis, data
    from jaxq.analysis.report import ScaleReport
    from jaxq.models.gpt import GPT
    from jaxq.models.train import cross_entropy

    fp8 = next((r for name in SCALE_PLOT_RUNS for r in trained if r.spec.name == name), None)
    if fp8 is None:
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    model = GPT(preset.gpt_config(), rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(fp8.model, nnx.Param))
    train_np, _ = corpus(preset.corpus_bytes)
    x, y = data.batch(jnp.asarray(train_np), jax.random.key(seed + 7), batch_size=4,
                      seq_len=preset.seq_len)  # fmt: skip
    rep = analysis.track_scales(lambda m, x, y: cross_entropy(m(x), y), model, x, y)
    keep = [e for e in rep if e.primitive == "dot_general"
            or (e.phase == "input" and e.name.endswith("kernel"))]  # fmt: skip
    path = out / f"scales_{fp8.spec.name}.png"
    analysis.plot_scales(ScaleReport(tuple(keep)), path,
                         title=f"{fp8.label}: weights and matmul outputs, forward and "
                               "backward, after training")  # fmt: skip
    return path


def _meta(preset: Preset, seed: int, seconds: float) -> dict:
    dev = jax.devices()[0]
    return {
        "date": str(datetime.date.today()), "jax": jax.__version__,
        "python": sys.version.split()[0], "machine": platform.machine(),
        "backend": f"{dev.platform} ({dev.device_kind})", "seed": seed,
        "preset": dataclasses.asdict(preset), "seconds": round(seconds, 1),
        "command": "jaxq " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("jaxq") else None,
    }  # fmt: skip


def _header(meta: dict) -> str:
    p = meta["preset"]
    return "\n".join([
        "# jaxq demo: one GPT trained in every precision, then quantized for serving",
        "",
        f"- {meta['date']}; jax {meta['jax']}, Python {meta['python']}, {meta['backend']}; "
        f"wall time {meta['seconds']:.0f} s.",
        f"- GPT {p['n_layers']} layers, d_model {p['d_model']}, {p['n_heads']} heads, "
        f"seq {p['seq_len']}, byte-level; batch {p['batch_size']}, {p['steps']} steps, "
        f"AdamW peak lr {p['learning_rate']:g} (warm-up + cosine), seed {meta['seed']}; "
        "same initialisation and batches for every GPT run.",
        "- Quantized: every projection of the transformer blocks (`jaxq.quantize_model` with "
        "rule `blocks/.*`; PTQ rows: `jaxq.ptq.convert` of the float32 run, "
        f"{p['calibration_batches']} calibration batches of 8); embeddings, norms and the "
        "tied readout stay float32.",
        f"- val loss: nats/byte on {p['eval_windows']} held-out windows; step time: the "
        "fastest train step after compilation, over float32's; weights: parameters "
        "(training) or serving state (PTQ); "
        "on disk: orbax checkpoint of the serving state.",
    ])  # fmt: skip
