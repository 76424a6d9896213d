"""Per-block scales survive ``reshape``, ``gather`` and ``concatenate`` where the blocks allow.

Each case checks the value against the float computation on ``asarray`` inputs and the
exact scale shape of the result (so a silent fallback to a scalar scale fails).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.scaled import ScaledArray, asarray, scalify

RNG = np.random.default_rng(7)


def _blocked(shape, scale_shape):
    d = jnp.asarray(RNG.standard_normal(shape), jnp.float32)
    return ScaledArray(d, jnp.asarray(2.0 ** RNG.integers(-12, 12, scale_shape), jnp.float32))


def _run(fn, *args):
    got = scalify(fn)(*args)
    want = fn(*[asarray(a) if isinstance(a, ScaledArray) else a for a in args])
    np.testing.assert_array_equal(asarray(got), want)
    return tuple(jnp.shape(got.scale))


@pytest.mark.parametrize(
    ("new", "scale"),
    [
        ((4, 2, 32), (4, 2, 1)),  # split the blocked axis at block boundaries
        ((4, 4, 16), (4, 2, 1)),  # split inside blocks
        ((256,), (8,)),  # merge: row-major blocks stay contiguous
        ((8, 32), (8, 1)),
        ((64, 4), (8, 1)),
        ((1, 4, 64, 1), (1, 4, 2, 1)),  # unit axes
    ],
)
def test_reshape_keeps_blocks(new, scale):
    assert _run(lambda a: a.reshape(new), _blocked((4, 64), (4, 2))) == scale


def test_reshape_falls_back_when_blocks_interleave():
    # blocks along the last axis of (4, 8) are not contiguous once the axes are merged
    assert _run(lambda a: a.reshape(32), _blocked((4, 8), (1, 2))) == ()


def test_gather_keeps_per_row_scales():
    table = _blocked((97, 64), (97, 1))  # one scale per embedding row
    idx = jnp.asarray(RNG.integers(0, 97, (4, 16)))
    assert _run(lambda t: t[idx], table) == (4, 16, 1)
    col = _blocked((8, 64), (1, 2))  # MX-style blocks along the gathered row
    assert _run(lambda t: t[idx[0, :3] % 8], col) == (3, 2)


def test_gather_falls_back_when_slicing_inside_a_block():
    x = _blocked((8, 64), (8, 2))
    assert _run(lambda a: jnp.take(a, jnp.array([1, 5]), axis=1), x) == ()


def test_concatenate_keeps_blocks():
    a, b = _blocked((4, 64), (4, 2)), _blocked((2, 64), (2, 2))
    assert _run(lambda x, y: jnp.concatenate([x, y], 0), a, b) == (6, 2)
    plain = jnp.asarray(RNG.standard_normal((4, 32)), jnp.float32)  # scale 1 per block
    assert _run(lambda x, y: jnp.concatenate([x, y], 1), a, plain) == (4, 3)
    scalar = ScaledArray(plain, jnp.float32(2.0**-30))
    assert _run(lambda x, y: jnp.concatenate([x, y], 1), a, scalar) == (4, 3)
