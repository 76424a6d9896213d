"""The Pallas Mosaic GPU kernels: interpret mode against the references, H100 lowering, dispatch.

Mosaic GPU's interpret mode exists from JAX 0.12 on; with an older JAX these tests skip
(saying so) and only the dispatch test runs, checking that the kernels refuse with that
reason. Shapes are ragged (not multiples of the tiles), so the wrappers' padding is tested.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxq.kernels import registry as R

import jaxq
from jaxq import kernels

from .common import (
    MOSAIC_GPU_JAX_OK,
    MOSAIC_GPU_REASON,
    abs_product,
    assert_within,
    lower_or_skip,
    needs_mosaic_gpu,
    random_qarray,
)
from .common import assert_same_codes as _same_codes

fq, fp8 = kernels.fused_quantize, kernels.fp8_gemm
NEW_JAX, REASON, needs_mosaic = MOSAIC_GPU_JAX_OK, MOSAIC_GPU_REASON, needs_mosaic_gpu

if not NEW_JAX:
    print(REASON)


@functools.partial(jax.jit, static_argnames=("fmt", "block"))
def _ct(x, amax, fmt, block=64):
    return kernels.cast_transpose(x, fmt, amax=amax, implementation="mosaic_gpu",
                                  interpret=True, block=block)  # fmt: skip


def _edge_input(shape, dtype, seed):
    """Fresh normals spanning 2^±12, plus 0, subnormals, ±max, ±inf and NaN."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, shape) * jnp.exp2(jax.random.uniform(k2, shape, minval=-12,
                                                                   maxval=12))  # fmt: skip
    tiny = float(jnp.finfo(dtype).smallest_subnormal)
    x = x.at[0, :5].set(jnp.array([0.0, -0.0, tiny, -3 * tiny, 1e-40]))
    x = x.at[1, 0].set(jnp.inf).at[2, 1].set(-jnp.inf).at[3, 2].set(jnp.nan)
    x = x.at[4, 3].set(float(jnp.finfo(dtype).max)).at[5, 4].set(-float(jnp.finfo(dtype).max))
    return x.astype(dtype)


@needs_mosaic
@pytest.mark.parametrize("fmt,dtype,delayed,shape,block", [
    ("e4m3", jnp.float32, False, (70, 100), 64),
    ("e5m2", jnp.bfloat16, True, (45, 130), 64),
    ("e4m3", jnp.bfloat16, True, (130, 20), 128),
])  # fmt: skip
def test_cast_transpose_equals_reference(fmt, dtype, delayed, shape, block):
    """Codes of x and xᵀ bit for bit (NaN as NaN), the scale and the finite amax, on every
    edge value: with the tensor's own amax the largest finite value sets the scale, with a
    delayed amax of 5 most values saturate to ±max and ±inf go to inf (E5M2) or NaN (E4M3)."""
    x = _edge_input(shape, dtype, seed=sum(shape))
    amax = jnp.float32(5.0) if delayed else None
    q, qt, amax_x = _ct(x, amax, fmt, block) if delayed else _ct(x, None, fmt, block)
    r, _, ra = fq.reference_cast_transpose(x, fmt, amax=amax)
    assert q.codes.dtype == r.codes.dtype and q.shape == shape and qt.shape == shape[::-1]
    _same_codes(q.codes, r.codes)
    _same_codes(qt.codes, r.codes.T)
    assert np.asarray(q.scale, np.float32).tobytes() == np.asarray(r.scale, np.float32).tobytes()
    assert float(amax_x) == float(ra) == float(jnp.finfo(dtype).max)
    codes = np.asarray(r.codes, np.float32)
    assert np.isnan(codes).any() and (codes == 0).any()  # the edge values reached the codes
    if delayed:
        assert (np.abs(codes) == float(jnp.finfo(r.codes.dtype).max)).any()


