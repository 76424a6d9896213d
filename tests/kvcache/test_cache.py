"""KVCache against a float64 numpy KIVI reference; windows, non-finite, overrun, jit, vmap."""

import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from jaxq import kvcache
from jaxq.kvcache import kivi

B, T, H, D, G = 2, 32, 2, 8, 8
QMAX = {"int8": 127, "int4": 7, "e4m3": 448.0, "e5m2": 57344.0}
FP8 = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}


def _round_ref(y, fmt):
    if fmt in FP8:
        return np.clip(y, -QMAX[fmt], QMAX[fmt]).astype(FP8[fmt]).astype(np.float64)
    return np.clip(np.round(y), -QMAX[fmt], QMAX[fmt])


def _kivi_ref(x, fmt, axis):
    """float64 reference: codes and scales, amax over ``axis`` of the finite values."""
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    amax = np.max(np.where(finite, np.abs(x), 0.0), axis=axis, keepdims=True)
    s = np.where(amax > 0, amax / QMAX[fmt], 1.0)
    y = np.where(finite, x / s, 0.0)
    codes = np.where(finite, _round_ref(y, fmt), np.nan)
    # An element whose scaled value sits within 1e-5 of a rounding boundary may round
    # either way under float32 arithmetic.
    near_tie = _round_ref(y * (1 + 1e-5), fmt) != _round_ref(y * (1 - 1e-5), fmt)
    return codes, np.squeeze(s, axis), near_tie


def _expected_read(k, v, p, fmt, r):
    """What a query at position ``p`` reads: KIVI keys per block, values per token."""
    n = p + 1
    nb = n // G
    kx = np.asarray(k[:, :n], np.float64).copy()
    vx = np.asarray(v[:, :n], np.float64).copy()
    kc, ks, ktie = _kivi_ref(kx[:, : nb * G].reshape(B, nb, G, H, D), fmt, 2)
    kq = (kc * ks[:, :, None]).reshape(B, nb * G, H, D)
    vc, vs, vtie = _kivi_ref(vx, fmt, -1)
    vq = vc * vs[..., None]
    j = np.arange(n)
    kfloat = (j > p - r) | (j >= nb * G)
    k_exp = np.where(kfloat[None, :, None, None], kx, np.pad(kq, ((0, 0), (0, n - nb * G),
                                                                    (0, 0), (0, 0))))
    v_exp = np.where((j > p - r)[None, :, None, None], vx, vq)
    steps = (np.repeat(ks, G, 1), vs[..., None])
    k_tie = np.pad(ktie.reshape(B, nb * G, H, D), ((0, 0), (0, n - nb * G), (0, 0), (0, 0)))
    return k_exp, v_exp, steps, (k_tie & ~kfloat[None, :, None, None], vtie)


def _check_read(cache, k, v, p, fmt, r):
    k_got, v_got = (np.asarray(a, np.float64)[:, : p + 1] for a in kvcache.read(cache, None, p))
    k_exp, v_exp, (ks, vs), (ktie, vtie) = _expected_read(k, v, p, fmt, r)
    nb = (p + 1) // G
    np.testing.assert_allclose(np.asarray(cache.k_scales)[:, :nb], ks[:, ::G][:, :nb],
                               rtol=1e-6)
    for got, exp, s, tie in ((k_got, k_exp, np.pad(ks, ((0, 0), (0, p + 1 - nb * G), (0, 0),
                                                         (0, 0)), constant_values=1), ktie),
                             (v_got, v_exp, vs, vtie)):
        assert np.array_equal(np.isnan(got), np.isnan(exp))
        err = np.abs(np.nan_to_num(got) - np.nan_to_num(exp)) / s
        step = 1.01 if fmt != "e4m3" else 33.0  # one code step (E4M3: at most 32 near 448)
        # float32 rounding of code * scale: a few ulps of the largest code
        assert np.all(err[~tie] <= 1e-6 * QMAX[fmt]), float(np.max(err[~tie]))
        assert np.all(err[tie] <= step)


def _inputs(seed=0, n=T):
    kk, kv = jax.random.split(jax.random.key(seed))
    k = np.array(jax.random.normal(kk, (B, n, H, D)))
    v = np.array(jax.random.normal(kv, (B, n, H, D)))
    k[:, :, 1, 3] *= 100.0  # a huge outlier channel
    k[:, :, 0, 5] = 0.0  # an all-zero channel
    v[:, 4] = 0.0  # an all-zero token
    v[:, 6, :, 2] = 1e4  # an outlier element
    return k, v


R = 3  # one cache configuration (T, G, R) for most tests: fewer compilations


