"""The power-of-two scale helpers against float64 references, under ``jit`` and eagerly.

The helpers work on float32 bit patterns; each must match the mathematical definition
computed in float64, bit for bit away from the rounding ties, and give the same bits
whether XLA compiles them as one program (``jit``) or runs them op by op.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxq.scaled.scales import (
    add_scale,
    magnitude,
    poison,
    poison_product,
    pow2_round,
    pow2_split,
    renormalize,
)

SQRT2_F32 = float(np.float32(np.sqrt(2.0)))  # the tie point pow2_round uses, in float32


def _random_positive(rng, n, lo=-120, hi=120):
    """Positive normal float32 over many binades, with powers of two and ties mixed in."""
    e = rng.integers(lo, hi, n)
    x = np.ldexp(rng.uniform(1.0, 2.0, n), e).astype(np.float32)
    x[: n // 8] = np.ldexp(np.float32(1), e[: n // 8])  # exact powers of two
    x[n // 8 : n // 4] = np.ldexp(np.float32(SQRT2_F32), e[n // 8 : n // 4])  # ties
    return x


def _ref_round(x64):
    """2^round(log2 x) in float64 with float32's sqrt(2) as the tie (rounded up)."""
    m, e = np.frexp(x64)  # x = m 2^e, m in [0.5, 1)
    return np.ldexp(1.0, e - 1 + (2 * m >= SQRT2_F32).astype(int))


SPECIALS = np.array([0.0, np.inf, -np.inf, np.nan, -1.0, 1e-45], np.float32)


def test_pow2_round_compiled_eager_and_reference_agree():
    x = _random_positive(np.random.default_rng(), 4096)
    compiled = np.asarray(jax.jit(pow2_round)(x))
    eager = pow2_round(x)
    np.testing.assert_array_equal(compiled.view(np.int32), np.asarray(eager).view(np.int32))
    np.testing.assert_array_equal(eager, _ref_round(x.astype(np.float64)))
    sp_t, sp_c = np.asarray(jax.jit(pow2_round)(SPECIALS)), np.asarray(pow2_round(SPECIALS))
    assert np.isnan(sp_c[1:4]).all() and np.isnan(sp_t[1:4]).all()  # inf and NaN -> NaN
    assert sp_c[0] == 0 and sp_t[0] == 0


def test_add_scale_matches_float64_hypot():
    rng = np.random.default_rng()
    a = _random_positive(rng, 4096, -90, 90)
    # many equal pairs
    b = np.where(rng.random(4096) < 0.3, a, _random_positive(rng, 4096, -90, 90))
    b[:64] = 0.0  # an operand that contributes no magnitude
    b[64:128] = np.ldexp(a[64:128], rng.integers(-30, 30, 64)).astype(np.float32)
    ref = _ref_round(np.hypot(a.astype(np.float64), b.astype(np.float64)))
    compiled = np.asarray(jax.jit(add_scale)(a, b))
    eager = np.asarray(add_scale(jax.numpy.asarray(a), jax.numpy.asarray(b)))
    host = add_scale(a, b)  # NumPy in (a trace-time constant): NumPy out, same bits
    assert isinstance(host, np.ndarray)
    # hypot exactly at a tie of the rounding (e.g. 1 and 1) must round up in both paths;
    # float32 arithmetic may land on either side only within a few ulps of a tie
    h = np.hypot(a.astype(np.float64), b.astype(np.float64))
    m, _ = np.frexp(h)
    near_tie = (np.abs(2 * m - SQRT2_F32) < 1e-6) & (b != 0) & (a != b)
    np.testing.assert_array_equal(compiled[:64], pow2_round(a[:64]))  # add_scale(s, 0) = r(s)
    np.testing.assert_array_equal(compiled[~near_tie], ref[~near_tie])
    np.testing.assert_array_equal(eager[~near_tie], ref[~near_tie])
    np.testing.assert_array_equal(host[~near_tie], ref[~near_tie])
    assert near_tie[1024:].mean() < 0.01  # away from the ties the inputs were built on
    one = np.float32(1)
    assert float(jax.jit(add_scale)(one, one)) == 2.0  # sqrt(2): tie rounds up
    assert float(jax.jit(add_scale)(np.float32(16), np.float32(2))) == 16.0
    tie = np.ldexp(np.float32(SQRT2_F32), np.arange(-100, 100)).astype(np.float32)
    np.testing.assert_array_equal(jax.jit(add_scale)(tie, 0 * tie), pow2_round(tie))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_add_scale_non_finite_gives_nan(bad):
    for fn in (jax.jit(add_scale), add_scale):
        assert np.isnan(fn(np.float32(bad), np.float32(1.0)))
        assert np.isnan(fn(np.float32(1.0), np.float32(bad)))
    assert np.isnan(jax.jit(add_scale)(np.float32(0), np.float32(0)))


def test_add_scale_near_the_top_of_the_range():
    big = np.float32(2.0**126)
    assert float(jax.jit(add_scale)(big, np.float32(1.0))) == 2.0**126
    assert float(jax.jit(add_scale)(big, big)) == 2.0**127
    assert float(jax.jit(add_scale)(np.float32(2.0**-126), np.float32(0))) == 2.0**-126


