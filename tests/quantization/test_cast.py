import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxq
from jaxq import formats as F

FLOATS = [F.E4M3, F.E5M2, F.E2M3, F.E3M2, F.E2M1, F.E8M0]
F32_TINY = np.finfo(np.float32).smallest_normal


def _candidates(fmt, rng):
    """Every representable value, every midpoint (ties), their float32 neighbours, random."""
    v = fmt.values().astype(np.float32)
    mids = ((v[1:].astype(np.float64) + v[:-1]) / 2).astype(np.float32)
    up, down = np.float32(np.inf), np.float32(-np.inf)
    n = 20_000
    logs = np.exp(rng.uniform(np.log(fmt.min_subnormal / 4), np.log(fmt.max), n))
    c = np.concatenate([
        v, mids, np.nextafter(mids, up), np.nextafter(mids, down), np.nextafter(v, up),
        np.nextafter(v, down), rng.uniform(-fmt.max, fmt.max, n),
        logs * rng.choice([-1.0, 1.0], n), [0.0, -0.0, fmt.min_subnormal / 2],
    ]).astype(np.float32)
    c = c[np.abs(c) <= fmt.max]
    if fmt is F.E8M0:  # positive only; float32 subnormals are flushed to zero by XLA on CPU
        c = np.abs(c)
        c = c[c >= F32_TINY]
    return c


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16], ids=str)
@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_nearest_is_bit_exact_with_ml_dtypes(fmt, dtype):
    c = _candidates(fmt, np.random.default_rng(0))
    c = c[np.abs(c) <= float(ml_dtypes.finfo(dtype).max)].astype(dtype)
    if dtype is not np.float32:
        c = c[np.abs(c.astype(np.float32)) <= fmt.max]
        if fmt is F.E8M0:
            c = c[c.astype(np.float32) >= F32_TINY]
    want = c.astype(fmt.dtype).astype(dtype)
    got = np.asarray(jax.jit(lambda x: jaxq.cast(x, fmt))(jnp.asarray(c)))
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_ties_round_to_even():
    # 0.75 lies between E2M1's 0.5 and 1.0 (mantissas 1 and 0): even wins -> 1.0.
    # 2.5 lies between 2 and 3: 2.0 has the even mantissa.
    got = jaxq.cast(jnp.array([0.75, 2.5, 5.0, -5.0]), F.E2M1)
    assert got.tolist() == [1.0, 2.0, 4.0, -4.0]
    # E4M3: 17 lies between 16 and 18, 19 between 18 and 20.
    assert jaxq.cast(jnp.array([17.0, 19.0]), F.E4M3).tolist() == [16.0, 20.0]


@pytest.mark.parametrize("fmt", [F.E4M3, F.E5M2, F.E2M3, F.E3M2, F.E2M1], ids=lambda f: f.name)
def test_saturation_and_special_values(fmt):
    x = jnp.array([fmt.max * 4, -fmt.max * 4, jnp.inf, -jnp.inf, jnp.nan, 0.0], jnp.float32)
    got = np.asarray(jaxq.cast(x, fmt))
    assert got[0] == fmt.max and got[1] == -fmt.max
    if fmt.has_inf:
        assert got[2] == np.inf and got[3] == -np.inf
    elif fmt.has_nan:
        assert np.isnan(got[2]) and np.isnan(got[3])
    else:
        assert got[2] == fmt.max and got[3] == -fmt.max
    assert np.isnan(got[4])  # NaN is kept, never turned into a number
    assert got[5] == 0.0


@pytest.mark.parametrize("fmt", [F.E4M3, F.E5M2, F.E2M1], ids=lambda f: f.name)
def test_no_saturation_matches_ml_dtypes(fmt):
    x = np.array([fmt.max * 4, -fmt.max * 3, 1.0], np.float32)
    want = x.astype(fmt.dtype).astype(np.float32)
    got = np.asarray(jaxq.cast(jnp.asarray(x), fmt, saturate=False))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[~np.isnan(got)], want[~np.isnan(want)])


def test_e8m0_non_positive_is_nan():
    got = jaxq.cast(jnp.array([0.0, -1.0, 3.0]), F.E8M0)
    assert np.isnan(got[0]) and np.isnan(got[1]) and got[2] == 4.0


