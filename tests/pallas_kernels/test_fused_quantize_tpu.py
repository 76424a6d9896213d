"""Fused quantization on TPU: the Mosaic TPU kernels in interpret mode against the XLA
reference, bit for bit (codes, scales, amax; NaN codes compared as NaN)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxq.kernels import registry as R

import jaxq
from jaxq import formats as F
from jaxq import kernels

from .common import lower_or_skip

fq = kernels.fused_quantize
tpu = kernels.fused_quantize_tpu


def _same(a, b):
    """Equal bit patterns, NaNs compared as NaN (their sign or payload may differ)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    fa, fb = a.astype(np.float32), b.astype(np.float32)
    np.testing.assert_array_equal(np.isnan(fa), np.isnan(fb))
    keep = ~np.isnan(fa)
    np.testing.assert_array_equal(a[keep].view(np.uint8), b[keep].view(np.uint8))


def _input(shape, seed, dtype=jnp.float32, spread=True):
    """Random values over many binades (or plain normal ones) with edge values placed in
    different blocks: zeros and -0, an all-zero 32-block, float32 subnormals, the largest
    float32, ±inf, NaN, exact powers of two and a tiny-valued row."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, shape)
    if spread:
        x = x * jnp.exp2(jax.random.randint(k2, shape, -12, 12).astype(jnp.float32))
    x = x.at[0, :32].set(0.0).at[1, 0].set(-0.0).at[1, 33].set(1e-40).at[1, 34].set(-3e-42)
    x = x.at[2, 64].set(jnp.inf).at[3, 97].set(-jnp.inf).at[4, 5].set(jnp.nan)
    x = x.at[5, 40].set(3.4e38).at[6, 70].set(448.0).at[6, 71].set(-57344.0)
    x = x.at[7].set(x[7] * 1e-9)  # tiny blocks: subnormal codes and NVFP4 block scales
    return x.astype(dtype)


@functools.partial(jax.jit, static_argnames=("fmt",))
def _ct(x, amax, fmt):
    return kernels.cast_transpose(x, fmt, amax=amax, implementation="mosaic_tpu",
                                  interpret=True)  # fmt: skip


@pytest.mark.parametrize("fmt,dtype,amax,shape", [
    ("e4m3", jnp.float32, None, (37, 200)),  # current scaling: 3.4e38 sets the scale
    ("e5m2", jnp.bfloat16, 4.0, (130, 140)),  # delayed: saturation, E5M2 subnormals
    ("e4m3", jnp.float16, 28.0, (9, 260)),  # s = 2^-4: exact quotients, ties to even
])  # fmt: skip
def test_cast_transpose_equals_reference(fmt, dtype, amax, shape):
    x = _input(shape, seed=shape[0], dtype=dtype, spread=amax is not None)
    if dtype == jnp.float16:  # float16 overflows at 65504
        x = jnp.where(jnp.abs(x) < 6e4, x, 0.0).astype(dtype).at[2, 64].set(jnp.inf)
    a = None if amax is None else jnp.float32(amax)
    q, qt, amax_x = _ct(x, a, fmt)
    r, rt, ra = fq.reference_cast_transpose(x, fmt, amax=a)
    _same(q.codes, r.codes)
    _same(qt.codes, rt.codes)
    _same(q.scale, r.scale)
    _same(qt.scale, r.scale)
    np.testing.assert_array_equal(np.asarray(amax_x).view(np.uint32),
                                  np.asarray(ra, np.float32).view(np.uint32))  # fmt: skip
    assert q.shape == shape and qt.shape == shape[::-1] and q.dtype == np.dtype(dtype)


@functools.partial(jax.jit, static_argnames=("fmt",))
def _bq(x, fmt):
    return kernels.block_quantize(x, fmt, implementation="mosaic_tpu", interpret=True)


@pytest.mark.parametrize("fmt,dtype,shape", [
    ("mxfp8", jnp.bfloat16, (37, 224)),  # 7 blocks: one column tile of 256 lanes
    ("mxfp4", jnp.float32, (37, 224)),
    ("nvfp4", jnp.float32, (37, 224)),  # 14 blocks of 16
    ("mxfp4", jnp.bfloat16, (9, 4160)),  # 130 blocks: two column tiles of 128 blocks
    ("nvfp4", jnp.bfloat16, (9, 2080)),
])  # fmt: skip
def test_block_quantize_equals_reference(fmt, dtype, shape):
    x = _input(shape, seed=shape[1], dtype=dtype)
    q, r = _bq(x, fmt), jaxq.quantize(x, fmt)
    _same(q.codes, r.codes)
    _same(q.scale, r.scale)
    if fmt == "nvfp4":
        assert float(q.tensor_scale) == float(r.tensor_scale)
    assert q.layout == r.layout and q.shape == r.shape and q.dtype == r.dtype
    scale = np.asarray(q.scale, np.float32)
    if fmt != "mxfp8":  # FP4 cannot hold inf or NaN: those blocks dequantize to NaN
        bs = q.fmt.block_size
        assert np.isnan(scale[[2, 3, 4], [64 // bs, 97 // bs, 0]]).all()
    assert not np.isnan(scale[0, 0]) and not np.asarray(q.codes[0, :16]).view(np.uint8).any()


def test_element_encoder_is_ml_dtypes_rounding():
    """The kernels' integer FP8 encoder against ml_dtypes' cast on every float32 exponent
    of the formats' range, midpoints (ties to even) and their neighbours included."""
    for fmt in (F.E4M3, F.E5M2):
        codes = np.arange(0x7F if fmt is F.E4M3 else 0x7C, dtype=np.uint8)
        vals = codes.view(fmt.dtype).astype(np.float64)
        mids = ((vals[1:] + vals[:-1]) / 2).astype(np.float32)
        y = np.concatenate([vals.astype(np.float32), mids, np.nextafter(mids, np.float32(0)),
                            np.nextafter(mids, np.float32(np.inf))])  # fmt: skip
        y = np.concatenate([y, -y])
        want = np.clip(y, -fmt.max, fmt.max).astype(fmt.dtype).view(np.uint8)
        got = np.asarray(tpu.fp8_bits(jnp.asarray(y), fmt)).astype(np.uint8)
        np.testing.assert_array_equal(got, want)