@needs_mosaic
def test_cast_transpose_amax_of_an_all_zero_or_non_finite_tensor():
    x = jnp.zeros((64, 64)).at[3, 4].set(jnp.nan).at[5, 6].set(-jnp.inf)
    q, qt, amax_x = _ct(x, None, "e4m3")
    r, _, ra = fq.reference_cast_transpose(x, "e4m3")
    assert float(amax_x) == float(ra) == 0.0
    _same_codes(q.codes, r.codes)
    _same_codes(qt.codes, r.codes.T)


@functools.partial(jax.jit, static_argnames=("out_dtype", "with_amax"))
def _mm(a, b, out_dtype=jnp.float32, with_amax=True):
    return kernels.scaled_fp8_matmul(a, b, out_dtype=out_dtype, with_amax=with_amax,
                                     implementation="mosaic_gpu", interpret=True)  # fmt: skip


def _bound(a, b):
    return abs_product(jnp.nan_to_num(jaxq.dequantize(a)), jnp.nan_to_num(jaxq.dequantize(b)))


@needs_mosaic
@pytest.mark.parametrize("mode,fa,fb,m,n,k", [
    ("tensor", "e4m3", "e5m2", 20, 70, 96),  # K = 3 steps of 32
    ("rowwise", "e5m2", "e4m3", 65, 40, 192),  # K = 3 steps of 64, M just past a tile
    ("blockwise", "e4m3", "e4m3", 30, 150, 256),
])  # fmt: skip
def test_fp8_matmul_matches_reference(mode, fa, fb, m, n, k):
    """Ragged M, N; mixed E4M3 x E5M2; tensor, per-row and 1x128 block scales, float32 and
    bfloat16 output and the fused amax."""
    group = {"tensor": "tensor", "rowwise": None, "blockwise": 128}[mode]
    a = random_qarray(fa, group, (m, k), seed=m)
    b = random_qarray(fb, group if mode != "tensor" else None, (n, k), seed=n)
    assert fp8._mode(a, b) == ("blockwise" if mode == "blockwise" else "rowwise")
    y, amax = _mm(a, b)
    ref, ref_amax = fp8.reference(a, b, with_amax=True)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    assert_within(y, ref, _bound(a, b), 1e-5)
    np.testing.assert_allclose(amax, ref_amax, rtol=1e-5)
    yb = _mm(a, b, out_dtype=jnp.bfloat16, with_amax=False)
    assert yb.dtype == jnp.bfloat16
    assert_within(yb, ref, _bound(a, b), 2.0**-8)


@needs_mosaic
def test_fp8_matmul_special_values_and_mx():
    """A NaN code spreads to its row, a zero row stays zero, the largest code is exact; an
    MXFP8 pair with a NaN scale code gives a NaN row, as dequantize does."""
    a = random_qarray("e4m3", 128, (3, 256), seed=3)
    codes = a.codes.at[0, 5].set(jnp.nan).at[1].set(0).at[2, 0].set(448)
    a = a.__class__(codes, a.scale, None, None, a.fmt, a.shape, a.dtype, a.layout)
    b = random_qarray("e4m3", 128, (33, 256), seed=4)
    y, amax = _mm(a, b)
    ref, ref_amax = fp8.reference(a, b, with_amax=True)
    assert np.isnan(np.asarray(y)[0]).all() and (np.asarray(y)[1] == 0).all()
    assert_within(y, ref, _bound(a, b), 1e-5)
    np.testing.assert_allclose(amax, ref_amax, rtol=1e-5)
    xa = jax.random.normal(jax.random.key(1), (9, 64)) * 1e3
    ma, mb = jaxq.quantize(xa, "mxfp8"), jaxq.quantize(jax.random.normal(jax.random.key(2),
                                                                         (20, 64)), "mxfp8")
    bits = jax.lax.bitcast_convert_type(ma.scale, jnp.uint8).at[4, 1].set(255)
    ma = ma.__class__(ma.codes, jax.lax.bitcast_convert_type(bits, ma.scale.dtype), None, None,
                      ma.fmt, ma.shape, ma.dtype, ma.layout)  # fmt: skip
    y, ref = _mm(ma, mb, with_amax=False), fp8.reference(ma, mb)
    assert np.isnan(np.asarray(y)[4]).all() and np.isnan(np.asarray(ref)[4]).all()
    keep = np.arange(9) != 4
    assert_within(y[keep], ref[keep], _bound(ma, mb)[keep], 1e-5)


