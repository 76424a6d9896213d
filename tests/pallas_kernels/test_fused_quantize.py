"""Fused quantization kernels in interpret mode against jaxq.quantize, bit for bit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import kernels

from .common import assert_same_codes as _same_codes
from .common import code_bits as _bits
from .common import lower_or_skip

fq = kernels.fused_quantize


def _input(shape, dtype=jnp.float32, nan=True):
    """Ragged shape, zeros, a huge value, an inf and (optionally) a NaN."""
    x = jax.random.normal(jax.random.key(0), shape) * 3
    x = x.at[3].set(0.0).at[5, 7].set(1e6).at[2, 40].set(jnp.inf)
    if nan:
        x = x.at[1, 3].set(jnp.nan)
    return x.astype(dtype)


@functools.partial(jax.jit, static_argnames=("fmt",))
def _ct(x, amax, fmt):
    return kernels.cast_transpose(x, fmt, amax=amax, implementation="pallas", interpret=True)


@pytest.mark.parametrize("fmt,dtype,delayed", [("e4m3", jnp.float32, False),
                                               ("e5m2", jnp.bfloat16, True)])
def test_cast_transpose_equals_quantize(fmt, dtype, delayed):
    x = _input((70, 100), dtype)  # not multiples of the 64x64 tile
    amax = jnp.float32(5.0) if delayed else None
    q, qt, amax_x = _ct(x, amax, fmt) if delayed else _ct(x, None, fmt)
    r, rt, ra = fq.reference_cast_transpose(x, fmt, amax=amax)
    _same_codes(q.codes, r.codes)
    _same_codes(qt.codes, r.codes.T)
    assert np.asarray(q.scale, np.float32).tobytes() == np.asarray(r.scale, np.float32).tobytes()
    assert float(amax_x) == float(ra) == float(jnp.asarray(1e6, dtype))
    assert q.shape == (70, 100) and qt.shape == (100, 70)
    np.testing.assert_array_equal(jaxq.dequantize(qt, jnp.float32),
                                  jaxq.dequantize(q, jnp.float32).T)


@functools.partial(jax.jit, static_argnames=("fmt",))
def _bq(x, fmt):
    return kernels.block_quantize(x, fmt, implementation="pallas", interpret=True)


@pytest.mark.parametrize("fmt", [pytest.param("mxfp8", marks=pytest.mark.sweep), "mxfp4",
                                 "nvfp4"])
def test_block_quantize_equals_quantize(fmt):
    x = _input((37, 224), nan=False)  # 37 rows, 7 blocks of 32 (14 of 16): ragged tiles
    q, r = _bq(x, fmt), jaxq.quantize(x, fmt)
    assert q.codes.dtype == r.codes.dtype and q.scale.dtype == r.scale.dtype
    np.testing.assert_array_equal(_bits(q.codes), _bits(r.codes))
    np.testing.assert_array_equal(_bits(q.scale), _bits(r.scale))
    if fmt == "nvfp4":
        assert float(q.tensor_scale) == float(r.tensor_scale)


@pytest.mark.parametrize("fmt", ["mxfp4", pytest.param("nvfp4", marks=pytest.mark.sweep)])
def test_block_with_nan_gets_a_nan_scale(fmt):
    """FP4 cannot encode NaN: the block holding one gets a NaN scale (jaxq.quantize's rule),
    every other block is as jaxq.quantize gives it."""
    x = _input((8, 64), nan=False).at[1, 3].set(jnp.nan)
    q, r = _bq(x, fmt), jaxq.quantize(x, fmt)
    deq = np.asarray(jaxq.dequantize(q))
    assert np.isnan(deq[1, :q.fmt.block_size]).all()
    other = np.ones(q.scale.shape, bool)
    other[1, 0] = False
    np.testing.assert_array_equal(_bits(q.scale)[other], _bits(r.scale)[other])


def test_errors_and_dispatch():
    x = jnp.ones((4, 48))
    with pytest.raises(ValueError, match="do not divide"):
        kernels.block_quantize(x, "mxfp4")
    with pytest.raises(ValueError, match="fmt must be one of"):
        kernels.block_quantize(jnp.ones((4, 64)), "e4m3")
    with pytest.raises(ValueError, match="2-D"):
        kernels.cast_transpose(jnp.ones((2, 3, 4)))
    with pytest.raises(TypeError, match="floating-point"):
        kernels.cast_transpose(jnp.ones((2, 3), jnp.int8))
    with pytest.raises(ValueError, match="needs a GPU"):
        kernels.cast_transpose(x, implementation="pallas")
    q = kernels.block_quantize(jnp.ones((4, 64)), "mxfp8")  # CPU: XLA, jaxq.quantize itself
    np.testing.assert_array_equal(_bits(q.codes), _bits(jaxq.quantize(jnp.ones((4, 64)),
                                                                       "mxfp8").codes))


@pytest.mark.parametrize("what", ["cast_transpose", "mxfp4", "nvfp4"])
def test_lowers_for_h100(what):
    x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16)
    if what == "cast_transpose":
        fn = lambda x: fq._ct_triton(x, jaxq.formats.E4M3, jnp.float32(1.0), 64, False)
    else:
        fn = lambda x: fq._block_triton(x, jaxq.formats.get(what), jnp.float32(1.0), False)
    assert "triton" in lower_or_skip(fn, x).as_text()