def test_dispatch_and_refusals(monkeypatch):
    x = jnp.ones((4, 64))
    with pytest.raises(ValueError, match="mosaic_tpu: needs a TPU"):
        kernels.cast_transpose(x, implementation="mosaic_tpu")
    with pytest.raises(ValueError, match="mosaic_tpu: needs a TPU"):
        kernels.block_quantize(x, "nvfp4", implementation="mosaic_tpu")
    assert tpu.why_not(x, F.E2M1, interpret=True) == \
        "format float4_e2m1fn (supported: e4m3, e5m2, mxfp8, mxfp4, nvfp4)"  # fmt: skip
    with pytest.raises(ValueError, match=r"fmt must be one of \['e4m3', 'e5m2'\]"):
        kernels.cast_transpose(x, "mxfp8", implementation="mosaic_tpu", interpret=True)

    def picks(name, fmt, interpret, implementation=None):
        return kernels.registry.choose(name, implementation, lambda i: fq.why_not(
            i, x, interpret=interpret, block=32, fmt=F.get(fmt)))  # fmt: skip

    # CPU: XLA by default; in interpret mode "pallas" keeps the GPU kernels first (Mosaic
    # GPU where JAX has its interpret mode, else Triton)
    assert picks("cast_transpose", "e4m3", False) == "xla"
    gpu_first = "mosaic_gpu" if R.jax_version() >= R.MOSAIC_GPU_JAX else "triton"
    assert picks("block_quantize", "mxfp8", True, "pallas") == gpu_first
    assert picks("block_quantize", "mxfp8", True, "mosaic_tpu") == "mosaic_tpu"
    monkeypatch.setattr(kernels.registry, "platform", lambda: "tpu")
    assert picks("cast_transpose", "e5m2", False) == "mosaic_tpu"  # a TPU: the TPU kernel
    assert picks("block_quantize", "nvfp4", False, "pallas") == "mosaic_tpu"
    names = [i.name for i in kernels.registry.get("block_quantize").implementations]
    assert names == ["mosaic_gpu", "triton", "mosaic_tpu", "xla"]


@pytest.mark.parametrize("what", ["e4m3", "e5m2", "mxfp8", "mxfp4", "nvfp4"])
def test_mosaic_tpu_kernel_lowers_for_tpu(what):
    fmt = F.get(what)
    if what in ("e4m3", "e5m2"):
        x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16)
        fn = lambda x: tpu.cast_transpose(x, fmt, jnp.float32(1.0), False)
    else:
        x = jax.ShapeDtypeStruct((64, 8192), jnp.float32)  # two column tiles for MXFP4/8
        fn = lambda x: tpu.block_quantize(x, fmt, jnp.float32(1.0), False)
    low = lower_or_skip(fn, x, target="tpu")
    assert "tpu_custom_call" in low.as_text()
