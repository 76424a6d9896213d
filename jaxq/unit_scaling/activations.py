"""Unit-scaled non-linearities, softmax, dropout and scaled dot-product attention.

Each op computes its scale factors from a model of its unit-variance statistics
(:mod:`jaxq.unit_scaling._stats`): exact Gaussian moments for GELU/SiLU, the log-normal
model for softmax and attention. ``mult`` is the u-muP multiplier placed inside the
non-linearity (``alpha_ffn_act``, ``alpha_attn_softmax``); the factors are re-derived for
each ``mult``, so the op stays unit-scaled as it is tuned.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxq.unit_scaling import _checks, _stats
from jaxq.unit_scaling.scale import Constraint, apply_constraint, scale_bwd, scale_fwd

__all__ = ["gelu", "silu", "silu_glu", "softmax", "dropout", "scaled_dot_product_attention"]


def _elementwise(f, x, out_std, grad_std, constraint):
    out_s, grad_s = apply_constraint(constraint, 1.0 / out_std, 1.0 / grad_std)
    return scale_fwd(f(scale_bwd(x, grad_s)), out_s)


def gelu(
    x: jax.Array,
    *,
    mult: float = 1.0,
    constraint: Constraint = "to_output_scale",
    approximate: bool = False,
) -> jax.Array:
    """Unit-scaled GELU: ``gelu(mult * x) / mult``, output and gradient divided by their stds.

    With ``z ~ N(0, 1)`` and ``f(z) = z Phi(m z)``: output factor ``1 / std f(z)``
    (``1/0.588`` at ``m = 1``) and input-gradient factor ``1 / rms f'(z)`` (``1/0.675``),
    both from Gauss-Hermite quadrature.

    Example:
        >>> import jax
        >>> x = jax.random.normal(jax.random.key(0), (1 << 16,))
        >>> round(float(gelu(x).std()), 1)
        1.0
    """
    x = _checks.floating(x, "x")
    mult = _checks.positive(mult, "mult")
    std, _, grad_rms = _stats.gaussian_moments("gelu", mult)
    f = lambda u: jax.nn.gelu(u * mult, approximate=approximate) / mult
    return _elementwise(f, x, std, grad_rms, constraint)


def silu(
    x: jax.Array, *, mult: float = 1.0, constraint: Constraint = "to_output_scale"
) -> jax.Array:
    """Unit-scaled SiLU (swish) ``x * sigmoid(mult * x)``; factors as in :func:`gelu`.

    Example:
        >>> import jax
        >>> x = jax.random.normal(jax.random.key(0), (1 << 16,))
        >>> round(float(silu(x).std()), 1)
        1.0
    """
    x = _checks.floating(x, "x")
    mult = _checks.positive(mult, "mult")
    std, _, grad_rms = _stats.gaussian_moments("silu", mult)
    f = lambda u: u * jax.nn.sigmoid(u * mult)
    return _elementwise(f, x, std, grad_rms, constraint)


def silu_glu(
    x: jax.Array, gate: jax.Array, *, mult: float = 1.0, constraint: Constraint = None
) -> jax.Array:
    """Unit-scaled gated linear unit ``x * silu(gate)`` (the SwiGLU non-linearity).

    For independent unit ``x``, ``gate`` and ``g``: ``var(x silu(z)) = E[silu(z)^2]``,
    the gradient of ``x`` has variance ``E[silu(z)^2]`` and that of ``gate``
    ``E[silu'(z)^2]``. Factors: output and ``x``-gradient ``1 / rms silu``, gate-gradient
    ``1 / rms silu'``. Default ``constraint=None`` as in u-muP's SwiGLU MLP (the factors
    of the surrounding linears mirror each other).

    Example:
        >>> import jax
        >>> x, g = jax.random.normal(jax.random.key(0), (2, 1 << 16))
        >>> round(float(silu_glu(x, g).std()), 1)
        1.0
    """
    x = _checks.floating(x, "x")
    gate = _checks.floating(gate, "gate")
    if x.shape != gate.shape:
        raise ValueError(f"x has shape {x.shape} but gate has shape {gate.shape}; expected equal")
    mult = _checks.positive(mult, "mult")
    _, rms, grad_rms = _stats.gaussian_moments("silu", mult)
    out_s, x_s, g_s = apply_constraint(constraint, 1.0 / rms, 1.0 / rms, 1.0 / grad_rms)
    x = scale_bwd(x, x_s)
    gate = scale_bwd(gate, g_s)
    return scale_fwd(x * (gate * jax.nn.sigmoid(gate * mult)), out_s)


def softmax(
    x: jax.Array,
    *,
    axis: int = -1,
    mult: float = 1.0,
    constraint: Constraint = "to_output_scale",
) -> jax.Array:
    """Unit-scaled ``softmax(mult * x)`` along ``axis`` (length ``n``).

    Log-normal model: output factor ``n / sqrt(e^{m^2} - 1)``, input-gradient factor
    ``n / (m e^{m^2/2})`` (``n/1.31`` and ``n/1.65`` at ``m = 1``). Accurate for
    ``n >~ 64``.

    Example:
        >>> import jax
        >>> x = jax.random.normal(jax.random.key(0), (64, 1024))
        >>> round(float(softmax(x).std()), 1)
        1.0
    """
    x = _checks.floating(x, "x")
    _checks.min_ndim(x, 1, "x", "softmax axis")
    mult = _checks.positive(mult, "mult")
    n = x.shape[axis]
    out_std, grad_std = _stats.softmax_stds(n, mult)
    f = lambda u: jax.nn.softmax(u * mult, axis=axis)
    return _elementwise(f, x, out_std, grad_std, constraint)


def dropout(
    x: jax.Array, rate: float, *, key: jax.Array | None = None, deterministic: bool = False
) -> jax.Array:
    """Unit-scaled dropout: keeps each entry with probability ``1 - rate``.

    Standard (inverted) dropout divides kept entries by ``1 - rate``, giving variance
    ``1 / (1 - rate)``; unit scaling divides by ``sqrt(1 - rate)`` instead, in both
    passes, so output and gradient keep unit variance. Forward and backward factors are
    equal, so there is nothing to constrain.

    Args:
        x: floating input.
        rate: drop probability in ``[0, 1)``.
        key: PRNG key; required when ``rate > 0`` and not ``deterministic``.
        deterministic: if True, the identity.

    Example:
        >>> import jax
        >>> x = jax.random.normal(jax.random.key(0), (1 << 16,))
        >>> y = dropout(x, 0.5, key=jax.random.key(1))
        >>> round(float(y.std()), 1)
        1.0
    """
    x = _checks.floating(x, "x")
    rate = _checks.positive(rate, "rate", allow_zero=True)
    if rate >= 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    if deterministic or rate == 0.0:
        return x
    if key is None:
        raise ValueError("dropout with rate > 0 needs an explicit PRNG key (key=...)")
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    s = (1.0 - rate) ** 0.5
    x = scale_bwd(x, s)
    y = jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
    return scale_fwd(y, s)


def scaled_dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    mask: jax.Array | None = None,
    mult: float = 1.0,
    constraint: Constraint = "to_output_scale",
) -> jax.Array:
    """Unit-scaled multi-head attention ``softmax(mult q k^T / d) v`` (u-muP's ``1/d``).

    Layout ``(..., seq, heads, head_dim)`` for ``q``, ``k``, ``v``. With near-flat
    attention over ``n`` keys (logit variance ``s2 = mult^2 / d``), the output and the
    gradient of ``v`` have variance ``e^{s2} / n``, and the gradients of ``q`` and ``k``
    ``s2 e^{s2} (1/n - 1/n^2)`` (averaged over rows; causal row ``i`` sees ``n = i + 1``
    keys). Factors: output and ``v``-gradient ``1 / std_out``, ``q``/``k``-gradients
    ``1 / std_qk``; all constrained together (``"to_output_scale"``: every factor equals
    the output's, which keeps gradients exact, as in u-muP).

    Args:
        q: ``(..., q_len, heads, d)``.
        k: ``(..., k_len, heads, d)``.
        v: ``(..., k_len, heads, d_v)``.
        causal: causal mask (query ``i`` sees keys ``<= i + k_len - q_len``).
        mask: optional boolean mask broadcastable to ``(..., heads, q_len, k_len)``
            (True = attend); the scale model does not account for it.
        mult: u-muP's ``alpha_attn_softmax``.
        constraint: see :mod:`jaxq.unit_scaling.scale`.

    Returns:
        ``(..., q_len, heads, d_v)``. A row with no visible key gives zeros.

    Example:
        >>> import jax
        >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 4, 128, 2, 64))
        >>> round(float(scaled_dot_product_attention(q, k, v, causal=True).std()), 1)
        1.0
    """
    q = _checks.floating(q, "q")
    k = _checks.floating(k, "k")
    v = _checks.floating(v, "v")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.min_ndim(t, 3, name, "(..., seq, heads, head_dim)")
    if q.shape[-1] != k.shape[-1] or q.shape[-2] != k.shape[-2] or k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"q {q.shape}, k {k.shape}, v {v.shape}: expected q (..., Lq, H, D), "
            f"k (..., Lk, H, D), v (..., Lk, H, Dv)"
        )
    mult = _checks.positive(mult, "mult")
    q_len, k_len, d = q.shape[-3], k.shape[-3], q.shape[-1]
    out_std, qk_std = _stats.attention_stds(q_len, k_len, d, mult, causal)
    qk_std = qk_std if qk_std > 0 else out_std
    out_s, v_s, q_s, k_s = apply_constraint(
        constraint, 1.0 / out_std, 1.0 / out_std, 1.0 / qk_std, 1.0 / qk_std
    )
    q, k, v = scale_bwd(q, q_s), scale_bwd(k, k_s), scale_bwd(v, v_s)
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k) * (mult / d)
    visible = jnp.ones(logits.shape[-2:], bool)
    if causal:
        visible = jnp.tril(visible, k=k_len - q_len)
    if mask is not None:
        visible = jnp.logical_and(visible, jnp.asarray(mask, bool))
    neg = jnp.finfo(logits.dtype).min
    logits = jnp.where(visible, logits, neg)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(visible, probs, 0.0)
    out = jnp.einsum("...hqk,...khd->...qhd", probs, v)
    return scale_fwd(out, out_s)
