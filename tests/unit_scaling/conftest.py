"""Helpers for the unit-scaling tests: measure output and gradient scales of an op."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def unit_grads(f, *inputs, key=None):
    """Runs ``f(*inputs)``; pulls back a unit-normal cotangent; returns (out, grads).

    Everything runs in one ``jit`` (one compilation per test).
    """
    key = jax.random.key(123) if key is None else key

    @jax.jit
    def run(inputs):
        out, vjp = jax.vjp(f, *inputs)
        leaves, treedef = jax.tree.flatten(out)
        keys = jax.random.split(key, len(leaves))
        cot = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
        cot = jax.tree.unflatten(treedef, cot)
        return out, vjp(cot)

    return run(inputs)


def std(x):
    return float(np.std(np.asarray(x, np.float64)))


def normals(seed, *shapes):
    """Unit-normal float32 arrays (numpy RNG: no compilation)."""
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


@pytest.fixture
def assert_unit():
    def check(name, x, tol=0.1):
        s = std(x)
        assert abs(s - 1.0) <= tol, f"{name}: std {s:.4f} not within 1 +- {tol}"

    return check
