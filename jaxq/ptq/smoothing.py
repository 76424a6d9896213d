"""Per-input-channel smoothing scales: SmoothQuant and AWQ, and AWQ's weight clipping.

A linear layer ``y = x Wᵀ`` (``x``: ``T × K`` activations, ``W``: ``N × K``) is unchanged by
a positive per-input-channel scale ``s`` (``K``,):

    y = (x / s) (W · s)ᵀ,    (W · s)_nk = W_nk s_k,    (x / s)_tk = x_tk / s_k,

and ``1 / s`` is usually folded into the preceding normalization. The two methods choose
``s`` for different reasons:

* **SmoothQuant** (Xiao et al. 2022) moves activation outliers into the weights so that
  both quantize well (W8A8): ``s_k = max|x_k|^α / max_n |W_nk|^(1−α)``, ``α ∈ [0, 1]``
  (``α = 0.5`` balances the two ranges).
* **AWQ** (Lin et al. 2023) protects the weights of salient input channels (large
  activations) in weight-only quantization: ``s = m^a`` with ``m_k = mean_t |x_tk|``,
  normalized so that ``sqrt(max s · min s) = 1``, and ``a`` chosen on a grid
  ``{0, 1/G, …, (G−1)/G}`` to minimise the calibration output error
  ``‖x Wᵀ − (x / s) · deq(Q(W · s))ᵀ‖²``, ``Q`` being ``quantize_operand(·, quantizer)``.
  ``a = 0`` gives ``s = 1``, plain round-to-nearest, so the choice is never worse than RTN
  on the calibration data. :func:`awq_clip` then shrinks each scale group's clipping range
  ``r · max|w|`` (``r`` on a grid in ``[1 − max_shrink, 1]``), again by the output error.

Non-finite activations: the statistics (``max |x|``, ``mean |x|``) ignore non-finite
entries, and the output-error searches leave out every token that has one. A channel whose
statistic is 0 (or whose weights are all 0) gets ``s = 1`` in SmoothQuant; AWQ raises such
channels' statistic to ``10⁻⁶ ·`` the largest one before the power.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxq.ptq.smoothing import activation_absmax, smoothquant_scales
    >>> x = jax.random.normal(jax.random.key(0), (64, 16)).at[:, 3].mul(50.0)
    >>> w = jax.random.normal(jax.random.key(1), (8, 16))
    >>> s = smoothquant_scales(activation_absmax(x), w)
    >>> bool(jnp.allclose((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-3))
    True
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.ops.operand import quantize_operand
from jaxq.ops.spec import Quantizer
from jaxq.quantization.calibration import finite_abs
from jaxq.quantization.qarray import dequantize

__all__ = ["smoothquant_scales", "awq_scales", "awq_clip", "activation_absmax", "AWQInfo"]

_HI = jax.lax.Precision.HIGHEST
_S_MIN, _S_MAX = 1e-5, 1e5


class AWQInfo(NamedTuple):
    """The search behind :func:`awq_scales` / :func:`awq_clip`.

    Attributes:
        grid: the grid searched (exponents ``a``, or clipping ratios ``r``).
        losses: calibration output error ``‖x Wᵀ − x̂ Ŵᵀ‖²`` at each grid point (for
            :func:`awq_clip`: the total with every group clipped at that ratio).
        best: the chosen exponent (:func:`awq_scales`), or the chosen ratio of every scale
            group, in the scale shape ``(N, groups)`` (:func:`awq_clip`).
        loss: the error of the returned result; ``losses[0]`` is round-to-nearest's.
    """

    grid: jax.Array
    losses: jax.Array
    best: jax.Array
    loss: jax.Array


def _as_float(name, a, ndim):
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    if a.ndim != ndim:
        want = {1: "(K,)", 2: "(N, K)" if name == "w" else "(T, K)"}[ndim]
        raise ValueError(f"{name} must have shape {want}, got shape {a.shape}")
    return a


def _check_pair(x, w):
    if x.shape[1] != w.shape[1]:
        raise ValueError(
            f"x has {x.shape[1]} input channels (shape {x.shape}) but w has {w.shape[1]} "
            f"(shape {w.shape}); expected x (T, K) and w (N, K)"
        )


def _check_quantizer(quantizer, k):
    if not isinstance(quantizer, Quantizer):
        raise TypeError(f"quantizer must be a jaxq.ops.Quantizer, got {type(quantizer)!r}")
    if quantizer.scaling == "delayed" or quantizer.rounding != "nearest":
        raise ValueError("the AWQ searches need current or static scaling and nearest rounding")
    if quantizer.granularity in ("block", "block2d") and k % quantizer.block_size:
        raise ValueError(
            f"block size {quantizer.block_size} of {quantizer.fmt.name} does not divide K = {k}"
        )


def _check_grid(grid):
    if not isinstance(grid, (int, np.integer)) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")


def activation_absmax(x: jax.Array) -> jax.Array:
    """Per-input-channel ``max_t |x_tk|`` over the finite entries of ``x`` (``T × K``),
    float32 (0 for a channel with none). Accumulate across batches with ``jnp.maximum``.

    Raises:
        ValueError: ``x`` is not 2-D.

    Example:
        >>> activation_absmax(jnp.array([[1.0, -4.0], [jnp.nan, 2.0]])).tolist()
        [1.0, 4.0]
    """
    x = _as_float("x", x, 2)
    return jnp.max(finite_abs(x.astype(jnp.float32)), axis=0, initial=0.0)


def smoothquant_scales(act_absmax: jax.Array, w: jax.Array, alpha: float = 0.5) -> jax.Array:
    """SmoothQuant's migration scales ``s_k = max|x_k|^α / max_n |W_nk|^(1−α)``.

    Use them as ``(x / s) · (w · s)ᵀ``: activations divided, weight columns multiplied.
    Channels with a zero (or non-finite) activation statistic or an all-zero weight column
    get ``s = 1``; the others are clipped to ``[1e-5, 1e5]``. Computed in float32 through
    logarithms, so no power overflows.

    Args:
        act_absmax: ``(K,)`` per-input-channel ``max |x|`` over calibration data (see
            :func:`activation_absmax`).
        w: ``(N, K)`` weight.
        alpha: migration strength in ``[0, 1]``.

    Returns:
        ``s``, float32 ``(K,)``.

    Raises:
        ValueError: shapes that do not match, ``alpha`` outside ``[0, 1]``.
        TypeError: non-floating inputs.

    Example:
        >>> s = smoothquant_scales(jnp.array([100.0, 1.0]), jnp.array([[1.0, 1.0]]))
        >>> s.tolist()
        [10.0, 1.0]
    """
    a = _as_float("act_absmax", act_absmax, 1)
    w = _as_float("w", w, 2)
    if a.shape[0] != w.shape[1]:
        raise ValueError(
            f"act_absmax has shape {a.shape}, expected ({w.shape[1]},) for w of shape {w.shape}"
        )
    if not isinstance(alpha, jax.core.Tracer) and not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    return _smoothquant(a, w, jnp.float32(alpha))


@jax.jit
def _smoothquant(a, w, alpha):
    a = jnp.abs(a.astype(jnp.float32))
    wmax = jnp.max(finite_abs(w.astype(jnp.float32)), axis=0)
    ok = jnp.isfinite(a) & (a > 0) & (wmax > 0)
    la = jnp.log(jnp.where(ok, a, 1.0))
    lw = jnp.log(jnp.where(ok, wmax, 1.0))
    s = jnp.exp(alpha * la - (1.0 - alpha) * lw)
    return jnp.where(ok, jnp.clip(s, _S_MIN, _S_MAX), 1.0)


def _clean_tokens(x):
    """``x`` with every token (row) holding a non-finite entry zeroed: it then contributes
    nothing to ``‖x Wᵀ − x̂ Ŵᵀ‖²``."""
    x = x.astype(jnp.float32)
    good = jnp.all(jnp.isfinite(x), axis=1, keepdims=True)
    return jnp.where(good, x, 0.0)


def _deq(w, q):
    return dequantize(quantize_operand(w[None], q, where="w"), jnp.float32)[0]


def _out_loss(x, y, w_hat):
    d = y - jnp.matmul(x, w_hat.T, precision=_HI)
    return jnp.sum(d * d)


@functools.partial(jax.jit, static_argnames=("q", "grid"))
def _awq_search(x, w, *, q, grid):
    stat = jnp.sum(finite_abs(x.astype(jnp.float32)), axis=0) / jnp.maximum(
        jnp.sum(jnp.isfinite(x), axis=0), 1
    )
    top = jnp.max(stat)
    stat = jnp.where(top > 0, jnp.maximum(stat, 1e-6 * top), 1.0)
    xc = _clean_tokens(x)
    w = w.astype(jnp.float32)
    y = jnp.matmul(xc, w.T, precision=_HI)
    ratios = jnp.arange(grid, dtype=jnp.float32) / grid

    def scales(a):
        s = jnp.exp(a * jnp.log(stat))
        return s / jnp.sqrt(jnp.max(s) * jnp.min(s))

    def loss(a):
        s = scales(a)
        return _out_loss(xc / s, y, _deq(w * s, q))

    losses = jax.lax.map(loss, ratios)
    best = jnp.argmin(losses)  # the first minimum: a = 0 unless something beats RTN
    return scales(ratios[best]), AWQInfo(ratios, losses, ratios[best], losses[best])


def awq_scales(
    x: jax.Array, w: jax.Array, quantizer: Quantizer, *, grid: int = 20
) -> tuple[jax.Array, AWQInfo]:
    """AWQ's activation-aware per-input-channel scales (module docstring).

    Args:
        x: ``(T, K)`` calibration activations entering the layer.
        w: ``(N, K)`` weight.
        quantizer: how the scaled weight ``w · s`` (viewed as ``(1, N, K)``) is quantized.
        grid: number of exponents ``a ∈ {0, 1/grid, …, (grid−1)/grid}`` tried.

    Returns:
        ``(s, info)``: float32 ``(K,)`` scales (serve ``(x / s) · deq(Q(w · s))ᵀ``) and an
        :class:`AWQInfo` with the loss at every grid point (``info.losses[0]``: RTN).

    Raises:
        ValueError: mismatched shapes, a block size that does not divide ``K``, a
            quantizer with delayed scaling or stochastic rounding, a bad ``grid``.
        TypeError: ``quantizer`` is not a ``Quantizer``; non-floating inputs.

    Example:
        >>> from jaxq.ops import Quantizer
        >>> x = jax.random.normal(jax.random.key(0), (128, 64)).at[:, :2].mul(30.0)
        >>> w = jax.random.normal(jax.random.key(1), (16, 64))
        >>> s, info = awq_scales(x, w, Quantizer("int4", "block", block_size=32), grid=10)
        >>> s.shape, bool(info.loss <= info.losses[0])
        ((64,), True)
    """
    x = _as_float("x", x, 2)
    w = _as_float("w", w, 2)
    _check_pair(x, w)
    _check_quantizer(quantizer, w.shape[1])
    _check_grid(grid)
    return _awq_search(x, w, q=quantizer, grid=int(grid))


@functools.partial(jax.jit, static_argnames=("q", "grid"))
def _awq_clip(x, w, max_shrink, *, q, grid):
    n, k = w.shape
    xc = _clean_tokens(x)
    w = w.astype(jnp.float32)
    gs = q.block_size if q.granularity == "block" else k
    ng = k // gs
    xg = xc.reshape(-1, ng, gs)
    gram = jnp.einsum("tgi,tgj->gij", xg, xg, precision=_HI)  # per-group Xᵀ X
    amax = jnp.max(jnp.abs(w).reshape(n, ng, gs), axis=2, keepdims=True)
    ratios = 1.0 - max_shrink * jnp.arange(grid, dtype=jnp.float32) / grid

    def clipped(r):  # r: (N, ng, 1)
        lim = r * amax
        return jnp.clip(w.reshape(n, ng, gs), -lim, lim).reshape(n, k)

    def group_losses(wc):  # ‖x_g (w_g − ŵ_g)ᵀ‖² of every (row, group)
        d = (w - _deq(wc, q)).reshape(n, ng, gs)
        return jnp.einsum("ngi,gij,ngj->ng", d, gram, d, precision=_HI)

    per = jax.lax.map(lambda r: group_losses(clipped(jnp.full((n, ng, 1), r))), ratios)
    best = ratios[jnp.argmin(per, axis=0)]  # (N, ng), first minimum
    w_best = clipped(best[..., None])
    y = jnp.matmul(xc, w.T, precision=_HI)
    losses = jax.lax.map(lambda r: _out_loss(xc, y, _deq(clipped(jnp.full((n, ng, 1), r)), q)),
                         ratios)  # fmt: skip
    loss = _out_loss(xc, y, _deq(w_best, q))
    # Groups interact only through a tensor scale (tensor granularity, NVFP4); never
    # return something worse than not clipping.
    keep = loss <= losses[0]
    w_out = jnp.where(keep, w_best, w)
    return w_out, AWQInfo(ratios, losses, jnp.where(keep, best, 1.0), jnp.minimum(loss, losses[0]))


def awq_clip(
    x: jax.Array, w: jax.Array, quantizer: Quantizer, *, grid: int = 20, max_shrink: float = 0.5
) -> tuple[jax.Array, AWQInfo]:
    """AWQ's weight-clipping search: per scale group, the clipping ratio that minimises
    the group's calibration output error.

    For every row ``n`` and scale group ``g`` (the quantizer's blocks along ``K``; the whole
    row for ``"row"`` granularity) the weights are clipped to ``±r · max|w_ng|`` with ``r``
    in ``{1, 1 − max_shrink/grid, …}``, choosing the ``r`` that minimises
    ``‖x_g (w_ng − deq(Q(clip(w)))_ng)ᵀ‖²``. Call it after scaling: ``awq_clip(x / s, w * s,
    q)``. The clipped weight quantizes with ``quantize_operand`` to the chosen result.

    Args:
        x: ``(T, K)`` calibration activations (as the quantized weight will see them).
        w: ``(N, K)`` weight.
        quantizer: the weight quantizer (``"row"`` or ``"block"`` granularity, or tensor).
        grid: number of ratios tried.
        max_shrink: the smallest ratio tried is ``1 − max_shrink·(grid−1)/grid``; in
            ``[0, 1)``.

    Returns:
        ``(w_clipped, info)``: the clipped float32 weight ``(N, K)`` and an :class:`AWQInfo`
        whose ``best`` holds each group's ratio; ``info.loss <= info.losses[0]`` (no clip).

    Raises:
        ValueError: as :func:`awq_scales`, and ``max_shrink`` outside ``[0, 1)``.
        TypeError: as :func:`awq_scales`.

    Example:
        >>> from jaxq.ops import Quantizer
        >>> x = jax.random.normal(jax.random.key(0), (64, 64))
        >>> w = jax.random.normal(jax.random.key(1), (8, 64))
        >>> wc, info = awq_clip(x, w, Quantizer("int4", "block", block_size=32), grid=8)
        >>> info.best.shape, bool(info.loss <= info.losses[0])
        ((8, 2), True)
    """
    x = _as_float("x", x, 2)
    w = _as_float("w", w, 2)
    _check_pair(x, w)
    _check_quantizer(quantizer, w.shape[1])
    _check_grid(grid)
    if quantizer.granularity == "block2d":
        raise ValueError("awq_clip supports tensor, row and block granularity, not block2d")
    if not 0.0 <= float(max_shrink) < 1.0:
        raise ValueError(f"max_shrink must be in [0, 1), got {max_shrink!r}")
    return _awq_clip(x, w, jnp.float32(max_shrink), q=quantizer, grid=int(grid))
