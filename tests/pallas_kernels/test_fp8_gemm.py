"""Scaled FP8 GEMM and W4A8: Triton kernels in interpret mode against their references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import kernels

from .common import abs_product, assert_within, lower_or_skip, random_qarray

fp8 = kernels.fp8_gemm
w4a8 = kernels.w4a8


@functools.partial(jax.jit, static_argnames=("out_dtype", "with_amax"))
def _fp8(a, b, out_dtype=jnp.float32, with_amax=False):
    return kernels.scaled_fp8_matmul(a, b, out_dtype=out_dtype, with_amax=with_amax,
                                     implementation="pallas", interpret=True)


def _bound(a, b):
    return abs_product(jnp.nan_to_num(jaxq.dequantize(a)), jnp.nan_to_num(jaxq.dequantize(b)))


@pytest.mark.parametrize("mode", ["blockwise", "rowwise"])
def test_fp8_matches_reference_with_amax(mode):
    """Ragged M and N (not multiples of 16/64), K of three 128-blocks, E5M2 x E4M3."""
    group = 128 if mode == "blockwise" else None
    a = random_qarray("e4m3", group, (20, 384), seed=1)
    b = random_qarray("e5m2" if mode == "rowwise" else "e4m3", group, (70, 384), seed=2)
    if mode == "blockwise":  # a 128x128 weight block: one scale for 128 rows
        s2d = jax.random.uniform(jax.random.key(0), (1, 3), minval=0.01, maxval=0.1)
        b = b.__class__(b.codes, fp8.expand_block_scales(s2d, 70), None, None, b.fmt,
                        b.shape, b.dtype, b.layout).validate()
    y, amax = _fp8(a, b, with_amax=True)
    ref, ref_amax = fp8.reference(a, b, with_amax=True)
    assert_within(y, ref, _bound(a, b), 1e-5)
    np.testing.assert_allclose(amax, ref_amax, rtol=1e-5)


def test_fp8_bfloat16_output_and_special_values():
    a = random_qarray("e4m3", 128, (3, 256), seed=3)
    codes = a.codes.at[0, 5].set(jnp.nan).at[1].set(0).at[2, 0].set(448)
    a = a.__class__(codes, a.scale, None, None, a.fmt, a.shape, a.dtype, a.layout)
    b = random_qarray("e4m3", 128, (33, 256), seed=4)
    y, amax = _fp8(a, b, out_dtype=jnp.bfloat16, with_amax=True)
    ref, ref_amax = fp8.reference(a, b, out_dtype=jnp.bfloat16, with_amax=True)
    assert y.dtype == jnp.bfloat16
    assert np.isnan(np.asarray(y, np.float32)[0]).all() and (np.asarray(y)[1] == 0).all()
    assert_within(y, ref, _bound(a, b), 2.0**-8)
    np.testing.assert_allclose(amax, ref_amax, rtol=2.0**-8)


def test_mxfp8_matches_reference():
    """MXFP8 x MXFP8 (E8M0 scale per 32 along K): ragged M and N, blocks 2^±20 apart, an
    all-zero block and a NaN scale code (its row is NaN, as dequantize gives)."""
    k1, k2, k3 = jax.random.split(jax.random.key(11), 3)
    xa = jax.random.normal(k1, (21, 192)) * jnp.exp2(
        jax.random.randint(k3, (21, 6), -20, 20).repeat(32, axis=1).astype(jnp.float32))
    xa = xa.at[3, 32:64].set(0.0)
    a = jaxq.quantize(xa, "mxfp8")
    bits = jax.lax.bitcast_convert_type(a.scale, jnp.uint8).at[5, 2].set(255)
    a = a.__class__(a.codes, jax.lax.bitcast_convert_type(bits, a.scale.dtype), None, None,
                    a.fmt, a.shape, a.dtype, a.layout)  # fmt: skip
    b = jaxq.quantize(jax.random.normal(k2, (67, 192)), "mxfp8")
    assert fp8._mode(a, b) == "mx"
    y = _fp8(a, b)
    ref = fp8.reference(a, b)
    assert np.isnan(np.asarray(y)[5]).all() and np.isnan(np.asarray(ref)[5]).all()
    keep = np.arange(21) != 5
    assert_within(y[keep], ref[keep], _bound(a, b)[keep], 1e-5)
    yb = _fp8(a, b, out_dtype=jnp.bfloat16)
    assert_within(yb[keep], ref[keep], _bound(a, b)[keep], 2.0**-8)


def test_fp8_dispatch_and_errors():
    a = random_qarray("e4m3", "tensor", (4, 64))
    b = random_qarray("e4m3", None, (8, 64))
    np.testing.assert_array_equal(kernels.scaled_fp8_matmul(a, b), fp8.reference(a, b))
    with pytest.raises(ValueError, match="needs a GPU"):
        kernels.scaled_fp8_matmul(a, b, implementation="triton")
    with pytest.raises(ValueError, match=r"contraction size K"):
        kernels.scaled_fp8_matmul(a, random_qarray("e4m3", None, (8, 96)))
    with pytest.raises(ValueError, match="E4M3/E5M2 or MXFP8"):
        kernels.scaled_fp8_matmul(a, random_qarray("int8", None, (8, 64)))
    with pytest.raises(TypeError, match="QArray"):
        kernels.scaled_fp8_matmul(a, jnp.ones((8, 64)))
    impl = kernels.registry.get("scaled_fp8_matmul").implementation("triton")
    mixed = random_qarray("e4m3", 32, (8, 64))  # 1x32 blocks: no kernel, XLA
    assert "layouts" in fp8.why_not(impl, a, mixed, interpret=True)


@functools.partial(jax.jit, static_argnames=())
def _w4a8(x, w):
    return kernels.w4a8_matmul(x, w, implementation="pallas", interpret=True)


@pytest.mark.parametrize("x_scale,group", [("tensor", 128), (None, None)])
def test_w4a8_matches_reference(x_scale, group):
    """Per-tensor activation scale with g128 weights; per-row scales on both sides."""
    x = random_qarray("e4m3", x_scale, (19, 256), seed=5)
    w = random_qarray("int4", group, (70, 256), seed=6)
    assert_within(_w4a8(x, w), w4a8.reference(x, w), _bound(x, w), 1e-5)


@pytest.mark.sweep
@pytest.mark.parametrize("group", [64, 256])
def test_w4a8_other_groups(group):
    x = random_qarray("e4m3", "tensor", (300, 512), seed=7)
    w = random_qarray("int4", group, (40, 512), seed=8)
    assert_within(_w4a8(x, w), w4a8.reference(x, w), _bound(x, w), 1e-5)


def test_w4a8_dispatch_and_errors():
    x = random_qarray("e4m3", "tensor", (2, 128))
    w = random_qarray("int4", 128, (8, 128))
    np.testing.assert_array_equal(kernels.w4a8_matmul(x, w), w4a8.reference(x, w))
    with pytest.raises(ValueError, match="INT4"):
        kernels.w4a8_matmul(x, random_qarray("nf4", 128, (8, 128)))
    with pytest.raises(ValueError, match="E4M3"):
        kernels.w4a8_matmul(random_qarray("e5m2", "tensor", (2, 128)), w)
    impl = kernels.registry.get("w4a8_matmul").implementation("triton")
    assert "groups of 64" in w4a8.why_not(impl, x, random_qarray("int4", 32, (8, 128)),
                                          interpret=True)


@pytest.mark.parametrize("mode", ["blockwise", "rowwise", "mx", "w4a8"])
def test_lowers_for_h100(mode):
    if mode == "mx":
        a = jaxq.quantize(jnp.ones((256, 512)), "mxfp8")
        low = lower_or_skip(lambda a, b: fp8._triton(a, b, np.dtype(jnp.bfloat16), False,
                                                     fp8.Config(), False), a, a)  # fmt: skip
    elif mode == "w4a8":
        x = random_qarray("e4m3", "tensor", (16, 512))
        w = random_qarray("int4", 128, (256, 512))
        low = lower_or_skip(lambda x, w: w4a8._triton(x, w, w4a8.Config(), False), x, w)
    else:
        group = 128 if mode == "blockwise" else None
        a = random_qarray("e4m3", group, (256, 512))
        b = random_qarray("e4m3", group, (256, 512))
        low = lower_or_skip(lambda a, b: fp8._triton(a, b, np.dtype(jnp.bfloat16), True,
                                                     fp8.Config(), False), a, b)
    assert "triton" in low.as_text()
