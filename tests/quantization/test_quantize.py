import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import jaxq
from jaxq import formats as F
from jaxq.quantization import packing

from .reference import fixed_point_scale, mx_quantize, nvfp4_quantize

MX = [(F.MXFP8, ml_dtypes.float8_e4m3fn), (F.MXFP8_E5M2, ml_dtypes.float8_e5m2),
      (F.MXFP6_E2M3, ml_dtypes.float6_e2m3fn), (F.MXFP6_E3M2, ml_dtypes.float6_e3m2fn),
      (F.MXFP4, ml_dtypes.float4_e2m1fn)]  # fmt: skip


def _data(shape, seed=0):
    """Gaussian data spread over many binades, with zeros, ties and an all-zero block."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-12, 12, shape[:-1] + (1,)))
    x = x.astype(np.float32)
    x[..., :32] = 0.0  # an all-zero block
    x[..., 40] = 2.5 * 2.0 ** -3  # a value that is an exact tie for several grids
    return x


@pytest.mark.parametrize("fmt,dt", MX, ids=lambda v: getattr(v, "name", ""))
def test_mx_matches_float64_spec_exactly(fmt, dt):
    x = _data((16, 256))
    q = jax.jit(lambda x: jaxq.quantize(x, fmt))(jnp.asarray(x))
    e, _, deq = mx_quantize(x, dt, fmt.element.emax, fmt.element.max)
    bits = np.asarray(q.scale).view(np.uint8).astype(np.int64)
    np.testing.assert_array_equal(bits - 127, e)
    np.testing.assert_array_equal(np.asarray(jaxq.dequantize(q)), deq.astype(np.float32))


def test_nvfp4_matches_float64_spec_exactly():
    x = _data((16, 256), seed=1)
    q = jax.jit(lambda x: jaxq.quantize(x, "nvfp4"))(jnp.asarray(x))
    s_t, s_b, _, deq = nvfp4_quantize(x)
    assert np.float32(q.tensor_scale) == s_t
    np.testing.assert_array_equal(np.asarray(q.scale).astype(np.float64), s_b)
    np.testing.assert_array_equal(np.asarray(jaxq.dequantize(q)), deq)


@pytest.mark.parametrize(
    "fmt", [F.E4M3, F.E5M2, F.E2M3, F.E3M2, F.E2M1, F.INT8, F.INT4, F.INT3, F.INT2],
    ids=lambda f: f.name,
)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_scaled_formats_match_reference(fmt, granularity):
    x = _data((8, 128), seed=2)
    kw = {"tensor": {}, "channel": {"axis": 0}, "block": {"block_size": 32}}[granularity]
    red = {"tensor": None, "channel": 1, "block": None}[granularity]
    q = jaxq.quantize(jnp.asarray(x), fmt, **kw)
    xg = x.reshape(8, 4, 32) if granularity == "block" else x
    amax = (np.max(np.abs(xg), axis=-1, keepdims=True) if granularity == "block"
            else np.max(np.abs(xg), axis=red, keepdims=red is not None))  # fmt: skip
    s = fixed_point_scale(amax, fmt.max).astype(np.float64)
    y = np.clip(xg / s, -fmt.max, fmt.max)
    if isinstance(fmt, F.IntFormat):
        codes = np.clip(np.round(y), fmt.qmin, fmt.qmax)
    else:
        codes = y.astype(fmt.dtype).astype(np.float64)
    want = (codes * s).astype(np.float32).reshape(x.shape)
    np.testing.assert_array_equal(np.asarray(jaxq.dequantize(q)), want)
    np.testing.assert_array_equal(np.asarray(q.scale).reshape(s.shape), s.astype(np.float32))


def test_nf4_and_asymmetric():
    x = _data((4, 128), seed=3)[..., 32:]
    q = jaxq.quantize(jnp.asarray(x), "nf4", block_size=32)
    xb = x.reshape(4, 3, 32)
    s = fixed_point_scale(np.abs(xb).max(-1, keepdims=True), 1.0).astype(np.float64)
    lv = np.asarray(F.NF4_LEVELS)
    idx = np.argmin(np.abs((xb / s)[..., None] - lv), axis=-1)
    np.testing.assert_array_equal(np.asarray(jaxq.dequantize(q)),
                                  (lv[idx] * s).astype(np.float32).reshape(x.shape))
    # asymmetric uint4: range [min, max] including 0 maps onto codes 0..15
    xa = np.abs(x) + 1.0
    qa = jaxq.quantize(jnp.asarray(xa), "uint4", block_size=32)
    lo, hi = 0.0, xa.reshape(4, 3, 32).max(-1, keepdims=True)
    s = (hi - lo) / 15
    want = (np.clip(np.round(xa.reshape(4, 3, 32) / s), 0, 15) * s).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(jaxq.dequantize(qa)), want, rtol=1e-6)
    assert int(qa.zero_point.max()) == 0


ALL_CASES = [
    ("e4m3", {}), ("e5m2", {"axis": 0}), ("int8", {"axis": -1}), ("int4", {"block_size": 128}),
    ("int2", {"block_size": 64}), ("int3", {"block_size": 128}), ("nf4", {"block_size": 64}),
    ("e2m1", {"block_size": 32}),
    ("e2m3", {"axis": (0,)}), ("e3m2", {}), ("uint8", {"axis": 0}), ("uint4", {"block_size": 64}),
    ("mxfp8", {}), ("mxfp6_e2m3", {}), ("mxfp6_e3m2", {}), ("mxfp4", {}), ("nvfp4", {}),
    ("mxfp8", {"axis": 0}),
]  # fmt: skip


@pytest.mark.parametrize("name,kw", ALL_CASES, ids=[f"{n}-{k}" for n, k in ALL_CASES])
def test_roundtrip_invariants(name, kw):
    x = _data((64, 256), seed=4)
    if name == "nvfp4":
        # NVFP4 re-quantizes exactly while block scales are E4M3 normals, i.e. block amax
        # within 2^15 of the tensor amax; E4M3-subnormal block scales are coarser.
        x = x / np.max(np.abs(x), axis=-1, keepdims=True) * np.exp2(np.arange(64) % 8)[:, None]
    x = jnp.asarray(x)
    q = jax.jit(lambda x: jaxq.quantize(x, name, **kw))(x)
    q.validate()
    d = jaxq.dequantize(q)
    assert d.shape == x.shape and d.dtype == x.dtype
    assert np.all(np.isfinite(np.asarray(d)))
    # quantize(dequantize(q)) reproduces q (asymmetric: codes and zero points exactly).
    q2 = jaxq.quantize(d, name, **kw)
    np.testing.assert_array_equal(np.asarray(q2.codes).view(np.uint8),
                                  np.asarray(q.codes).view(np.uint8))
    if q.zero_point is None:
        np.testing.assert_array_equal(np.asarray(q2.scale).astype(np.float32),
                                      np.asarray(q.scale).astype(np.float32))
    else:
        np.testing.assert_array_equal(q2.zero_point, q.zero_point)
        np.testing.assert_allclose(q2.scale, q.scale, rtol=3e-7)
    # Real storage: codes + scales; sub-byte codes packed.
    bits = F.get(name).bits
    assert q.codes.nbytes == x.size * bits // 8
    assert q.nbytes == sum(leaf.nbytes for leaf in jax.tree.leaves(q))


def test_int4_g128_storage_is_half_a_byte_per_element():
    q = jaxq.quantize(jnp.ones((1024, 1024)), "int4", block_size=128)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (1024, 512)
    assert q.nbytes == 1024 * 1024 // 2 + 1024 * 8 * 4
    assert q.bits_per_element == pytest.approx(4.25)


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_pack_unpack_roundtrip(bits):
    rng = np.random.default_rng(bits)
    for n in (1, 3, 8, 13):
        c = rng.integers(0, 2**bits, (5, n)).astype(np.uint8)
        p = packing.pack(jnp.asarray(c), bits=bits)
        assert p.shape == (5, packing.packed_length(n, bits))
        np.testing.assert_array_equal(packing.unpack(p, bits=bits, n=n), c)


def test_packing_layout_is_low_nibble_first():
    p = packing.pack(jnp.array([0x1, 0xF, 0x7], jnp.uint8), bits=4)
    assert p.tolist() == [0xF1, 0x07]
    p6 = packing.pack(jnp.array([1, 2, 3, 4], jnp.uint8), bits=6)
    assert p6.tolist() == [1 | (2 << 6) & 0xFF, (2 >> 2) | (3 << 4) & 0xFF, (3 >> 4) | (4 << 2)]
    p3 = packing.pack(jnp.arange(8, dtype=jnp.uint8), bits=3)  # 8 codes in 3 bytes
    word = sum(j << (3 * j) for j in range(8))
    assert p3.tolist() == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]


def test_zero_tensor_gives_finite_scales_and_zero_codes():
    for name, kw in ALL_CASES:
        q = jaxq.quantize(jnp.zeros((32, 256)), name, **kw)
        assert np.all(np.isfinite(np.asarray(q.scale).astype(np.float32))), name
        np.testing.assert_array_equal(jaxq.dequantize(q), 0.0)


def test_tiny_amax_gets_the_smallest_normal_scale():
    # amax / M below 2**-126 would be a subnormal scale, which backends flush to zero.
    tiny = np.finfo(np.float32).tiny
    rng = np.random.default_rng(7)
    for v in [tiny, 3.0 * tiny, 100.0 * tiny, 1e-40]:
        x = (rng.uniform(-1, 1, (4, 64)) * v).astype(np.float32)
        x[0, 0] = v
        for fmt in [F.INT8, F.INT4, F.INT2, F.E4M3, F.E5M2, F.E2M1]:
            for kw in [{}, {"axis": 0}, {"block_size": 32}]:
                q = jaxq.quantize(jnp.asarray(x), fmt, **kw)
                s = np.asarray(q.scale, np.float32)
                assert np.all(s >= tiny) and np.all(np.isfinite(s)), (v, fmt.name, kw, s)
                d = np.asarray(jaxq.dequantize(q))
                # integer grids: half a step; float grids: half the top step at most
                half = 0.5 if fmt.kind == "int" else fmt.max * 2.0 ** -(fmt.mantissa_bits + 1)
                # + tiny: backends may read a subnormal input as 0 (flush to zero)
                assert np.all(np.abs(d - x) <= np.max(s) * half + tiny), (v, fmt.name, kw)


def test_non_finite_inputs():
    x = np.ones((2, 64), np.float32)
    x[0, 3] = np.nan
    x[1, 5] = np.inf
    # E4M3 encodes NaN per element (and inf as NaN); the rest of the tensor is intact.
    d = np.asarray(jaxq.dequantize(jaxq.quantize(jnp.asarray(x), "e4m3")))
    assert np.isnan(d[0, 3]) and np.isnan(d[1, 5]) and np.sum(np.isnan(d)) == 2
    # E5M2 keeps inf.
    d = np.asarray(jaxq.dequantize(jaxq.quantize(jnp.asarray(x), "e5m2")))
    assert d[1, 5] == np.inf and np.isnan(d[0, 3])
    # Formats without NaN: the block holding NaN/inf dequantizes to NaN, other blocks intact.
    for name in ("int4", "e2m1", "nf4", "mxfp4", "nvfp4"):
        kw = {} if name in ("mxfp4", "nvfp4") else {"block_size": 16}
        d = np.asarray(jaxq.dequantize(jaxq.quantize(jnp.asarray(x), name, **kw)))
        assert np.all(np.isnan(d[0, :16])) and np.all(np.isnan(d[1, :16])), name
        np.testing.assert_array_equal(d[:, 32:], 1.0)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "int4", "nf4"])
def test_a_non_finite_element_poisons_its_block_at_every_shape(name, value):
    # Larger shapes take XLA:CPU's vectorized reductions, whose max drops NaN.
    rng = np.random.default_rng(0)
    for shape in [(2, 64), (40, 192), (7, 96), (1, 256)]:
        x = rng.standard_normal(shape).astype(np.float32)
        r, c = rng.integers(shape[0]), rng.integers(shape[1])
        x[r, c] = value
        kw = {} if name in ("mxfp4", "nvfp4") else {"block_size": 32}
        d = np.asarray(jaxq.dequantize(jaxq.quantize(jnp.asarray(x), name, **kw)))
        block = 16 if name == "nvfp4" else 32
        lo = c // block * block
        assert np.all(np.isnan(d[r, lo:lo + block])), (shape, r, c)
        assert np.sum(~np.isfinite(d)) == block, (shape, r, c)


def test_bad_input_errors():
    with pytest.raises(TypeError, match="floating-point"):
        jaxq.quantize(jnp.ones((4, 4), jnp.int8), "int8")
    with pytest.raises(ValueError, match=r"block_size 128 does not divide axis 1 of size 100"):
        jaxq.quantize(jnp.ones((4, 100)), "int4", block_size=128)
    with pytest.raises(ValueError, match="fixed block size of 32"):
        jaxq.quantize(jnp.ones((4, 64)), "mxfp4", block_size=16)
    with pytest.raises(ValueError, match=r"axis 2 is out of range .* \(4, 64\)"):
        jaxq.quantize(jnp.ones((4, 64)), "int8", axis=2)
    with pytest.raises(ValueError, match="unknown format"):
        jaxq.quantize(jnp.ones(4), "int5")
    with pytest.raises(ValueError, match="amax has shape"):
        jaxq.quantize(jnp.ones((4, 64)), "int8", axis=0, amax=jnp.ones(3))


def test_validator_reports_shapes():
    q = jaxq.quantize(jnp.ones((4, 64)), "int4", block_size=32)
    bad = jaxq.QArray(q.codes[:, :-1], q.scale, None, None, q.fmt, q.shape, q.dtype, q.layout)
    with pytest.raises(ValueError, match=r"codes has shape \(4, 31\), expected \(4, 32\)"):
        bad.validate()
    bad = jaxq.QArray(q.codes, q.scale[:, :1], None, None, q.fmt, q.shape, q.dtype, q.layout)
    with pytest.raises(ValueError, match=r"scale has shape \(4, 1\), expected \(4, 2\)"):
        jaxq.dequantize(bad)


def test_block_along_leading_axis_and_channel_shapes():
    x = jax.random.normal(jax.random.key(0), (64, 6, 10))
    q = jaxq.quantize(x, "int8", block_size=16, axis=0)
    assert q.scale.shape == (4, 6, 10)
    q = jaxq.quantize(x, "int8", axis=(0, 2))
    assert q.scale.shape == (64, 1, 10)
    assert jnp.max(jnp.abs(jaxq.dequantize(q) - x)) <= jnp.max(q.scale) / 2 * 1.0001


def test_transforms_jit_vmap_scan_grad():
    x = jax.random.normal(jax.random.key(1), (8, 64, 32))
    f = lambda x: jaxq.dequantize(jaxq.quantize(x, "int4", block_size=32))
    np.testing.assert_array_equal(jax.vmap(f)(x), jnp.stack([f(r) for r in x]))
    _, ys = jax.lax.scan(lambda c, r: (c, f(r)), 0, x)
    np.testing.assert_array_equal(ys, jax.vmap(f)(x))
    qs = jax.vmap(lambda r: jaxq.quantize(r, "mxfp4"))(x)
    assert qs.codes.shape == (8, 64, 16) and qs.scale.shape == (8, 64, 1)
    g = jax.grad(lambda x: jnp.sum(f(x) ** 2))(x[0])
    assert g.shape == x[0].shape and np.all(np.isfinite(np.asarray(g)))
    # stochastic rounding under jit with an explicit key
    fs = jax.jit(lambda x, k: jaxq.quantize(x, "e2m1", rounding="stochastic", key=k,
                                             block_size=32))  # fmt: skip
    a, b = fs(x[0], jax.random.key(0)), fs(x[0], jax.random.key(1))
    assert not np.array_equal(a.codes, b.codes)


def test_sharded_inputs_give_identical_results():
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = jax.sharding.Mesh(devices, ("a", "b"))
    x = jax.random.normal(jax.random.key(2), (64, 512))
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("a", "b")))
    for name, kw in [("int4", {"block_size": 128}), ("mxfp4", {}), ("e4m3", {"axis": 0})]:
        f = jax.jit(lambda x, name=name, kw=kw: jaxq.quantize(x, name, **kw))
        q, qs = f(x), f(xs)
        np.testing.assert_array_equal(np.asarray(qs.codes).view(np.uint8),
                                      np.asarray(q.codes).view(np.uint8))
        np.testing.assert_array_equal(jaxq.dequantize(qs), jaxq.dequantize(q))
