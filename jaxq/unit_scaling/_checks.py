"""Argument checks shared by the unit-scaled ops (errors name the argument and shape)."""

from __future__ import annotations

import math

import jax.numpy as jnp


def floating(x, name: str):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
    return x


def min_ndim(x, n: int, name: str, what: str):
    if x.ndim < n:
        raise ValueError(f"{name} must have at least {n} dims ({what}), got shape {x.shape}")


def positive(v, name: str, *, allow_zero: bool = False):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(v)}")
    ok = math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        raise ValueError(f"{name} must be finite and {'>= 0' if allow_zero else '> 0'}, got {v}")
    return float(v)
