"""Scale models: the statistics of unit-variance inputs pushed through an op.

Elementwise ops use exact Gaussian moments by Gauss-Hermite quadrature (float64 numpy,
computed once per static ``mult``); softmax and attention use the log-normal model of
``exp`` of a Gaussian (Unit Scaling, Blake et al. 2023; u-muP, Blake et al. 2024). All
results are plain Python floats, so they are static under ``jit``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numpy.polynomial.hermite_e import hermegauss

_NODES, _WEIGHTS = hermegauss(160)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()  # E[f(x)], x ~ N(0, 1)
_erf = np.vectorize(math.erf)


def _phi(x):
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _Phi(x):
    return 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _gelu(x, m):  # gelu(m x) / m
    return x * _Phi(m * x)


def _gelu_grad(x, m):
    return _Phi(m * x) + m * x * _phi(m * x)


def _silu(x, m):  # x * sigmoid(m x)
    return x * _sigmoid(m * x)


def _silu_grad(x, m):
    s = _sigmoid(m * x)
    return s + m * x * s * (1.0 - s)


_FNS = {"gelu": (_gelu, _gelu_grad), "silu": (_silu, _silu_grad)}


@functools.lru_cache(maxsize=256)
def gaussian_moments(name: str, mult: float) -> tuple[float, float, float]:
    """``(std f(x), rms f(x), rms f'(x))`` for ``x ~ N(0, 1)``, ``f`` in ``_FNS``."""
    f, df = _FNS[name]
    y = f(_NODES, mult)
    mean = float(np.sum(_WEIGHTS * y))
    second = float(np.sum(_WEIGHTS * y * y))
    grad_second = float(np.sum(_WEIGHTS * df(_NODES, mult) ** 2))
    return math.sqrt(second - mean * mean), math.sqrt(second), math.sqrt(grad_second)


def softmax_stds(n: int, mult: float) -> tuple[float, float]:
    """Log-normal model of softmax(mult * x) over ``n`` unit-variance logits.

    ``p_i ~ e^{m x_i} / (n e^{m^2/2})``, so ``std(p) = sqrt(e^{m^2} - 1) / n``, and the
    input gradient ``m p (g - p.g)`` has ``std ~ m e^{m^2/2} / n`` for unit ``g``.
    """
    m2 = mult * mult
    return math.sqrt(math.expm1(m2)) / n, mult * math.exp(0.5 * m2) / n


def attention_stds(
    q_len: int, k_len: int, head_dim: int, mult: float, causal: bool
) -> tuple[float, float]:
    """``(std out = std dv, std dq = std dk)`` of attention with logits ``m q.k / d``.

    Near-flat softmax model (logit variance ``s2 = m^2 / d`` small): a row attending to
    ``n`` keys gives output variance ``e^{s2} / n``; the query/key gradients have variance
    ``(m^2 / d) e^{s2} (1/n - 1/n^2)``. Causal rows attend to ``n = i + 1`` keys; rows are
    averaged. Capped at the one-hot limit (variance 1).
    """
    s2 = mult * mult / head_dim
    if causal:
        ns = np.arange(1, q_len + 1, dtype=np.float64) + max(k_len - q_len, 0)
    else:
        ns = np.full((q_len,), float(k_len))
    inv = 1.0 / ns
    out_var = min(1.0, math.exp(s2) * float(np.mean(inv)))
    qk_var = min(1.0, s2 * math.exp(s2) * float(np.mean(inv - inv * inv)))
    return math.sqrt(out_var), math.sqrt(qk_var)
