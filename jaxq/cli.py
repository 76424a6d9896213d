"""The ``jaxq`` command line.

Subcommands (each registers itself in :func:`build_parser` through an ``_add_<name>``
function listed in ``_SUBCOMMANDS``):

* ``jaxq demo``: one GPT trained in every precision (float32, bf16, FP8 current / delayed /
  blockwise, MXFP8, NVFP4, INT8 and INT4 QAT, a unit-scaled FP8 decoder, 8-bit AdamW),
  then quantized for serving with ``jaxq.ptq``; a table, loss curves and a scale plot (see
  :mod:`jaxq.demo.run`).
* ``jaxq formats``: bits per element and SQNR of every format on Gaussian, heavy-tailed
  and outlier-channel data (see :mod:`jaxq.demo.formats_table`).

Example:
    >>> from jaxq.cli import main
    >>> main(["formats", "--format", "e4m3", "--size", "4096"])  # doctest: +ELLIPSIS
    | format | scales | bits/elem | gaussian | laplace | student-t3 | outliers | ...
    ...
    0
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

__all__ = ["main", "build_parser", "parse_size"]


def parse_size(text: str) -> int:
    """``"64K"`` -> 65536: an element count with an optional K/M suffix (powers of 1024).

    Raises:
        argparse.ArgumentTypeError: for anything else.
    """
    t = text.strip().upper()
    mult = {"K": 2**10, "M": 2**20}.get(t[-1:], 1)
    num = t[:-1] if mult > 1 else t
    try:
        value = int(num) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--size must be an integer with an optional K or M suffix, got {text!r}"
        ) from None
    if value <= 0 or value % 256:
        raise argparse.ArgumentTypeError(
            f"--size must be a positive multiple of 256 elements, got {text!r} = {value}"
        )
    return value


def _add_formats(sub) -> None:
    from jaxq.demo.formats_table import CASES

    keys = ", ".join(c.key for c in CASES)
    p = sub.add_parser(
        "formats",
        help="bits/element and SQNR of every format on Gaussian, heavy-tailed, outlier data",
        description="Quantize and dequantize float32 data of shape (size/256, 256) with every "
        "format; print bits per element (scales included, from QArray.nbytes) and the SQNR in "
        "dB on Gaussian, Laplace, Student-t(3) and outlier-channel data.",
    )
    p.add_argument(
        "--format",
        action="append",
        metavar="NAME[,NAME...]",
        help=f"only these formats (repeat or comma-separate); one of: {keys}",
    )
    p.add_argument(
        "--size",
        type=parse_size,
        default=2**18,
        help="elements per array, a multiple of 256 (K/M suffixes allowed; default 256K)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the data (default 0)")
    p.set_defaults(func=_run_formats)


def _run_formats(args: argparse.Namespace) -> int:
    from jaxq.demo.formats_table import float_sqnr_theory, format_table, measure_formats

    formats = None
    if args.format:
        formats = [f for group in args.format for f in group.split(",")]
    t0 = time.perf_counter()
    try:
        rows = measure_formats(formats=formats, size=args.size, seed=args.seed)
    except ValueError as e:
        print(f"jaxq formats: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    print()
    print(
        f"SQNR in dB (higher is better) of dequantize(quantize(x)) on {args.size} float32 "
        f"elements per dataset, shape ({args.size // 256}, 256), seed {args.seed}; bits/elem "
        "counts codes and scales. Theory for per-tensor floats with log-uniform mantissas: "
        f"{float_sqnr_theory(3):.1f} dB for E4M3, {float_sqnr_theory(2):.1f} dB for E5M2. "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return 0


def _add_demo(sub) -> None:
    from jaxq.demo.run import NAMES
    from jaxq.demo.training import PRESETS

    p = sub.add_parser(
        "demo",
        help="train one GPT in every precision, quantize it for serving, compare",
        description="Trains jaxq.models.GPT on the embedded corpus (the standard library's "
        "Python sources) with the same seed and data in every precision through "
        "jaxq.quantize_model, converts the float32 model with jaxq.ptq, and prints and "
        "writes one table (results.md, results.json), the loss curves (loss_curves.png) "
        "and a per-tensor scale plot of an FP8 run (scales_*.png).",
    )
    p.add_argument(
        "--recipes",
        action="append",
        metavar="NAME[,NAME...]",
        help="only these runs (repeat or comma-separate; float32 always runs); one of: "
        + ", ".join(NAMES),
    )
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="sizes: default (meant for a 5-minute run on 2 CPU cores), full ("
                   "the README's runs), gpu (bigger); default: 'gpu' on a GPU, else 'default'")
    p.add_argument("--steps", type=int, default=None, help="training steps per run")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data seed")
    p.add_argument("--out", default="jaxq-demo", help="output directory (default ./jaxq-demo)")
    p.add_argument("--no-progress", action="store_true", help="plain lines instead of bars")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="persistent XLA compilation cache (reruns compile nothing); "
                   "default ~/.cache/jaxq/xla, 'off' to disable")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    import jax

    from jaxq.demo.run import run, select

    names = None
    if args.recipes:
        names = [n for group in args.recipes for n in group.split(",")]
    try:
        select(names)
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be positive, got {args.steps}")
    except ValueError as e:
        print(f"jaxq demo: error: {e}", file=sys.stderr)
        return 2
    cache = args.compile_cache or str(Path.home() / ".cache" / "jaxq" / "xla")
    if cache != "off":
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    preset = args.preset or ("gpu" if jax.default_backend() == "gpu" else "default")
    result = run(names, preset=preset, steps=args.steps, seed=args.seed, out=args.out,
                 progress=not args.no_progress)  # fmt: skip
    print(result["header"])
    print()
    print(result["markdown"])
    print()
    for f in result["files"]:
        print(f"wrote {f}")
    if not any(str(f).endswith(".png") for f in result["files"]):
        print("no plots: matplotlib is not installed (pip install 'jaxq[plot]')")
    print(f"output directory: {Path(result['out']).absolute()} "
          f"({result['seconds']:.0f} s)")  # fmt: skip
    return 0


_SUBCOMMANDS = (_add_demo, _add_formats)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="jaxq", description="jaxq: quantization and low-precision training for JAX."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``jaxq`` command line; returns the exit status.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on a usage error reported by the subcommand.
    """
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
