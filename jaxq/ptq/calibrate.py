"""Running a float model over calibration batches and recording each layer's product.

:class:`Recorder` gives every wrappable layer a ``dot_general`` (or einsum) that computes
the exact float product and records, per call:

* the kernel as the product sees it, in the canonical ``(B, N, K)`` orientation, and the
  product's dimension numbers;
* statistics of the canonical activations ``x`` (``(B, M, K)``), after the transforms a
  :class:`~jaxq.ptq.plan.Plan` already holds for the layer (rotation, smoothing):

  - ``amax``: the clipping range of the layer's activation quantizer per batch (its
    ``calibration``: the maximum over batches for ``Absmax``, the mean for
    ``Percentile``/``MSE``, as their per-batch values are estimates);
  - ``absmax_k``/``absmean_k``: per-channel ``max |x_k|`` and mean ``|x_k|``;
  - ``hessian``: ``H = 2/T Σ_t x_t x_tᵀ`` over the ``T`` tokens (GPTQ's proxy Hessian);
  - ``sample``: up to ``max_samples`` token rows of ``x`` (AWQ's search data).

Non-finite activations are ignored: ``amax`` and the per-channel statistics skip them,
and token rows holding one are left out of the Hessian and the sample.

The model runs eagerly (``jax.disable_jit``), so layers inside ``nnx.scan``/``nn.scan`` are
called once per scanned layer, in order; the ``i``-th call of a stacked layer in a batch is
its ``i``-th slice. Abstract passes (``nn.scan`` traces its body once to infer shapes) are
not recorded.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.ops import operand as O
from jaxq.ops.dims import canonicalize, normalize_dimension_numbers
from jaxq.ops.einsum import einsum_with
from jaxq.quantization.calibration import Absmax, finite_abs
from jaxq.quantization.qdq import quantize

__all__ = ["Recorder", "LayerCall", "STATS"]

STATS = ("amax", "absmax_k", "absmean_k", "hessian", "sample")


@dataclasses.dataclass
class LayerCall:
    """What one call (one slice, for stacked layers) of a layer recorded."""

    kernel_shape: tuple[int, ...]
    kernel_dtype: Any
    dims: Any
    w3: jax.Array
    lhs_shape: tuple[int, ...]
    lhs_dtype: Any
    stats: dict = dataclasses.field(default_factory=dict)
    batches: int = 0
    tokens: int = 0


def _finite_rows(x2: jax.Array) -> jax.Array:
    """Rows of ``(T, K)`` without non-finite entries (others zeroed) and their mask."""
    ok = jnp.all(jnp.isfinite(x2), axis=-1)
    return jnp.where(ok[:, None], x2, 0.0), ok


class Recorder:
    """Records the products of the layers a model calls (module docstring).

    Args:
        want: ``{path: (quantizer, stats)}``: the activation quantizer (for ``amax``) and the
            names of the statistics (a subset of :data:`STATS`) to record for each layer.
        transforms: ``{path: callable(i) -> (x_transform, w_transform)}`` giving the
            transforms of the ``i``-th call's activations and weight (``None``: identity).
        max_samples: rows kept per layer for ``sample``.
    """

    def __init__(self, want: dict, transforms: dict | None = None, max_samples: int = 512):
        self.want = want
        self.transforms = {} if transforms is None else transforms
        self.max_samples = max_samples
        self.calls: dict[str, list[LayerCall]] = {}
        self.ops: dict[str, str] = {}
        self.unserved: dict[str, str] = {}  # reached layers with no serving path (conv...)
        self._count: dict[str, int] = {}
        self.batch = -1

    def start_batch(self) -> None:
        self.batch += 1
        self._count = {}

    def counts(self) -> dict[str, int]:
        """Calls per layer in the last batch."""
        return dict(self._count)

    def dot(self, path: str, op: str = "dot_general"):
        """A ``dot_general`` for the layer at ``path`` that records and computes in float."""
        self.ops[path] = op
        return functools.partial(self._dot, path)

    def einsum(self, path: str):
        """An ``einsum_op`` for ``nnx.Einsum`` at ``path``."""
        dot = self.dot(path, "einsum")

        def einsum_op(subscripts, lhs, rhs, precision=None, preferred_element_type=None, **_):
            return einsum_with(dot, subscripts, lhs, rhs, precision=precision,
                               preferred_element_type=preferred_element_type)  # fmt: skip

        return einsum_op

    def _dot(self, path, lhs, rhs, dimension_numbers, precision=None,
             preferred_element_type=None, out_sharding=None):  # fmt: skip
        where = f"jaxq.ptq calibration batch {self.batch}, layer {path!r}"
        lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
        for name, x in (("input", lhs), ("kernel", rhs)):
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"{where}: the {name} has dtype {x.dtype} (shape {x.shape}); "
                                "expected a floating-point array")  # fmt: skip
        dims = normalize_dimension_numbers(dimension_numbers, where)
        canon = canonicalize(lhs.shape, rhs.shape, dims, where)
        kw = {} if out_sharding is None else {"out_sharding": out_sharding}
        if isinstance(lhs, jax.core.Tracer) or isinstance(rhs, jax.core.Tracer):
            # An abstract pass (nn.scan infers its body's shapes first): nothing to record.
            return jax.lax.dot_general(lhs, rhs, dims, precision, preferred_element_type, **kw)
        i = self._count.get(path, 0)
        self._count[path] = i + 1
        calls = self.calls.setdefault(path, [])
        tx, tw = self.transforms.get(path, lambda i: (None, None))(i)
        if i == len(calls):
            if self.batch > 0:
                raise ValueError(f"{where}: the layer was called {i + 1} times in this batch "
                                 f"but {i} times in the first batch")  # fmt: skip
            w3 = canon.rhs(rhs).astype(jnp.float32)
            w3 = w3 if tw is None else tw(w3)
            calls.append(LayerCall(tuple(rhs.shape), rhs.dtype, dims, w3, tuple(lhs.shape),
                                   lhs.dtype))  # fmt: skip
        call = calls[i]
        if call.dims != dims or call.kernel_shape != tuple(rhs.shape):
            raise ValueError(
                f"{where}: call {i} has kernel {tuple(rhs.shape)} and dimension_numbers {dims}, "
                f"the first batch had {call.kernel_shape} and {call.dims}"
            )
        if tuple(lhs.shape[1:]) != tuple(call.lhs_shape[1:]) or lhs.dtype != call.lhs_dtype:
            raise ValueError(
                f"{where}: the layer's input has shape {tuple(lhs.shape)} and dtype {lhs.dtype}; "
                f"in the first batch it had {call.lhs_shape} {call.lhs_dtype} (batches must "
                "agree on every axis but the first)"
            )
        x3 = canon.lhs(lhs).astype(jnp.float32)
        if tx is not None:
            x3 = tx(x3)
        quantizer, names = self.want.get(path, (None, ()))
        self._accumulate(call, x3, quantizer, names)
        return jax.lax.dot_general(lhs, rhs, dims, precision, preferred_element_type, **kw)

    def _accumulate(self, call: LayerCall, x3, quantizer, names) -> None:
        s = call.stats
        b, m, k = x3.shape
        call.batches += 1
        if "amax" in names and quantizer is not None:
            s.setdefault("amax", []).append(_amax(x3, quantizer))
        a = finite_abs(x3)
        if "absmax_k" in names:
            cur = jnp.max(a, axis=1)
            s["absmax_k"] = cur if "absmax_k" not in s else jnp.maximum(s["absmax_k"], cur)
        if "absmean_k" in names:
            n = jnp.sum(jnp.isfinite(x3), axis=1)
            s["absmean_k_sum"] = s.get("absmean_k_sum", 0.0) + jnp.sum(a, axis=1)
            s["absmean_k_n"] = s.get("absmean_k_n", 0) + n
        if "hessian" in names or "sample" in names:
            rows, ok = jax.vmap(_finite_rows)(x3)
            if "hessian" in names:
                xx = jnp.einsum("bmk,bml->bkl", rows, rows, precision=jax.lax.Precision.HIGHEST)
                s["hessian_sum"] = s.get("hessian_sum", 0.0) + xx
                s["hessian_n"] = s.get("hessian_n", 0) + jnp.sum(ok, axis=1)
            if "sample" in names:
                have = s.get("sample")
                room = self.max_samples - (0 if have is None else have.shape[1])
                if room > 0:
                    keep = np.asarray(ok).all(axis=0)  # rows finite in every batch index
                    new = rows[:, np.flatnonzero(keep)[:room]]
                    s["sample"] = new if have is None else jnp.concatenate([have, new], axis=1)


def _amax(x3: jax.Array, quantizer) -> jax.Array:
    """The per-tensor clipping range the quantizer's calibration picks on ``x3``."""
    cal = quantizer.calibration
    if isinstance(cal, str) or isinstance(cal, Absmax):
        return O.observe_amax(x3)
    q = quantize(x3, quantizer.fmt, calibration=cal)
    return jnp.asarray(q.scale, jnp.float32).reshape(()) * np.float32(quantizer.element.max)


def finalize(call: LayerCall, quantizer) -> dict:
    """The statistics of one call, reduced over the batches."""
    s, out = call.stats, {}
    if "amax" in s:
        values = jnp.stack(s["amax"])
        absmax = quantizer is None or isinstance(quantizer.calibration, (Absmax, str))
        out["amax"] = jnp.max(values) if absmax else jnp.mean(values)
    if "absmax_k" in s:
        out["absmax_k"] = s["absmax_k"]
    if "absmean_k_sum" in s:
        out["absmean_k"] = s["absmean_k_sum"] / jnp.maximum(s["absmean_k_n"], 1)
    if "hessian_sum" in s:
        n = jnp.maximum(s["hessian_n"], 1).astype(jnp.float32)
        out["hessian"] = 2.0 * s["hessian_sum"] / n[:, None, None]
    if "sample" in s:
        out["sample"] = s["sample"]
    return out
