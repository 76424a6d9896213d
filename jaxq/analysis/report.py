"""The result of :func:`jaxq.analysis.track_scales`: one row per tensor, and range checks.

A tensor's scale is summarised by its root mean square over its finite entries,

.. math::  \\mathrm{RMS}(x) = \\sqrt{\\tfrac{1}{n_f} \\textstyle\\sum_{i \\in F} x_i^2},
           \\quad F = \\{i : x_i \\text{ finite}\\},\\ n_f = |F|,

reported as ``log2_rms = log2(RMS)`` (bits; ``-inf`` for an all-zero tensor, ``nan`` when no
entry is finite), together with ``log2_amax = log2(max_i |x_i|)`` over finite entries and
the count of non-finite entries. A float format with largest finite value ``max`` and
smallest positive value ``min_subnormal`` holds a tensor "in range" when
``log2(min_subnormal) <= log2_rms <= log2(max)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

__all__ = ["TensorScale", "ScaleReport", "format_range"]

PHASES = ("input", "forward", "backward")


@dataclasses.dataclass(frozen=True)
class TensorScale:
    """Scale statistics of one tensor of a forward/backward computation.

    Attributes:
        index: position in execution order (inputs first).
        name: ``"<module path>/<scope>/<primitive>"`` with empty parts dropped, e.g.
            ``"fc1/dot_general"``; for inputs, the argument name and pytree path, e.g.
            ``"x"`` or ``"fc1/kernel"``.
        phase: ``"input"`` (an argument leaf), ``"forward"`` (computing the loss, including
            residuals that JAX's linearisation computes for the backward pass) or
            ``"backward"`` (the transposed, gradient computation).
        primitive: the jaxpr primitive that produced the tensor (``"input"`` for inputs).
        shape: the tensor's shape.
        dtype: the tensor's dtype name, e.g. ``"float32"``.
        log2_rms: ``log2`` of the RMS of the finite entries (bits).
        log2_amax: ``log2`` of the largest finite magnitude (bits).
        nonfinite: number of inf/NaN entries.
        module: the Flax NNX module path that computed it (``""`` for the root module,
            ``None`` outside any module; ``*`` marks a path component that could not be
            told apart, e.g. ``"layers/*"`` for a module called in a Python loop).
        scope: the JAX name stack (``jax.named_scope``, ``jax.named_call``, jitted function
            names, Linen module names) without JAX's ``jvp(..)``/``transpose(..)`` markers.
        source: ``"file:line"`` of the innermost user frame that traced the op.
        grad_of: for a tensor that is a returned gradient, the name of the input it is the
            gradient of; else ``None``.

    Example:
        >>> t = TensorScale(0, "x", "input", "input", (2,), "float32", 0.0, 0.5, 0)
        >>> t.rms
        1.0
    """

    index: int
    name: str
    phase: str
    primitive: str
    shape: tuple[int, ...]
    dtype: str
    log2_rms: float
    log2_amax: float
    nonfinite: int
    module: str | None = None
    scope: str = ""
    source: str = ""
    grad_of: str | None = None

    @property
    def rms(self) -> float:
        """The RMS itself, ``2 ** log2_rms``."""
        return float(2.0**self.log2_rms)

    @property
    def label(self) -> str:
        """A one-line label: index, phase, name, shape and (if any) the gradient's input."""
        shape = "x".join(str(d) for d in self.shape) or "scalar"
        grad = f" (grad {self.grad_of})" if self.grad_of else ""
        phase = {"input": "in ", "forward": "fwd", "backward": "bwd"}[self.phase]
        return f"{self.index:>3} {phase} {self.name} [{shape}]{grad}"


def format_range(fmt) -> tuple[float, float, float]:
    """``(log2 min_subnormal, log2 min_normal, log2 max)`` of a float format.

    Args:
        fmt: a :class:`jaxq.formats.FloatFormat` or its name (``"e4m3"``, ...).

    Returns:
        The three bounds in bits.

    Raises:
        TypeError: if ``fmt`` is not a float element format (integer, lookup and block
            formats are scaled per tensor/channel/block, so raw ranges do not apply).

    Example:
        >>> format_range("e4m3")
        (-9.0, -6.0, 8.807354922057604)
    """
    from jaxq import formats

    f = formats.get(fmt)
    if not isinstance(f, formats.FloatFormat):
        raise TypeError(
            f"fmt must be a float element format such as E4M3 or E5M2, got {f!r}; integer, "
            "lookup and block formats are scaled, so a raw dynamic range does not apply"
        )
    return (math.log2(f.min_subnormal), math.log2(f.min_normal), math.log2(f.max))


@dataclasses.dataclass(frozen=True)
class ScaleReport:
    """All tensors of a forward + backward pass with their scales.

    Attributes:
        entries: one :class:`TensorScale` per floating-point tensor, in execution order.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxq.analysis import track_scales
        >>> rep = track_scales(lambda w, x: jnp.sum(jnp.tanh(x @ w)),
        ...                    jnp.ones((4, 2)), jnp.ones((3, 4)))
        >>> [e.primitive for e in rep.forward][:2]
        ['dot_general', 'tanh']
        >>> flags = {(e.name, why) for e, why in rep.flagged("e4m3")}  # tanh'(4) ~ 2^-10.5
        >>> ("mul", "underflow") in flags, all(why == "underflow" for _, why in flags)
        (True, True)
    """

    entries: tuple[TensorScale, ...]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __getitem__(self, i: int) -> TensorScale:
        return self.entries[i]

    def phase(self, *phases: str) -> tuple[TensorScale, ...]:
        """Entries whose phase is one of ``phases`` (``"input"``, ``"forward"``, ``"backward"``)."""
        for p in phases:
            if p not in PHASES:
                raise ValueError(f"phases must be among {PHASES}, got {p!r}")
        return tuple(e for e in self.entries if e.phase in phases)

    @property
    def inputs(self) -> tuple[TensorScale, ...]:
        return self.phase("input")

    @property
    def forward(self) -> tuple[TensorScale, ...]:
        return self.phase("forward")

    @property
    def backward(self) -> tuple[TensorScale, ...]:
        return self.phase("backward")

    @property
    def gradients(self) -> dict[str, TensorScale]:
        """Input name -> the entry holding that input's gradient."""
        return {e.grad_of: e for e in self.entries if e.grad_of is not None}

    def find(self, substring: str, *, phase: str | None = None) -> tuple[TensorScale, ...]:
        """Entries whose name contains ``substring`` (optionally only one phase)."""
        return tuple(
            e for e in self.entries if substring in e.name and (phase is None or e.phase == phase)
        )

    def flagged(
        self,
        fmt,
        *,
        margin: float = 0.0,
        phases: Iterable[str] = PHASES,
    ) -> tuple[tuple[TensorScale, str], ...]:
        """Tensors whose scale falls outside what ``fmt`` represents, with the reason.

        A tensor is flagged

        * ``"nonfinite"`` if it holds any inf/NaN;
        * ``"overflow"`` if ``log2_rms + margin > log2(fmt.max)``: its typical value would
          saturate (or, unsaturated, become inf/NaN);
        * ``"underflow"`` if ``log2_rms - margin < log2(fmt.min_subnormal)``: its typical
          value would flush to zero.

        An all-zero tensor (``log2_rms = -inf``) is exactly representable and never flagged.

        Args:
            fmt: a float element format or its name, e.g. ``jaxq.formats.E4M3`` or ``"e5m2"``.
            margin: headroom in bits (octaves) demanded on each side; ``0`` checks the RMS
                itself, ``3`` asks that RMS * 8 does not overflow and RMS / 8 does not
                underflow.
            phases: which phases to check (e.g. ``("forward",)`` for E4M3 activations and
                ``("backward",)`` for E5M2 gradients).

        Returns:
            ``(entry, reason)`` pairs in execution order.

        Raises:
            TypeError: if ``fmt`` is not a float element format.
            ValueError: for a negative or non-finite ``margin`` or an unknown phase.

        Example:
            >>> import jax.numpy as jnp
            >>> from jaxq.analysis import track_scales
            >>> rep = track_scales(lambda x: jnp.mean(x * 2.0**20), jnp.ones(4))
            >>> [(e.primitive, why) for e, why in rep.flagged("e4m3", phases=("forward",))]
            [('mul', 'overflow'), ('reduce_sum', 'overflow'), ('div', 'overflow')]
        """
        lo, _, hi = format_range(fmt)
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin must be a finite number of bits >= 0, got {margin!r}")
        phases = tuple(phases)
        for p in phases:
            if p not in PHASES:
                raise ValueError(f"phases must be among {PHASES}, got {p!r}")
        out = []
        for e in self.entries:
            if e.phase not in phases:
                continue
            if e.nonfinite:
                out.append((e, "nonfinite"))
            elif e.log2_rms + margin > hi:
                out.append((e, "overflow"))
            elif math.isfinite(e.log2_rms) and e.log2_rms - margin < lo:
                out.append((e, "underflow"))
        return tuple(out)

    def table(self, *, max_rows: int | None = None) -> str:
        """A fixed-width text table of the entries (index, phase, name, shape, dtype, bits)."""
        rows = self.entries if max_rows is None else self.entries[:max_rows]
        width = max([len(e.name) for e in rows] + [4])
        lines = [
            f"{'#':>4}  {'phase':<8} {'name':<{width}}  {'shape':<14} {'dtype':<9} "
            f"{'log2 rms':>9} {'log2 amax':>9}"
        ]
        for e in rows:
            shape = "x".join(str(d) for d in e.shape) or "()"
            bad = f"  ({e.nonfinite} non-finite)" if e.nonfinite else ""
            lines.append(
                f"{e.index:>4}  {e.phase:<8} {e.name:<{width}}  {shape:<14} {e.dtype:<9} "
                f"{e.log2_rms:>9.2f} {e.log2_amax:>9.2f}{bad}"
            )
        if max_rows is not None and len(self.entries) > max_rows:
            lines.append(f"... {len(self.entries) - max_rows} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
