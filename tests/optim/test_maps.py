"""Dynamic maps (bit-exact vs bitsandbytes), nearest-code search, quantize_blockwise."""

import hashlib
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxq import optim
from jaxq.optim import maps

from .optim_numpy_ref import nearest

SHA_SIGNED = "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"
SHA_UNSIGNED = "305f002cc11278fb769d13b25b9fd0c7c83c8402c40a878fe086f4039fde6398"
REFERENCE = Path("/work/shared/reference/bnb_dynamic_map.txt")


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(a.astype("<f4").tobytes()).hexdigest()


def test_shipped_tables_sha256():
    assert _sha(optim.dynamic_map(True)) == SHA_SIGNED
    assert _sha(optim.dynamic_map(False)) == SHA_UNSIGNED


@pytest.mark.skipif(not REFERENCE.exists(), reason="reference file not present")
def test_shipped_tables_equal_reference_file():
    txt = REFERENCE.read_text()
    for name, signed in (("DYNAMIC_SIGNED_U32", True), ("DYNAMIC_UNSIGNED_U32", False)):
        body = txt.split(name + " = [")[1].split("]")[0]
        bits = np.array([int(h, 16) for h in re.findall(r"0x[0-9a-f]+", body)], np.uint32)
        np.testing.assert_array_equal(optim.dynamic_map(signed).view(np.uint32), bits)


@pytest.mark.parametrize("signed", [True, False])
def test_build_from_definition_is_bit_identical(signed):
    built = optim.build_dynamic_map(signed)
    np.testing.assert_array_equal(built.view(np.uint32), optim.dynamic_map(signed).view(np.uint32))


def test_definition_independent_float64():
    # The same definition in float64 agrees to float32 rounding (a few ulp), so the shipped
    # table is the definition; bit-exactness needs the GPU linspace above.
    for signed in (True, False):
        vals = [0.0, 1.0]
        for i in range(7):
            k = 2**i if signed else 2 ** (i + 1)
            b = np.linspace(0.1, 1.0, k + 1)
            means = (b[:-1] + b[1:]) / 2 * 10.0 ** (i - 6)
            vals += list(means) + (list(-means) if signed else [])
        ref = np.sort(np.array(vals))
        np.testing.assert_allclose(optim.dynamic_map(signed), ref, rtol=1e-6, atol=0)


def test_map_properties_and_4bit_maps():
    s, u = optim.dynamic_map(True), optim.dynamic_map(False)
    assert s.dtype == np.float32 and s.shape == (256,) and np.all(np.diff(s) > 0)
    assert np.all(np.diff(u) > 0) and u[0] == 0 and u[-1] == 1 and s[127] == 0
    m4 = optim.dynamic_map_4bit()
    expect = [0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875]
    ref = np.sort(np.array([0.0, 1.0] + expect + [-e for e in expect], np.float32))
    np.testing.assert_allclose(m4, ref, rtol=2e-7)
    np.testing.assert_array_equal(optim.linear_map_4bit(), np.arange(1, 17) / 16)
    with pytest.raises(TypeError, match="signed"):
        optim.dynamic_map(1)
    with pytest.raises(ValueError, match="max_exponent_bits"):
        optim.build_dynamic_map(True, max_exponent_bits=9)


@pytest.mark.parametrize("book", [maps.SIGNED8, maps.UNSIGNED8, maps.SIGNED4, maps.LINEAR4])
def test_nearest_code_matches_brute_force(book):
    rng = np.random.default_rng(0)
    lo = -1.0 if book.values[0] < 0 else 0.0
    mids = ((book.values[:-1] + book.values[1:]) / np.float32(2)).astype(np.float32)
    x = np.concatenate([
        rng.uniform(lo, 1.0, 20000), rng.uniform(lo, 1, 5000) * 1e-3,
        rng.uniform(lo, 1, 5000) * 1e-6, mids, np.nextafter(mids, 2),
        np.nextafter(mids, -2), book.values, [0.0, 1.0, 1.0000001, 1e-45],
    ]).astype(np.float32)
    if lo == 0:
        x = np.abs(x)
    got = np.asarray(jax.jit(book.encode)(x))
    # On an exact float32 midpoint both neighbours are nearest; the even index wins.
    below = np.searchsorted(mids, x, side="left")
    tie = np.isin(x, mids)
    np.testing.assert_array_equal(got[~tie], below[~tie])
    np.testing.assert_array_equal(got[tie], below[tie] + below[tie] % 2)
    np.testing.assert_array_equal(got[~tie], nearest(x[~tie].astype(np.float64), book.values))


def _bnb_search(code: np.ndarray, x: np.float32) -> int:
    """bitsandbytes' ``dQuantize`` (deterministic) ported to float32 NumPy, for 256 values.

    A 7-step binary search from pivot 127, then one comparison with the float32 midpoint
    to the neighbour on ``x``'s side; ``x`` on the midpoint stays at the (even) pivot.
    """
    f32 = np.float32
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper, val = f32(-1), f32(1), code[127]
    step = 64
    while step:
        if x > val:
            lower_pivot, lower, pivot = pivot, val, pivot + step
        else:
            upper_pivot, upper, pivot = pivot, val, pivot - step
        val, step = code[pivot], step // 2
    if upper_pivot == 255:
        upper = code[255]
    if lower_pivot == 0:
        lower = code[0]
    if x > val:
        return upper_pivot if x > f32((upper + val) * f32(0.5)) else pivot
    return lower_pivot if x < f32((lower + val) * f32(0.5)) else pivot


