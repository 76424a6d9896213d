"""A small FP8 matmul for unit-scaled models: E4M3 forward, E5M2 backward, static scales.

Unit scaling keeps activations, weights and gradients near unit scale, so FP8 casts can
use *fixed* scales (1 by default) instead of amax-based dynamic scaling. Operands are
divided by their static scale, cast (round-to-nearest-even, saturating at the format's
max), multiplied with float32 accumulation, and the product is multiplied back. In the
backward pass the incoming gradient is cast to the backward format and the two operand
gradients are computed from the *cast* forward operands.

Casts are ``jaxq.cast`` (bit-exact with ml_dtypes round-to-nearest-even; finite values
beyond the format's max saturate to ``+-max``). Non-finite values are never hidden: NaN
stays NaN, ``+-inf`` becomes NaN in E4M3 (which has no inf) and stays ``+-inf`` in E5M2,
so an overflowing step shows up as a non-finite loss/gradient (which
:func:`jaxq.unit_scaling.optim.adamw` skips).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxq import formats
from jaxq.formats import FloatFormat
from jaxq.quantization import cast as _cast

__all__ = ["Fp8DotGeneral", "fp8_dot_general"]


def _scaled_cast(x, fmt, scale):
    if scale == 1.0:
        return _cast(x, fmt)
    return _cast(x / scale, fmt) * jnp.asarray(scale, x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fp8_dot(lhs, rhs, dimension_numbers, cfg):
    lq, rq = _fwd_cast(lhs, rhs, cfg)
    return jax.lax.dot_general(lq, rq, dimension_numbers, preferred_element_type=jnp.float32)


def _fwd_cast(lhs, rhs, cfg):
    return (
        _scaled_cast(lhs, cfg.fwd_format, cfg.lhs_scale),
        _scaled_cast(rhs, cfg.fwd_format, cfg.rhs_scale),
    )


def _fp8_dot_fwd(lhs, rhs, dimension_numbers, cfg):
    lq, rq = _fwd_cast(lhs, rhs, cfg)
    out = jax.lax.dot_general(lq, rq, dimension_numbers, preferred_element_type=jnp.float32)
    return out, (lq, rq)


def _fp8_dot_bwd(dimension_numbers, cfg, res, g):
    lq, rq = res
    gq = _scaled_cast(g, cfg.bwd_format, cfg.grad_scale)
    _, vjp = jax.vjp(
        lambda a, b: jax.lax.dot_general(
            a, b, dimension_numbers, preferred_element_type=jnp.float32
        ),
        lq,
        rq,
    )
    dl, dr = vjp(gq)
    return dl.astype(lq.dtype), dr.astype(rq.dtype)


_fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


@dataclasses.dataclass(frozen=True)
class Fp8DotGeneral:
    """A ``dot_general`` with FP8 operands: a frozen, hashable drop-in for ``jax.lax.dot_general``.

    Attributes:
        fwd_format: format of both forward operands (default E4M3).
        bwd_format: format of the output gradient (default E5M2).
        lhs_scale, rhs_scale, grad_scale: static scales (> 0): a tensor is stored as
            ``cast(x / scale) * scale``. Unit-scaled models use 1.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> dot = Fp8DotGeneral()
        >>> x, w = jnp.ones((2, 3)), jnp.full((3, 4), 1.06)
        >>> dot(x, w, (((1,), (0,)), ((), ()))).tolist()[0]
        [3.0, 3.0, 3.0, 3.0]
    """

    fwd_format: FloatFormat = formats.E4M3
    bwd_format: FloatFormat = formats.E5M2
    lhs_scale: float = 1.0
    rhs_scale: float = 1.0
    grad_scale: float = 1.0

    def __post_init__(self):
        for name in ("fwd_format", "bwd_format"):
            if not isinstance(getattr(self, name), FloatFormat):
                raise TypeError(f"{name} must be a jaxq FloatFormat, got {getattr(self, name)!r}")
        for name in ("lhs_scale", "rhs_scale", "grad_scale"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v < float("inf")):
                raise ValueError(f"{name} must be a finite positive number, got {v!r}")

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        """Computes the FP8 product; ``precision`` is ignored, the result is float32 or
        ``preferred_element_type``."""
        dn = jax.tree.map(int, dimension_numbers)
        dn = tuple(tuple(tuple(d) for d in part) for part in dn)
        out = _fp8_dot(jnp.asarray(lhs), jnp.asarray(rhs), dn, self)
        return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))


fp8_dot_general = Fp8DotGeneral()
"""E4M3-forward / E5M2-backward ``dot_general`` with unit static scales."""