@pytest.mark.parametrize("fmt", [F.E4M3, F.E2M1, F.E3M2, F.INT4, F.NF4], ids=lambda f: f.name)
def test_stochastic_rounding_neighbours_and_unbiased(fmt):
    vals = fmt.values()
    rng = np.random.default_rng(1)
    lo_i = rng.integers(0, len(vals) - 1, 16)
    frac = rng.uniform(0.05, 0.95, 16)
    x = (vals[lo_i] + frac * (vals[lo_i + 1] - vals[lo_i])).astype(np.float32)
    n = 4000
    xs = jnp.asarray(np.repeat(x[None], n, 0))
    got = np.asarray(jaxq.cast(xs, fmt, rounding="stochastic", key=jax.random.key(0)))
    lo, hi = vals[lo_i].astype(np.float32), vals[lo_i + 1].astype(np.float32)
    assert np.all((got == lo) | (got == hi))
    # Unbiased: the mean is within 5 standard errors of x.
    p_hi = (x - lo) / (hi - lo)
    se = (hi - lo) * np.sqrt(p_hi * (1 - p_hi) / n)
    assert np.all(np.abs(got.mean(0) - x) < 5 * se + 1e-7)


def test_stochastic_needs_key_and_bad_inputs():
    with pytest.raises(ValueError, match="key"):
        jaxq.cast(jnp.ones(3), "e4m3", rounding="stochastic")
    with pytest.raises(ValueError, match="rounding"):
        jaxq.cast(jnp.ones(3), "e4m3", rounding="up")
    with pytest.raises(TypeError, match="floating-point"):
        jaxq.cast(jnp.ones(3, jnp.int32), "e4m3")
    with pytest.raises(ValueError, match="block format"):
        jaxq.cast(jnp.ones(3), "mxfp4")


def test_int_and_nf4_cast():
    x = jnp.array([-9.0, -2.5, 0.4, 3.5, 100.0, jnp.nan])
    got = np.asarray(jaxq.cast(x, F.INT4))
    np.testing.assert_array_equal(got[:5], [-7, -2, 0, 4, 7])
    assert np.isnan(got[5])
    lv = np.asarray(F.NF4_LEVELS)
    y = np.random.default_rng(2).uniform(-1, 1, 1000).astype(np.float32)
    want = lv[np.argmin(np.abs(y[:, None] - lv[None]), axis=1)]
    np.testing.assert_allclose(np.asarray(jaxq.cast(jnp.asarray(y), F.NF4)), want, rtol=0, atol=0)


def test_cast_under_transforms():
    x = jax.random.normal(jax.random.key(3), (4, 8)) * 10
    f = lambda x: jaxq.cast(x, "e2m1")
    np.testing.assert_array_equal(jax.vmap(f)(x), f(x))
    _, ys = jax.lax.scan(lambda c, r: (c, f(r)), 0.0, x)
    np.testing.assert_array_equal(ys, f(x))


def test_e4m3_encoder_and_decoder_on_random_bit_patterns():
    """The integer E4M3 encoder (used by ``cast``, ``quantize``, the 8-bit optimizer codecs
    and the kernels) against ml_dtypes on 2^21 float32 bit patterns drawn uniformly over
    ``|x| <= 448`` (every exponent, subnormals included) and on NaNs of both signs and
    random payloads; the decoder against ml_dtypes on all 256 codes. (Run once over all
    2^32 patterns: no mismatch.)"""
    from jaxq.quantization.cast import e4m3_bits, e4m3_values

    rng = np.random.default_rng()
    top = np.float32(448.0).view(np.uint32)
    mag = rng.integers(0, int(top) + 1, 1 << 21, dtype=np.uint64).astype(np.uint32)
    sign = rng.integers(0, 2, mag.size, dtype=np.uint32) << np.uint32(31)
    nans = (rng.integers(0x7F800001, 0x80000000, 4096, dtype=np.uint64).astype(np.uint32)
            | (rng.integers(0, 2, 4096, dtype=np.uint32) << np.uint32(31)))  # fmt: skip
    x = np.concatenate([mag | sign, nans, [0x43E00000, 0xC3E00000, 0, 0x80000000]])
    x = x.astype(np.uint32).view(np.float32)
    got = np.asarray(jax.jit(e4m3_bits)(jnp.asarray(x)))
    want = np.where(np.isnan(x), np.where(np.signbit(x), 0xFF, 0x7F),
                    x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)).astype(np.uint8)
    np.testing.assert_array_equal(got, want)
    codes = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(
        np.asarray(e4m3_values(jnp.asarray(codes))).view(np.uint32),
        codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32).view(np.uint32))
