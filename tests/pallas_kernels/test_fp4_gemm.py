"""Block-scaled FP4 GEMM: the Triton kernel in interpret mode against the reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxq.kernels import fp4_gemm

import jaxq
from jaxq import formats as F
from jaxq import kernels
from jaxq.quantization.qarray import Layout, QArray

from .common import abs_product, assert_within, lower_or_skip


def _fp4(fmt, shape, seed=0, scale_bytes=None):
    """A random MXFP4 / NVFP4 QArray: every code; E8M0 exponents 2^-20..2^20 or positive
    E4M3 scales (subnormals included), or the given scale bytes; a tensor scale for NVFP4."""
    fmt = F.get(fmt)
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (shape[0], shape[1] // 2), dtype=np.uint8)
    sshape = (shape[0], shape[1] // fmt.block_size)
    if scale_bytes is None:
        lo, hi = (107, 148) if fmt == F.MXFP4 else (1, 0x7F)
        scale_bytes = rng.integers(lo, hi, sshape, dtype=np.uint8)
    scale = jax.lax.bitcast_convert_type(jnp.asarray(scale_bytes, jnp.uint8),
                                         fmt.scale_format.dtype)  # fmt: skip
    ts = jnp.float32(rng.uniform(0.5, 2.0)) if fmt.tensor_scale else None
    return QArray(jnp.asarray(codes), scale, None, ts, fmt, tuple(shape), np.dtype(np.float32),
                  Layout("block", (1,), fmt.block_size)).validate()  # fmt: skip


# the Triton kernel by name: on JAX >= 0.12 "pallas" picks the Mosaic GPU one, tested apart
@functools.partial(jax.jit, static_argnames=("config",))
def _kernel(a, b, config=None):
    return kernels.fp4_matmul(a, b, implementation="triton", interpret=True, config=config)


def _check(a, b, **kw):
    y, ref = _kernel(a, b, **kw), fp4_gemm.reference(a, b)
    assert y.shape == ref.shape and y.dtype == jnp.float32
    bound = abs_product(jnp.nan_to_num(jaxq.dequantize(a)), jnp.nan_to_num(jaxq.dequantize(b)))
    assert_within(y, ref, bound, 1e-5)
    return y, ref


@pytest.mark.parametrize("fmt,m,n,k", [
    ("mxfp4", 1, 100, 96), ("nvfp4", 5, 72, 64), ("mxfp4", 70, 40, 256),
    ("nvfp4", 260, 24, 160),
])  # fmt: skip
def test_matches_reference(fmt, m, n, k):
    """Decode (M <= 16) and prefill tiles; M and N not multiples of the tiles; for MXFP4
    an odd number of 32-element blocks, for NVFP4 an odd number of steps."""
    _check(_fp4(fmt, (m, k), seed=m), _fp4(fmt, (n, k), seed=n + 1))


def test_quantized_inputs_edges_and_nan_scales():
    """jaxq.quantize'd operands with zero rows and outliers; extreme and NaN E8M0 scales."""
    x = jax.random.normal(jax.random.key(0), (12, 128)).at[0].set(0.0).at[3, 7].set(300.0)
    w = jax.random.normal(jax.random.key(1), (33, 128)) * 0.02
    for fmt in ("mxfp4", "nvfp4"):
        y, _ = _check(jaxq.quantize(x, fmt), jaxq.quantize(w, fmt))
        assert (np.asarray(y)[0] == 0).all()
    sb = np.full((20, 4), 127, np.uint8)
    sb[0, 0], sb[1, 1], sb[2, 2] = 1, 200, 255  # 2^-126, 2^73, NaN
    a = _fp4("mxfp4", (20, 128), scale_bytes=sb)
    y, ref = _check(a, _fp4("mxfp4", (30, 128), seed=5))
    assert np.isnan(np.asarray(y)[2]).all() and np.isfinite(np.asarray(y)[[0, 1, 3]]).all()


def test_refusals_and_dispatch_on_cpu():
    a, b = _fp4("mxfp4", (4, 64)), _fp4("mxfp4", (8, 64))
    impl = kernels.registry.get("fp4_matmul").implementation("triton")
    assert fp4_gemm.kernel_for(a, b) is None  # CPU: XLA
    np.testing.assert_array_equal(kernels.fp4_matmul(a, b), fp4_gemm.reference(a, b))
    with pytest.raises(ValueError, match="one format on both"):
        kernels.fp4_matmul(a, _fp4("nvfp4", (8, 64)))
    with pytest.raises(ValueError, match="same contraction"):
        kernels.fp4_matmul(a, _fp4("mxfp4", (8, 96)))
    with pytest.raises(TypeError, match="QArray"):
        kernels.fp4_matmul(a, jnp.ones((8, 64)))
    with pytest.raises(ValueError, match="MXFP4 or NVFP4"):
        kernels.fp4_matmul(a, jaxq.quantize(jnp.ones((8, 64)), "mxfp8"))
    odd = _fp4("nvfp4", (4, 48))
    assert "multiple of 32" in fp4_gemm.why_not(impl, odd, _fp4("nvfp4", (8, 48)),
                                                interpret=True)  # fmt: skip
    with pytest.raises(ValueError, match="needs a GPU"):
        kernels.fp4_matmul(a, b, implementation="pallas")


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_lowers_for_h100(fmt):
    a, b = _fp4(fmt, (64, 512)), _fp4(fmt, (256, 512), seed=1)
    low = lower_or_skip(lambda a, b: fp4_gemm._triton(a, b, fp4_gemm.Config(), False), a, b)
    assert "triton" in low.as_text()
