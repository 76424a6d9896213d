"""GPTQ: post-training weight quantization with second-order error compensation.

GPTQ (Frantar et al. 2022) quantizes a linear layer's weight ``W`` (``N`` output channels,
``K`` input features) one input column at a time and spreads each column's rounding error
over the columns not yet quantized, so as to minimise the layer's output error on
calibration activations ``X`` (``T × K``):

    min_Q  ‖X Wᵀ − X Qᵀ‖²  =  ½ tr((W − Q) H (W − Q)ᵀ),   H = 2 Xᵀ X  (accumulated by the caller).

Algorithm (the paper's, in its Cholesky form):

1. dead inputs (``H_kk = 0``) get ``H_kk = 1`` and a zero weight column;
2. with ``act_order``, columns are processed in order of decreasing ``H_kk`` (the
   permutation is undone at the end);
3. damping ``λ = damp · mean(diag H)`` is added to the diagonal. ``H + λI = V Vᵀ`` is
   factored with ``V`` upper triangular (a Cholesky factorization of the reversed matrix),
   and ``U = V⁻¹`` is the upper Cholesky factor of the inverse: ``Uᵀ U = (H + λI)⁻¹``,
   obtained without forming the inverse. Should the factorization fail (a non-finite or
   vanishing pivot, e.g. for a singular ``H`` with ``damp=0``), ``λ`` is raised tenfold
   (at least to ``10⁻³ · mean(diag H)``) and the factorization retried;
4. for each column ``k`` in processing order: ``q_k = Q(w_k)`` (the quantizer's own
   rounding), ``e_k = (w_k − q_k) / U_kk``, and ``w_j ← w_j − e_k U_kj`` for every later
   column ``j``. Columns are processed in blocks of ``block_size``: updates inside a block
   are immediate, updates of the later columns are applied once per block as one matmul
   (the paper's lazy batch updates; mathematically identical).

Scales. The quantizer's granularity decides where the scales come from:

* ``"tensor"`` / ``"row"``: computed once, up front, from the whole (dead-zeroed) weight;
* ``"block"`` (groups of ``block_size`` inputs; MXFP4 32, NVFP4 16): by default each group's
  scales are computed from the current, error-updated weights of the group when its first
  column is reached (the standard grouped GPTQ). With ``act_order`` the columns of a group
  are no longer processed together, so the group scales are computed up front from the
  original weights (``static_groups``; the reference implementation's variant). This keeps
  contiguous groups along ``K``, which is what the returned ``QArray`` stores.

Scales are computed exactly as :func:`jaxq.ops.operand.quantize_operand` computes them
(same calibration, power-of-two option, block-format rules) and every column is rounded
with jaxq's own encoders, so the returned ``QArray`` dequantizes exactly to the weights
GPTQ settled on. NVFP4's tensor scale is taken from the original weights; a group whose
updated weights outgrow it saturates at the largest E4M3 block scale.

Non-finite ``w`` or ``hessian`` raise ``ValueError`` when the inputs are concrete; under an
outer ``jit`` they are not checked (the result is then NaN).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxq.ops import Quantizer
    >>> from jaxq.ptq.gptq_solver import gptq
    >>> x = jax.random.normal(jax.random.key(0), (256, 64))
    >>> w = jax.random.normal(jax.random.key(1), (32, 64))
    >>> r = gptq(w, 2 * x.T @ x, Quantizer("int4", "block", block_size=32))
    >>> r.qarray.shape, bool(r.error < r.rtn_error)
    ((1, 32, 64), True)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import formats as F
from jaxq.ops.operand import quantize_operand
from jaxq.ops.spec import Quantizer
from jaxq.quantization import packing
from jaxq.quantization.cast import pow2
from jaxq.quantization.codes import code_dtype, decode, encode
from jaxq.quantization.qarray import QArray, dequantize

__all__ = ["gptq", "GPTQResult"]

_HI = jax.lax.Precision.HIGHEST
_RETRIES = 12


class GPTQResult(NamedTuple):
    """What :func:`gptq` returns.

    Attributes:
        qarray: the quantized weight, a :class:`jaxq.QArray` of shape ``(1, N, K)`` with the
            structure ``quantize_operand(w[None], quantizer)`` has.
        error: the proxy loss ``tr((W − Q) H (W − Q)ᵀ)`` of the result (float32 scalar;
            ``2 ‖X (W − Q)ᵀ‖²`` when ``H = 2 Xᵀ X``).
        rtn_error: the same loss for round-to-nearest (``quantize_operand``), for comparison.
        damping: the damping ``λ`` added to ``diag H`` (after any retries).
    """

    qarray: QArray
    error: jax.Array
    rtn_error: jax.Array
    damping: jax.Array


def _family(fmt) -> str:
    if isinstance(fmt, F.BlockFormat):
        return "mx" if fmt.is_mx else "nvfp4"
    return "element"


def _carry_scale(scale: jax.Array, fmt) -> jax.Array:
    """A QArray scale as the float32 number the column rounding uses (MX: the exponent)."""
    if _family(fmt) == "mx":
        bits = jax.lax.bitcast_convert_type(scale, jnp.uint8).astype(jnp.int32)
        return (bits - 127).astype(jnp.float32)
    return scale.astype(jnp.float32)


def _stored_scale(s: jax.Array, fmt) -> jax.Array:
    """Inverse of :func:`_carry_scale`."""
    fam = _family(fmt)
    if fam == "mx":
        bits = (s.astype(jnp.int32) + 127).astype(jnp.uint8)
        return jax.lax.bitcast_convert_type(bits, fmt.scale_format.dtype)
    if fam == "nvfp4":
        return s.astype(fmt.scale_format.dtype)
    return s


def _round_column(w, s, fmt, s_t):
    """Codes and values of one column ``w`` (N,) with per-row scales ``s`` (N,), rounded
    exactly as ``jaxq.quantize`` rounds and ``jaxq.dequantize`` reconstructs."""
    fam = _family(fmt)
    elem = fmt.element if isinstance(fmt, F.BlockFormat) else fmt
    if fam == "element":
        c = encode(w / s, elem)
        return c, decode(c, elem) * s
    if fam == "mx":
        e = s.astype(jnp.int32)
        c = encode(w * pow2(-e), elem)
        return c, decode(c, elem) * pow2(e // 2) * pow2(e - e // 2)
    d = s * s_t
    inv_d = jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0)
    c = encode(w * inv_d, elem)
    return c, decode(c, elem) * s * s_t


def _group_scale(wg, q: Quantizer, s_t):
    """Scales (N,) of one group ``wg`` (N, gs) of the current weights."""
    if _family(q.fmt) == "nvfp4":
        a = jnp.max(jnp.abs(wg), axis=1)
        elem = q.fmt.element
        sb = jnp.clip(a / (elem.max * s_t), 0, F.E4M3.max).astype(F.E4M3.dtype)
        return sb.astype(jnp.float32)
    return _carry_scale(quantize_operand(wg[None], q, where="w").scale, q.fmt).reshape(-1)


def _upper_inverse_factor(h, damp, mean, top):
    """``(U, λ)``: ``U`` upper triangular with ``Uᵀ U = (h + λ I)⁻¹`` (module docstring);
    ``mean`` and ``top`` are the mean and max of the unpadded ``diag h``."""
    k = h.shape[0]
    eye = jnp.eye(k, dtype=h.dtype)
    tiny = jnp.finfo(h.dtype).eps * top

    def factor(lam):
        low = jnp.linalg.cholesky(jnp.flip(h + lam * eye, (0, 1)))
        piv = jnp.diagonal(low)
        ok = jnp.all(jnp.isfinite(low)) & (jnp.min(piv) ** 2 > tiny)
        return low, ok

    def cond(state):
        _, _, _, ok, tries = state
        return (~ok) & (tries < _RETRIES)

    def body(state):
        lam, _, low, _, tries = state
        low, ok = factor(lam)
        return jnp.maximum(10 * lam, 1e-3 * mean), lam, low, ok, tries + 1

    lam0 = damp * mean
    init = (lam0, lam0, jnp.zeros_like(h), jnp.zeros((), bool), 0)
    _, lam, low, _, _ = jax.lax.while_loop(cond, body, init)
    v = jnp.flip(low, (0, 1))
    u = jax.scipy.linalg.solve_triangular(v, eye, lower=False)
    return u, lam


def _proxy_loss(d, h):
    return jnp.sum(jnp.matmul(d, h, precision=_HI) * d)


def _block_columns(k: int, gs: int, block_size: int, dynamic: bool) -> tuple[int, int]:
    """``(columns per lazy batch, padded K)``: batches hold whole groups when scales are
    computed at group starts, and ``K`` is padded (with dead columns) to whole batches."""
    if dynamic:
        bsz = min(-(-block_size // gs) * gs, k)
    else:
        bsz = min(block_size, k)
    return bsz, -(-k // bsz) * bsz


@functools.partial(jax.jit, static_argnames=("act_order", "kp"))
def _factor(h_in, damp, *, act_order, kp):
    """The quantizer-independent part: symmetrized ``H``, dead inputs, column order,
    ``U`` of the (permuted, padded, damped) Hessian and the damping used."""
    k = h_in.shape[0]
    h0 = h_in.astype(jnp.float32)
    h0 = (h0 + h0.T) / 2
    dead = jnp.diagonal(h0) == 0
    h = h0 + jnp.diag(dead.astype(jnp.float32))
    mean, top = jnp.mean(jnp.diagonal(h)), jnp.max(jnp.diagonal(h))
    perm = jnp.arange(k)
    if act_order:
        perm = jnp.argsort(-jnp.diagonal(h), stable=True)
        h = h[perm][:, perm]
    if kp > k:
        h = jnp.pad(h, ((0, kp - k), (0, kp - k))) + jnp.diag(
            jnp.concatenate([jnp.zeros(k), jnp.ones(kp - k)]).astype(jnp.float32)
        )
    u, lam = _upper_inverse_factor(h, damp, mean, top)
    return h0, dead, perm, u, lam


@functools.partial(jax.jit, static_argnames=("q", "bsz", "act_order", "static_groups"))
def _gptq(w_in, h0, dead, perm, u, *, q: Quantizer, bsz, act_order, static_groups):
    n, k = w_in.shape
    kp = u.shape[0]
    fmt = q.fmt
    elem = fmt.element if isinstance(fmt, F.BlockFormat) else fmt
    w0 = w_in.astype(jnp.float32)
    w = jnp.where(dead[None, :], 0.0, w0)

    grouped = q.granularity == "block"
    gs = q.block_size if grouped else k
    dynamic = grouped and not static_groups
    static = quantize_operand(w[None], q, where="w")
    s_t = static.tensor_scale if static.tensor_scale is not None else jnp.float32(1.0)
    if q.granularity == "tensor":
        s_col = jnp.broadcast_to(_carry_scale(static.scale, fmt), (n, k))
    else:
        s_col = _carry_scale(static.scale, fmt).reshape(n, -1)
        s_col = jnp.repeat(s_col, k // s_col.shape[1], axis=1)
    if act_order:
        w, s_col = w[:, perm], s_col[:, perm]
    if kp > k:
        w = jnp.pad(w, ((0, 0), (0, kp - k)))
        s_col = jnp.pad(s_col, ((0, 0), (0, kp - k)), constant_values=1.0)

    cols_b = jnp.arange(bsz)
    cols_k = jnp.arange(kp)

    def column(i, state):
        w1, q1, c1, e1, s1, scale, u1 = state
        wi = jax.lax.dynamic_index_in_dim(w1, i, 1, keepdims=False)
        if dynamic:
            scale = jax.lax.cond(
                i % gs == 0,
                lambda: _group_scale(jax.lax.dynamic_slice(w1, (0, i), (n, gs)), q, s_t),
                lambda: scale,
            )
        else:
            scale = jax.lax.dynamic_index_in_dim(s1, i, 1, keepdims=False)
        c, v = _round_column(wi, scale, fmt, s_t)
        urow = jax.lax.dynamic_index_in_dim(u1, i, 0, keepdims=False)
        err = (wi - v) / urow[i]
        w1 = w1 - jnp.where(cols_b > i, err[:, None] * urow[None, :], 0.0)
        q1 = jax.lax.dynamic_update_index_in_dim(q1, v, i, 1)
        c1 = jax.lax.dynamic_update_index_in_dim(c1, c, i, 1)
        e1 = jax.lax.dynamic_update_index_in_dim(e1, err, i, 1)
        s1 = jax.lax.dynamic_update_index_in_dim(s1, scale, i, 1)
        return w1, q1, c1, e1, s1, scale, u1

    def block(b, state):
        w, qv, codes, s_col = state
        i1 = b * bsz
        w1 = jax.lax.dynamic_slice(w, (0, i1), (n, bsz))
        s1 = jax.lax.dynamic_slice(s_col, (0, i1), (n, bsz))
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (bsz, bsz))
        init = (w1, jnp.zeros_like(w1), jnp.zeros((n, bsz), code_dtype(elem)),
                jnp.zeros_like(w1), s1, jnp.ones((n,), jnp.float32), u1)  # fmt: skip
        _, q1, c1, e1, s1, _, _ = jax.lax.fori_loop(0, bsz, column, init)
        qv = jax.lax.dynamic_update_slice(qv, q1, (0, i1))
        codes = jax.lax.dynamic_update_slice(codes, c1, (0, i1))
        s_col = jax.lax.dynamic_update_slice(s_col, s1, (0, i1))
        urows = jax.lax.dynamic_slice(u, (i1, 0), (bsz, kp))
        upd = jnp.matmul(e1, urows, precision=_HI)
        w = w - jnp.where(cols_k[None, :] >= i1 + bsz, upd, 0.0)
        return w, qv, codes, s_col

    init = (w, jnp.zeros_like(w), jnp.zeros((n, kp), code_dtype(elem)), s_col)
    _, qv, codes, s_col = jax.lax.fori_loop(0, kp // bsz, block, init)
    qv, codes, s_col = qv[:, :k], codes[:, :k], s_col[:, :k]
    if act_order:
        inv = jnp.argsort(perm)
        qv, codes, s_col = qv[:, inv], codes[:, inv], s_col[:, inv]

    if dynamic:
        scale = _stored_scale(s_col[:, ::gs], fmt).reshape(static.scale.shape)
    else:
        scale = static.scale
    codes = codes.reshape(1, n, k)
    if elem.bits < 8:
        codes = packing.pack(codes, bits=elem.bits)
    leaves = [codes, scale] + ([static.tensor_scale] if static.tensor_scale is not None else [])
    qarr = jax.tree.unflatten(jax.tree.structure(static), leaves)
    qarr = QArray(qarr.codes, qarr.scale, qarr.zero_point, qarr.tensor_scale, qarr.fmt,
                  qarr.shape, np.dtype(w_in.dtype), qarr.layout)  # fmt: skip
    rtn = dequantize(quantize_operand(w0[None], q, where="w"), jnp.float32)[0]
    return qarr, _proxy_loss(w0 - qv, h0), _proxy_loss(w0 - rtn, h0)


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def gptq(
    w: jax.Array,
    hessian: jax.Array,
    quantizer: Quantizer,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool | None = None,
) -> GPTQResult:
    """Quantizes a linear layer's weight with GPTQ (see the module docstring).

    Args:
        w: the weight, shape ``(N, K)`` (output channels × input features), floating point.
        hessian: ``H = 2 Xᵀ X`` summed over the calibration activations ``X`` (``T × K``),
            shape ``(K, K)``, symmetric positive semi-definite (it is symmetrized).
        quantizer: a :class:`jaxq.ops.Quantizer` for the weight viewed as ``(1, N, K)``:
            any symmetric element format (INT8/4/2, NF4, FP8/FP6/FP4) with ``"tensor"``,
            ``"row"`` or ``"block"`` granularity, or MX/NVFP4 block formats; ``current``
            or ``static`` scaling, nearest rounding.
        damp: relative damping: ``λ = damp · mean(diag H)`` is added to ``diag H``.
        block_size: columns per lazy batch update (rounded up to a multiple of the group
            size); it changes speed, not the result beyond float rounding.
        act_order: process the columns in order of decreasing ``H_kk``.
        static_groups: compute the group scales of ``"block"`` granularity up front from
            the original weights instead of at each group's start. ``None`` (default):
            static exactly when ``act_order`` is set, which requires it.

    Returns:
        A :class:`GPTQResult`: the ``QArray`` (shape ``(1, N, K)``, dtype ``w.dtype``), the
        proxy loss of the result and of round-to-nearest, and the damping used.

    Raises:
        TypeError: ``quantizer`` is not a ``Quantizer``, or ``w``/``hessian`` not floating.
        ValueError: wrong shapes, a group size that does not divide ``K``, an unsupported
            quantizer (``block2d``, delayed scaling, stochastic rounding), ``act_order``
            with ``static_groups=False`` on grouped scales, bad ``damp``/``block_size``, or
            non-finite values in ``w``/``hessian`` (checked when they are concrete).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxq.ops import Quantizer
        >>> x = jax.random.normal(jax.random.key(0), (128, 32))
        >>> w = jax.random.normal(jax.random.key(1), (8, 32))
        >>> r = gptq(w, 2 * x.T @ x, Quantizer("nf4", "row"), act_order=True)
        >>> r.qarray.validate().scale.shape
        (1, 8, 1)
    """
    if not isinstance(quantizer, Quantizer):
        raise TypeError(f"quantizer must be a jaxq.ops.Quantizer, got {type(quantizer)!r}")
    w = jnp.asarray(w)
    hessian = jnp.asarray(hessian)
    for name, a in (("w", w), ("hessian", hessian)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D (N output channels, K inputs), got shape {w.shape}")
    n, k = w.shape
    if n == 0 or k == 0:
        raise ValueError(f"w must be non-empty, got shape {w.shape}")
    if hessian.shape != (k, k):
        raise ValueError(
            f"hessian must have shape (K, K) = ({k}, {k}) for w of shape {w.shape}, "
            f"got {hessian.shape}"
        )
    q = quantizer
    if q.granularity == "block2d":
        raise ValueError("gptq: quantizer granularity 'block2d' is not supported; "
                         "use 'tensor', 'row' or 'block'")  # fmt: skip
    if q.scaling == "delayed":
        raise ValueError("gptq: delayed scaling needs an amax history; use scaling='current'")
    if q.rounding != "nearest":
        raise ValueError(f"gptq rounds to nearest; got quantizer rounding={q.rounding!r}")
    if q.granularity == "block" and k % q.block_size:
        raise ValueError(
            f"gptq: group size {q.block_size} ({q.fmt.name}) does not divide K = {k} "
            f"(w shape {w.shape})"
        )
    if not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if _concrete(damp) and not (np.isfinite(float(damp)) and float(damp) >= 0):
        raise ValueError(f"damp must be finite and >= 0, got {damp!r}")
    grouped = q.granularity == "block"
    if static_groups is None:
        static_groups = bool(act_order)
    if act_order and grouped and not static_groups:
        raise ValueError(
            "act_order with grouped scales needs static_groups=True (or None): the groups "
            "must stay contiguous along K, so their scales are computed up front"
        )
    if _concrete(w) and not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError(f"w of shape {w.shape} has non-finite entries")
    if _concrete(hessian):
        if not bool(jnp.all(jnp.isfinite(hessian))):
            raise ValueError(f"hessian of shape {hessian.shape} has non-finite entries")
        if bool(jnp.any(jnp.diagonal(hessian) < 0)):
            raise ValueError(
                f"hessian of shape {hessian.shape} has negative diagonal entries; "
                "expected a positive semi-definite 2 XᵀX"
            )
    static_groups = bool(static_groups and grouped)
    gs = q.block_size if grouped else k
    bsz, kp = _block_columns(k, gs, int(block_size), grouped and not static_groups)
    h0, dead, perm, u, lam = _factor(hessian, jnp.float32(damp), act_order=bool(act_order), kp=kp)
    qarr, err, rtn = _gptq(
        w, h0, dead, perm, u, q=q, bsz=bsz, act_order=bool(act_order),
        static_groups=static_groups,
    )  # fmt: skip
    return GPTQResult(qarr, err, rtn, lam)