@pytest.mark.parametrize("grow", [False, True])
def test_pow2_split_compiled_and_eager_agree(grow):
    rng = np.random.default_rng()
    c = (_random_positive(rng, 2048) * rng.choice([-1, 1], 2048)).astype(np.float32)
    c = np.concatenate([c, SPECIALS])
    mt, st = (np.asarray(v) for v in jax.jit(lambda c: pow2_split(c, grow=grow))(c))
    mc, sc = (np.asarray(v) for v in pow2_split(c, grow=grow))
    ok = np.isfinite(c) & (np.abs(c) >= np.finfo(np.float32).tiny)
    np.testing.assert_array_equal(st, sc)
    # subnormals pass through unchanged (XLA on CPU may flush them to zero)
    np.testing.assert_array_equal(mt[ok | np.isnan(c)], mc[ok | np.isnan(c)])
    lo, hi = (1.0, 2.0) if grow else (0.5, 1.0)
    assert ((np.abs(mc[ok]) >= lo) & (np.abs(mc[ok]) < hi)).all()
    np.testing.assert_array_equal(mc[ok].astype(np.float64) * sc[ok], c[ok])  # exact
    assert (sc[~ok] == 1).all()


def test_magnitude_and_poison_match_references_compiled_and_eager():
    rng = np.random.default_rng()
    for x in (
        (rng.normal(size=(7, 5)) * 2.0 ** rng.integers(-60, 60)).astype(np.float32),
        np.zeros(3, np.float32),
        np.array([1.0, np.nan], np.float32),
        np.full(4, -1.0 / 64, np.float32),
    ):
        amax = np.abs(x.astype(np.float64)).max()
        ref = _ref_round(amax) if np.isfinite(amax) and amax > 0 else 1.0  # 1: no magnitude
        assert float(jax.jit(magnitude)(x)) == float(magnitude(x)) == ref, (x, ref)
    s = np.concatenate([_random_positive(rng, 64), SPECIALS[:-1]])  # no subnormal: XLA
    pt, pc = np.asarray(jax.jit(poison)(s)), np.asarray(poison(s))  # may flush it to 0
    np.testing.assert_array_equal(np.isnan(pt), np.isnan(pc))
    np.testing.assert_array_equal(pt[~np.isnan(pt)], pc[~np.isnan(pc)])
    np.testing.assert_array_equal(pc[:64], s[:64])
    assert np.isnan(pc[64:]).all()  # 0, +-inf, NaN, negative


def test_poison_product_is_the_scale_or_nan_in_every_binade():
    """``poison_product(s * c)`` is ``s * c`` exactly where that is a positive normal
    float32 and NaN where it under- or overflowed, compiled, in a scan and on the host;
    XLA must not reassociate it into a form whose intermediate squares leave the range."""
    rng = np.random.default_rng()
    s = _random_positive(rng, 512, -126, 127)
    c = np.ldexp(np.float32(1), rng.integers(-40, 41, 512)).astype(np.float32)
    with np.errstate(over="ignore", under="ignore"):
        exact = s.astype(np.float64) * c
    ok = (exact >= np.finfo(np.float32).tiny) & (exact <= np.finfo(np.float32).max)
    want = np.where(ok, exact, np.nan).astype(np.float32)
    got = np.asarray(jax.jit(lambda s, c: poison_product(s * c))(s, c))
    np.testing.assert_array_equal(got, want)
    with np.errstate(over="ignore", under="ignore"):
        host = poison_product(s * c)
    np.testing.assert_array_equal(host[ok], want[ok])  # the host keeps subnormals
    assert np.isnan(host[~ok & ~(exact > 0)]).all() and np.isnan(host[exact > 3.5e38]).all()

    def step(x, _):  # a carried scale shrinking by 2^-20 per step, guarded each time
        x = poison_product(x * np.float32(2.0**-20))
        return x, x

    _, ys = jax.jit(lambda x: jax.lax.scan(step, x, None, length=12))(np.float32(2.0**100))
    want = np.ldexp(np.float32(1), 100 - 20 * np.arange(1, 13)).astype(np.float32)
    want[want < np.finfo(np.float32).tiny] = np.nan
    np.testing.assert_array_equal(np.asarray(ys), want)
    for bad in (0.0, np.inf, np.nan):
        assert np.isnan(jax.jit(poison_product)(np.float32(bad)))
        assert np.isnan(poison_product(np.float32(bad)))


def test_renormalize_moves_the_rounded_rms_into_the_scale():
    """``r = 2^round(log2 sqrt(mean d^2))`` (ties up) against float64, in every binade and
    at the exact ties ``mean d^2 = 4^k`` and ``2 * 4^k``; the value ``d * s`` is unchanged
    bit for bit, compiled and eagerly; a zero or non-finite mean square keeps ``r = 1``."""
    rng = np.random.default_rng()
    f = jax.jit(lambda d, s: renormalize(d, s, np.float32))
    cases = [(rng.standard_normal(rng.integers(1, 50)) * 2.0 ** rng.integers(-60, 60))
             for _ in range(200)]  # fmt: skip
    cases += [np.full(4, 2.0**k) for k in range(-60, 61, 7)]  # mean square 4^k
    cases += [np.array([2.0**k, 2.0**k, 0.0, 0.0]) * 2.0 for k in range(-60, 61, 7)]  # 2*4^k
    # the float just below the tie 2*4^k: a float32 square root rounds it onto the tie
    cases += [np.array([np.sqrt(np.nextafter(np.float32(2 * 4.0**k), np.float32(0)))])
              for k in range(-20, 21, 3)]  # fmt: skip
    for d in cases:
        d = d.astype(np.float32)
        ms = np.mean(d.astype(np.float32) ** 2, dtype=np.float32)
        want = 2.0 ** np.floor(np.log2(np.sqrt(np.float64(ms))) + 0.5)
        s0 = np.float32(2.0 ** rng.integers(-20, 20))
        for out, s in (f(d, s0), renormalize(d, s0, np.float32)):
            assert float(s) == want * s0, (ms, float(s), want)
            np.testing.assert_array_equal(
                np.asarray(out, np.float64) * float(s), d.astype(np.float64) * s0
            )
    for bad in (0.0, np.inf, np.nan):
        _, s = f(np.full(3, bad, np.float32), np.float32(4.0))
        assert float(s) == 4.0