@pytest.mark.parametrize("fmt", ["int8", "int4", "e4m3"])
def test_matches_float64_kivi_reference_ragged_length(fmt):
    k, v = _inputs()
    n = 29  # not a multiple of G
    cache = kvcache.init(B, H, T, D, fmt=fmt, residual=R, group_size=G)
    cache = kvcache.update(cache, None, k[:, :16], v[:, :16], 0)  # prefill chunk
    _check_read(cache, k, v, 15, fmt, R)
    for p in range(16, n):  # then token by token
        cache = kvcache.update(cache, None, k[:, p], v[:, p], p)
    _check_read(cache, k, v, n - 1, fmt, R)
    kr, vr = (np.asarray(x) for x in kvcache.read(cache, None, n - 1))
    np.testing.assert_array_equal(vr[:, n - R : n], v[:, n - R : n])  # the window: exact
    np.testing.assert_array_equal(kr[:, n - R : n], k[:, n - R : n])
    assert not np.array_equal(vr[:, n - R - 1], v[:, n - R - 1])  # left the window
    if fmt == "int4":  # two codes per byte
        assert cache.k_codes.dtype == np.uint8 and cache.k_codes.shape == (B, T, H, D // 2)
        assert cache.v_codes.nbytes == B * T * H * D // 2
        one_chunk = kvcache.update(kvcache.init(B, H, T, D, fmt=fmt, residual=R, group_size=G),
                                   None, k[:, :n], v[:, :n], 0)
        for x, y in zip(jax.tree.leaves(cache), jax.tree.leaves(one_chunk), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # chunking-invariant


@pytest.mark.parametrize("fmt", ["int8", "int4", "e4m3"])
def test_non_finite_element_does_not_poison_its_group(fmt):
    k, v = _inputs(3)
    k_bad, v_bad = k.copy(), v.copy()
    k_bad[0, 3, 1, 2] = np.nan
    k_bad[1, 9, 0, 0] = np.inf
    v_bad[0, 5, 1, 1] = -np.inf
    v_bad[1, 7, 0, 4] = np.nan
    clean_k, clean_v = k.copy(), v.copy()  # the bad elements replaced by 0
    for x, i in ((clean_k, (0, 3, 1, 2)), (clean_k, (1, 9, 0, 0)), (clean_v, (0, 5, 1, 1)),
                 (clean_v, (1, 7, 0, 4))):
        x[i] = 0.0
    n = 16
    empty = kvcache.init(B, H, T, D, fmt=fmt, residual=R, group_size=G)
    bad = kvcache.update(empty, None, k_bad[:, :n], v_bad[:, :n], 0)
    good = kvcache.update(empty, None, clean_k[:, :n], clean_v[:, :n], 0)
    for got, want, bad_idx in zip(kvcache.read(bad, None, n - 1), kvcache.read(good, None, n - 1),
                                  ([(0, 3, 1, 2), (1, 9, 0, 0)], [(0, 5, 1, 1), (1, 7, 0, 4)]),
                                  strict=True):
        got, want = np.array(got)[:, :n], np.array(want)[:, :n]
        for i in bad_idx:
            assert np.isnan(got[i])
            got[i] = want[i]
        np.testing.assert_array_equal(got, want)
    assert np.all(np.isfinite(np.asarray(bad.k_scales))) and np.all(np.isfinite(bad.v_scales))


def test_overrun_raises_eagerly_and_is_dropped_and_counted_under_jit():
    k, v = _inputs(4)
    cache = kvcache.init(B, H, T, D, fmt="int8", residual=R, group_size=G)
    with pytest.raises(ValueError, match=r"pos=31\.\.32.*max_len=32"):
        kvcache.update(cache, None, k[:, :2], v[:, :2], T - 1)
    with pytest.raises(ValueError, match=r"pos=32.*max_len=32"):
        kvcache.attend(cache, None, k[:, 0], T)
    with pytest.raises(ValueError, match="pos=-1"):
        kvcache.update(cache, None, k[:, 0], v[:, 0], -1)
    part = kvcache.update(cache, None, k[:, :16], v[:, :16], 0)
    for p in range(16, T - 1):
        part = kvcache.update(part, None, k[:, p], v[:, p], p)
    full = kvcache.update(part, None, k[:, T - 1], v[:, T - 1], T - 1)

    @jax.jit
    def step(c, k, v, p):
        c = kvcache.update(c, None, k, v, p)
        return c, kvcache.attend(c, None, k, p)

    k3, v3 = np.repeat(k[:, -1:], 3, 1), np.repeat(v[:, -1:], 3, 1)
    over, out = step(part, k3, v3, jnp.int32(T - 1))  # positions T and T + 1 are dropped
    assert int(over.overflow) == 2
    for x, y in zip(jax.tree.leaves(full)[:-1], jax.tree.leaves(over)[:-1], strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.all(np.isfinite(np.asarray(out)))  # queries past max_len see all positions


def test_jit_with_donation_and_vmap_over_layers():
    k, v = _inputs(5)
    ks, vs = np.stack([k, 2 * k]), np.stack([v, -v])
    empty = kvcache.init(B, H, T, D, fmt="int8", residual=R, group_size=G, layers=2)
    batched = jax.vmap(lambda c, a, b: kvcache.update(c, None, a, b, 0))(empty, ks[:, :, :3],
                                                                         vs[:, :, :3])
    step = jax.jit(kvcache.update, donate_argnums=0)  # the layer index is traced too
    cache = jax.tree.map(jnp.copy, empty)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "donated buffers were not usable"
        for p in range(3):
            for layer in range(2):
                old = cache
                cache = step(cache, jnp.int32(layer), ks[layer, :, p], vs[layer, :, p],
                             jnp.int32(p))
    assert all(x.is_deleted() for x in jax.tree.leaves(old))
    for x, y in zip(jax.tree.leaves(batched), jax.tree.leaves(cache), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_teacher_forced_attention_equals_prefill_then_token_by_token():
    k, v = _inputs(7)
    q = jax.random.normal(jax.random.key(7), (B, T, H, D))
    want = kvcache.teacher_forced_attention(q, k, v, fmt="int4", residual=R, group_size=G)
    cache = kvcache.init(B, H, T, D, fmt="int4", residual=R, group_size=G)
    out, cache = kvcache.update_attend(cache, None, q[:, :13], k[:, :13], v[:, :13], 0)
    got = [out]
    for p in range(13, T):
        out, cache = kvcache.update_attend(cache, None, q[:, p], k[:, p], v[:, p], p)
        np.testing.assert_allclose(kvcache.attend(cache, None, q[:, p], p), out, rtol=1e-5,
                                   atol=1e-6)  # one token: attend reads the same
        got.append(out)
    np.testing.assert_allclose(np.concatenate(got, 1), want, rtol=1e-5, atol=1e-6)


def test_e5m2_values_match_reference():
    _, v = _inputs(9)
    v[0, 1, 0, 0] = np.nan
    fmt = kivi.resolve_format("e5m2")
    codes, scales = kivi.quantize_groups(v, fmt, axis=-1)
    assert codes.dtype == ml_dtypes.float8_e5m2
    got = np.asarray(kivi.dequantize_codes(codes, fmt, D), np.float64)  # unscaled codes
    want, ref_scales, tie = _kivi_ref(v, "e5m2", -1)
    np.testing.assert_allclose(scales, ref_scales, rtol=1e-6)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[~tie & ~np.isnan(want)], want[~tie & ~np.isnan(want)])


def test_nbytes_per_token():
    h, d, g, t = 4, 16, 16, 64
    c4 = kvcache.init(2, h, t, d, fmt="int4", group_size=g, layers=2)
    assert kvcache.nbytes_per_token(c4, windows=False) == 2 * h * d / 2 + 4 * h + 4 * h * d / g
    assert kvcache.nbytes_per_token(c4) == 96 + 4 * h * d * (g - 1) / t
    c8 = kvcache.init(2, h, t, d, fmt="e4m3", group_size=g)
    assert kvcache.nbytes_per_token(c8, windows=False) == 2 * h * d + 4 * h + 4 * h * d / g
    cf = kvcache.init(2, h, t, d, fmt=None)
    assert kvcache.nbytes_per_token(cf) == 2 * h * d * 4


def test_shards_over_batch_and_heads():
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("batch", "heads"))
    k, v = _inputs(8)
    cache = kvcache.init(B, H, T, D, fmt="int4", residual=R, group_size=G, layers=2)
    sharded = jax.device_put(cache, kvcache.shardings(cache, mesh, batch="batch",
                                                      heads="heads"))

    def run(c):
        c = kvcache.update(c, 1, k[:, :16], v[:, :16], 0)
        return c, kvcache.attend(c, 1, k[:, 15:16], 15)

    c_ref, out_ref = jax.jit(run)(cache)
    c_sh, out_sh = jax.jit(run)(sharded)
    assert c_sh.k_codes.sharding.spec == PartitionSpec(None, "batch", None, "heads", None)
    np.testing.assert_allclose(out_sh, out_ref, rtol=1e-6)
    np.testing.assert_array_equal(c_sh.v_codes, c_ref.v_codes)


def test_argument_errors():
    with pytest.raises(ValueError, match="fmt must be None .*int8, int4, e4m3, e5m2"):
        kvcache.init(B, H, T, D, fmt="nvfp4")
    with pytest.raises(ValueError, match="fmt must be"):
        kivi.resolve_format("mystery")
    cache = kvcache.init(B, H, T, D, fmt="int8")
    with pytest.raises(ValueError, match=r"k must have shape .*\(2, 1, 3, 8\)"):
        kvcache.update(cache, None, jnp.zeros((B, 1, 3, D)), jnp.zeros((B, 1, 3, D)), 0)
    with pytest.raises(ValueError, match="no layer axis"):
        kvcache.update(cache, 0, jnp.zeros((B, H, D)), jnp.zeros((B, H, D)), 0)
    with pytest.raises(TypeError, match="pos must be an integer"):
        kvcache.read(cache, None, 1.5)
    with pytest.raises(ValueError, match="layer axis of size 2"):
        kvcache.read(kvcache.init(B, H, T, D, layers=2), None, 0)