def _lowered_text(fn, *args):
    text = lower_or_skip(fn, *args).as_text()
    assert "mosaic_gpu" in text and "triton" not in text
    return text


@needs_mosaic
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_cast_transpose_lowers_for_h100(fmt):
    from jaxq.kernels import fused_quantize_mosaic as fqm

    fn = lambda x: fqm.cast_transpose(x, jaxq.formats.get(fmt), jnp.float32(1.0), False)
    _lowered_text(fn, jax.ShapeDtypeStruct((128, 192), jnp.bfloat16))


@needs_mosaic
@pytest.mark.parametrize("mode", ["rowwise", "blockwise", "mx"])
def test_fp8_matmul_lowers_for_h100(mode):
    from jaxq.kernels import fp8_gemm_mosaic

    if mode == "mx":
        a = b = jaxq.quantize(jnp.ones((128, 256)), "mxfp8")
    else:
        group = 128 if mode == "blockwise" else None
        a, b = random_qarray("e4m3", group, (128, 256)), random_qarray("e5m2", group, (256, 256))
    fn = lambda a, b: fp8_gemm_mosaic.matmul(a, b, np.dtype(jnp.bfloat16), True, False)
    _lowered_text(fn, a, b)


def test_dispatch():
    """mosaic_gpu comes before triton; it is chosen in interpret mode on JAX >= 0.12 and
    refused, with the reason, on an older JAX or (compiled) off a Hopper GPU."""
    for name in ("cast_transpose", "scaled_fp8_matmul"):
        names = [i.name for i in R.get(name).implementations]
        assert names.index("mosaic_gpu") < names.index("triton")
    x = jnp.ones((8, 64))
    a, b = random_qarray("e4m3", None, (8, 64)), random_qarray("e4m3", None, (16, 64))
    ct = lambda i: fq.why_not(i, x, interpret=True, fmt=jaxq.formats.E4M3)
    mm = lambda i: fp8.why_not(i, a, b, interpret=True)
    for name, why in (("cast_transpose", ct), ("scaled_fp8_matmul", mm)):
        assert R.choose(name, None, lambda i: "no device") == "xla"  # CPU: unchanged
        if NEW_JAX:
            assert R.choose(name, "pallas", why) == "mosaic_gpu"
            assert R.choose(name, "mosaic_gpu", why) == "mosaic_gpu"
        else:
            assert R.choose(name, "pallas", why) == "triton"
            with pytest.raises(ValueError, match=r"mosaic_gpu: needs JAX >= 0\.12"):
                R.choose(name, "mosaic_gpu", why)
    impl = R.get("scaled_fp8_matmul").implementation("mosaic_gpu")
    if NEW_JAX:  # compiled, the kernels need a Hopper GPU
        with pytest.raises(ValueError, match="mosaic_gpu: needs a GPU"):
            kernels.cast_transpose(x, implementation="mosaic_gpu")
        with pytest.raises(ValueError, match="mosaic_gpu: needs a GPU"):
            kernels.scaled_fp8_matmul(a, b, implementation="mosaic_gpu")
        mixed = random_qarray("e4m3", 32, (8, 64))  # 1x32 blocks: no kernel
        assert "layouts" in fp8.why_not(impl, a, mixed, interpret=True)
        assert "multiple of 32" in fp8.why_not(impl, *(random_qarray("e4m3", None, (8, 48)),) * 2,
                                               interpret=True)  # fmt: skip
        long_mx = jaxq.quantize(jnp.ones((8, 8192)), "mxfp8")  # 256 scale steps
        assert "shared memory" in fp8.why_not(impl, long_mx, long_mx, interpret=True)
        mx = jaxq.quantize(jnp.ones((8, 4096)), "mxfp8")
        assert fp8.why_not(impl, mx, mx, interpret=True) is None
    else:
        assert "JAX >= 0.12" in fp8.why_not(impl, a, b, interpret=True)