@pytest.mark.parametrize("signed", [True, False])
def test_encode_matches_bitsandbytes_search_including_ties(signed):
    code = optim.dynamic_map(signed)
    mids = ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)
    rng = np.random.default_rng(3)
    lo = -1.0 if signed else 0.0
    x = np.concatenate([rng.uniform(lo, 1, 3000), rng.uniform(lo, 1, 1000) * 1e-4, mids,
                        np.nextafter(mids, 2), np.nextafter(mids, -2), code]).astype(np.float32)
    want = np.array([_bnb_search(code, v) for v in x])
    book = maps.SIGNED8 if signed else maps.UNSIGNED8
    np.testing.assert_array_equal(np.asarray(jax.jit(book.encode)(x)), want)
    # through the public blockwise API too (absmax 1: x / absmax == x)
    xs = np.concatenate([[np.float32(1.0)], x]).astype(np.float32)
    codes, _ = optim.quantize_blockwise(jnp.asarray(xs), code, block_size=xs.size)
    np.testing.assert_array_equal(np.asarray(codes)[1:], want)


_encode8 = jax.jit(maps.SIGNED8.encode)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1.0, 1.0, width=32), min_size=1, max_size=64))
def test_nearest_code_property(xs):
    x = np.zeros(64, np.float32)
    x[: len(xs)] = xs
    got = np.asarray(_encode8(x))
    err = np.abs(maps.SIGNED8.values[got].astype(np.float64) - x)
    best = np.min(np.abs(maps.SIGNED8.values[None, :].astype(np.float64) - x[:, None]), axis=1)
    np.testing.assert_array_equal(err, best)


def _ref_flat(x, code, bs):
    flat = np.asarray(x, np.float32).reshape(-1)
    nb = -(-flat.size // bs)
    codes = np.empty(flat.size, np.int64)
    amax = np.zeros(nb, np.float32)
    for b in range(nb):
        blk = flat[b * bs : (b + 1) * bs]
        amax[b] = np.max(np.abs(blk))
        r = blk * (np.float32(1) / amax[b]) if amax[b] > 0 else np.zeros_like(blk)
        codes[b * bs : b * bs + blk.size] = nearest(r.astype(np.float64), code)
    return codes.reshape(np.shape(x)), amax


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape,bs", [((1000,), 256), ((3, 7, 50), 64), ((4096,), 4096)])
def test_quantize_blockwise_vs_reference(signed, shape, bs):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(3e-3)
    if not signed:
        x = np.abs(x)
    x.reshape(-1)[:bs] = 0.0  # an all-zero block
    code = optim.dynamic_map(signed)
    c, a = optim.quantize_blockwise(x, code, block_size=bs)
    rc, ra = _ref_flat(x, code, bs)
    assert c.dtype == jnp.uint8 and c.shape == x.shape and a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), ra)
    np.testing.assert_array_equal(np.asarray(c), rc)
    y = optim.dequantize_blockwise(c, a, code, shape, block_size=bs)
    ref = code[rc].reshape(-1) * np.repeat(ra, bs)[: x.size]
    np.testing.assert_array_equal(np.asarray(y).reshape(-1), ref)
    assert np.all(np.isfinite(np.asarray(y)))


def test_quantize_blockwise_errors():
    code = optim.dynamic_map(True)
    with pytest.raises(TypeError, match="x"):
        optim.quantize_blockwise(jnp.arange(10), code)
    with pytest.raises(ValueError, match="block_size"):
        optim.quantize_blockwise(jnp.ones(10), code, block_size=0)
    with pytest.raises(ValueError, match="code"):
        optim.quantize_blockwise(jnp.ones(10), code[::-1])
    c, a = optim.quantize_blockwise(jnp.ones(300), code)
    with pytest.raises(ValueError, match="absmax"):
        optim.dequantize_blockwise(c, a[:1], code, (300,))
    with pytest.raises(ValueError, match="codes"):
        optim.dequantize_blockwise(c, a, code, (301,))


def test_custom_map_with_close_values_uses_exact_comparisons():
    """Values too close for the bucket search fall back to comparing every midpoint."""
    half = np.float32(0.5)
    code = np.unique(np.concatenate([np.linspace(-1, 1, 18, dtype=np.float32),
                                     [half, np.nextafter(half, np.float32(1))]]))
    x = np.random.default_rng(5).uniform(-1, 1, 1024).astype(np.float32)
    x[:4] = [half, np.nextafter(half, np.float32(1)), -1.0, 1.0]
    codes, amax = optim.quantize_blockwise(jnp.asarray(x), code, block_size=1024)
    r = (x * (np.float32(1) / np.asarray(amax)[0])).astype(np.float64)
    np.testing.assert_array_equal(np.asarray(codes), nearest(r, code))
