"""The ``jaxq`` command line.

Subcommands (each registers itself in :func:`build_parser`; later ones, such as a training
comparison, add a ``_add_<name>`` function and a line in ``_SUBCOMMANDS``):

* ``jaxq demo``: bits per element and SQNR of every format on Gaussian, heavy-tailed and
  outlier-channel data (see :mod:`jaxq.demo`).

Example:
    >>> from jaxq.cli import main
    >>> main(["demo", "--format", "e4m3", "--size", "4096"])  # doctest: +ELLIPSIS
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


def _add_demo(sub) -> None:
    from jaxq.demo import CASES

    keys = ", ".join(c.key for c in CASES)
    p = sub.add_parser(
        "demo",
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
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from jaxq.demo import float_sqnr_theory, format_table, run_demo

    formats = None
    if args.format:
        formats = [f for group in args.format for f in group.split(",")]
    t0 = time.perf_counter()
    try:
        rows = run_demo(formats=formats, size=args.size, seed=args.seed)
    except ValueError as e:
        print(f"jaxq demo: error: {e}", file=sys.stderr)
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


_SUBCOMMANDS = (_add_demo,)


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
