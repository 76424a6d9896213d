"""Unit-scaled linear maps, matmul, addition and residual connections.

For ``y = x W`` with ``x: (..., fan_in)`` and ``W: (fan_in, fan_out)`` of unit-variance
entries, ``std(y) = sqrt(fan_in)``; for a unit-variance gradient ``g`` of ``y``,
``std(g W^T) = sqrt(fan_out)`` and ``std(x^T g) = sqrt(batch)``. Unit scaling divides by
exactly these (Blake et al., 2023, Table 1), with the output and input-gradient factors
tied by the ``constraint`` (see :mod:`jaxq.unit_scaling.scale`); the weight-gradient
factor is never constrained.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxq.unit_scaling import _checks
from jaxq.unit_scaling.scale import Constraint, apply_constraint, scale_bwd, scale_fwd

__all__ = [
    "linear",
    "linear_readout",
    "matmul",
    "add",
    "residual_split",
    "residual_add",
    "residual_taus",
]

DotGeneral = Callable[..., jax.Array]


def _check_linear(x, w, b):
    x = _checks.floating(x, "x")
    w = _checks.floating(w, "weight")
    if w.ndim != 2:
        raise ValueError(f"weight must have shape (fan_in, fan_out), got shape {w.shape}")
    _checks.min_ndim(x, 1, "x", "(..., fan_in)")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"x has shape {x.shape} but weight has shape {w.shape}: expected x.shape[-1] == "
            f"weight.shape[0] (fan_in)"
        )
    if b is not None:
        b = _checks.floating(b, "bias")
        if b.shape != (w.shape[1],):
            raise ValueError(f"bias must have shape ({w.shape[1]},), got shape {b.shape}")
    return x, w, b


def _linear(x, w, b, constraint, dot_general, out_mult):
    x, w, b = _check_linear(x, w, b)
    fan_in, fan_out = w.shape
    batch = max(1, x.size // fan_in)
    out_scale, grad_in_scale = apply_constraint(constraint, fan_in**-0.5, fan_out**-0.5)
    x = scale_bwd(x, grad_in_scale)
    w = scale_bwd(w, batch**-0.5)
    dot = jax.lax.dot_general if dot_general is None else dot_general
    y = dot(x, w, (((x.ndim - 1,), (0,)), ((), ())))
    y = scale_fwd(y, out_scale * out_mult)
    if b is not None:
        y = y + scale_bwd(b, batch**-0.5).astype(y.dtype)
    return y


def linear(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None = None,
    *,
    constraint: Constraint = "to_output_scale",
    dot_general: DotGeneral | None = None,
) -> jax.Array:
    """Unit-scaled ``y = x W / sqrt(fan_in) + b``.

    Factors: output ``fan_in^-1/2``, input gradient ``fan_out^-1/2`` (constrained with
    the output factor), weight and bias gradients ``batch^-1/2`` with
    ``batch = x.size / fan_in``. The bias is added after the output scale (u-muP:
    biases have multiplier 1).

    Args:
        x: ``(..., fan_in)`` floating input.
        weight: ``(fan_in, fan_out)``, initialised with unit variance.
        bias: optional ``(fan_out,)``, initialised at zero.
        constraint: see :mod:`jaxq.unit_scaling.scale`.
        dot_general: drop-in for ``jax.lax.dot_general(lhs, rhs, dimension_numbers)``
            (e.g. :func:`jaxq.unit_scaling.fp8_dot_general`); ``None`` uses JAX's.

    Returns:
        ``(..., fan_out)``.

    Example:
        >>> import jax
        >>> x = jax.random.normal(jax.random.key(0), (64, 256))
        >>> w = jax.random.normal(jax.random.key(1), (256, 256))
        >>> round(float(linear(x, w).std()), 1)
        1.0
    """
    return _linear(x, weight, bias, constraint, dot_general, 1.0)


def linear_readout(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None = None,
    *,
    mult: float = 1.0,
    constraint: Constraint = "to_output_scale",
    dot_general: DotGeneral | None = None,
) -> jax.Array:
    """The network's final (readout) projection: u-muP's ``mult * x W / fan_in``.

    It is :func:`linear` followed by a forward-only factor ``mult / sqrt(fan_in)`` (the
    muP readout multiplier): so with ``constraint=None`` the factors are exactly u-muP's
    (output ``mult / fan_in``, input gradient ``fan_out^-1/2``, weight gradient
    ``batch^-1/2``), while the backward pass stays unit-scaled. By design the *output* is
    not unit-scaled at initialisation: ``std(y) = mult / sqrt(fan_in)``, which keeps
    initial logits small. The input gradient differs from the exact one by the constant
    ``sqrt(fan_in) / mult``, which a scale-invariant optimiser such as Adam ignores.

    Args:
        x: ``(..., fan_in)``.
        weight: ``(fan_in, fan_out)`` unit-variance.
        bias: optional ``(fan_out,)``.
        mult: u-muP's ``alpha_output`` hyperparameter (> 0).
        constraint: applies to the unit-scaling factors of the :func:`linear` part.
        dot_general: as in :func:`linear`.

    Returns:
        ``(..., fan_out)`` logits.

    Example:
        >>> import jax
        >>> x = jax.random.normal(jax.random.key(0), (64, 256))
        >>> w = jax.random.normal(jax.random.key(1), (256, 512))
        >>> round(float(linear_readout(x, w).std() * 256**0.5), 1)
        1.0
    """
    mult = _checks.positive(mult, "mult")
    fan_in = jnp.shape(weight)[0] if jnp.ndim(weight) == 2 else 1
    return _linear(x, weight, bias, constraint, dot_general, mult * fan_in**-0.5)


def _bcast_counts(shapes, out_shape):
    out = math.prod(out_shape)
    return [out // max(1, math.prod(s)) for s in shapes]


def matmul(a: jax.Array, b: jax.Array, *, constraint: Constraint = "to_output_scale") -> jax.Array:
    """Unit-scaled ``a @ b`` for ``a: (..., m, k)``, ``b: (..., k, n)`` (batch dims broadcast).

    Factors: output ``k^-1/2``; gradient of ``a`` ``(n * r_a)^-1/2`` and of ``b``
    ``(m * r_b)^-1/2``, where ``r_a``, ``r_b`` count the batch elements each operand is
    broadcast over (gradients are summed over them). All three are constrained together.

    Example:
        >>> import jax
        >>> a = jax.random.normal(jax.random.key(0), (8, 32, 128))
        >>> b = jax.random.normal(jax.random.key(1), (8, 128, 32))
        >>> round(float(matmul(a, b).std()), 1)
        1.0
    """
    a = _checks.floating(a, "a")
    b = _checks.floating(b, "b")
    _checks.min_ndim(a, 2, "a", "(..., m, k)")
    _checks.min_ndim(b, 2, "b", "(..., k, n)")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"a has shape {a.shape} and b has shape {b.shape}: expected a.shape[-1] == b.shape[-2]"
        )
    try:
        batch = jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError as e:
        raise ValueError(
            f"batch dims of a {a.shape} and b {b.shape} do not broadcast: {e}"
        ) from None
    m, k = a.shape[-2:]
    n = b.shape[-1]
    ra, rb = _bcast_counts([a.shape[:-2], b.shape[:-2]], batch)
    out_s, a_s, b_s = apply_constraint(constraint, k**-0.5, (n * ra) ** -0.5, (m * rb) ** -0.5)
    y = jnp.matmul(scale_bwd(a, a_s), scale_bwd(b, b_s))
    return scale_fwd(y, out_s)


def add(a: jax.Array, b: jax.Array, *, constraint: Constraint = "to_output_scale") -> jax.Array:
    """Unit-scaled ``(a + b) / sqrt(2)`` with broadcasting.

    Factors: output ``2^-1/2`` (``1`` when one operand has a single element, which does
    not change the variance); gradient of each operand ``r^-1/2`` with ``r`` the number
    of output elements per operand element (1 without broadcasting). Adding a Python
    number is left unscaled.

    Example:
        >>> import jax
        >>> a, b = jax.random.normal(jax.random.key(0), (2, 4096))
        >>> round(float(add(a, b).std()), 1)
        1.0
    """
    if isinstance(a, (int, float)) or isinstance(b, (int, float)):
        return a + b
    a = _checks.floating(a, "a")
    b = _checks.floating(b, "b")
    try:
        out_shape = jnp.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(
            f"a has shape {a.shape} and b has shape {b.shape}: not broadcastable"
        ) from None
    ra, rb = _bcast_counts([a.shape, b.shape], out_shape)
    out = 1.0 if (a.size == 1 or b.size == 1) else 2**-0.5
    out_s, a_s, b_s = apply_constraint(constraint, out, ra**-0.5, rb**-0.5)
    return scale_fwd(scale_bwd(a, a_s) + scale_bwd(b, b_s), out_s)


def _tau_denominator(tau):
    return _checks.positive(tau, "tau", allow_zero=True), math.sqrt(1.0 + tau * tau)


def residual_split(x: jax.Array, tau: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Forks ``x`` into ``(residual, skip)`` ahead of a residual branch of weight ``tau``.

    Identity forward. Backward: the branch gradient is scaled by ``tau / sqrt(1 + tau^2)``
    and the skip gradient by ``1 / sqrt(1 + tau^2)`` before they are summed, so two
    independent unit-variance gradients sum to a unit-variance one. This is where the
    branch weighting of :func:`residual_add` is applied in the backward pass, so that the
    gradient *inside* the branch stays unit-scaled.

    Example:
        >>> import jax.numpy as jnp
        >>> r, s = residual_split(jnp.ones(3), tau=0.5)
        >>> bool((r == s).all())
        True
    """
    tau, d = _tau_denominator(tau)
    return scale_bwd(x, tau / d), scale_bwd(x, 1.0 / d)


def residual_add(residual: jax.Array, skip: jax.Array, tau: float = 1.0) -> jax.Array:
    """Joins a residual branch and its skip: ``(tau * residual + skip) / sqrt(1 + tau^2)``.

    The factors act in the forward pass only (the gradient reaches both inputs
    unchanged); pair with :func:`residual_split` of the same ``tau``. For independent
    unit-variance inputs the output has unit variance. ``tau`` is the branch's weight
    relative to the skip (u-muP: from :func:`residual_taus`).

    Example:
        >>> import jax
        >>> r, s = jax.random.normal(jax.random.key(0), (2, 4096))
        >>> round(float(residual_add(r, s, tau=0.3).std()), 1)
        1.0
    """
    tau, d = _tau_denominator(tau)
    residual = _checks.floating(residual, "residual")
    skip = _checks.floating(skip, "skip")
    if residual.shape != skip.shape:
        raise ValueError(
            f"residual has shape {residual.shape} but skip has shape {skip.shape}; expected equal"
        )
    return scale_fwd(residual, tau / d) + scale_fwd(skip, 1.0 / d)


def residual_taus(
    num_layers: int, *, residual_mult: float = 1.0, attn_ratio: float = 1.0
) -> tuple[float, ...]:
    """u-muP residual weights for a pre-norm transformer of ``num_layers`` layers.

    The stream is the embedding followed by ``2 L`` branches (attention, MLP, attention,
    ...). We want branch ``i`` to contribute variance ``a_i^2`` relative to the
    embedding's 1, with all attention branches equal, all MLP branches equal,
    ``a_attn = attn_ratio * a_mlp``, and the attention and MLP totals averaging
    ``residual_mult^2`` (``L (a_attn^2 + a_mlp^2) = 2 residual_mult^2``; with both
    hyperparameters 1, embedding, all-attention and all-MLP contribute equally). Since
    :func:`residual_add` renormalises the stream, branch ``i`` must enter with
    ``tau_i = a_i / sqrt(1 + sum_{j<i} a_j^2)`` (u-muP, Blake et al. 2024, App. G).

    Returns:
        ``2 * num_layers`` taus: ``(attn_0, mlp_0, attn_1, mlp_1, ...)``.

    Example:
        >>> [round(t, 3) for t in residual_taus(1)]
        [1.0, 0.707]
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    residual_mult = _checks.positive(residual_mult, "residual_mult")
    attn_ratio = _checks.positive(attn_ratio, "attn_ratio")
    a_mlp2 = 2.0 * residual_mult**2 / (num_layers * (1.0 + attn_ratio**2))
    a_attn2 = attn_ratio**2 * a_mlp2
    taus, total = [], 1.0
    for i in range(2 * num_layers):
        a2 = a_attn2 if i % 2 == 0 else a_mlp2
        taus.append(math.sqrt(a2 / total))
        total += a2
    return tuple(taus)
