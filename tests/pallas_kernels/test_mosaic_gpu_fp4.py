"""The block-scaled FP4 GEMM's Pallas Mosaic GPU kernel: interpret mode against the
reference, H100 lowering, dispatch.

Mosaic GPU's interpret mode exists from JAX 0.12 on; with an older JAX these tests skip
(saying so) and only the dispatch test runs, checking that the kernel refuses with that
reason. ``M`` and ``N`` are ragged (not multiples of the 64-row and 64/128-column tiles), so
the wrapper's padding is tested; the decode shapes (one row tile) split ``K``.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxq.kernels import fp4_gemm
from jaxq.kernels import registry as R

import jaxq
from jaxq import formats as F
from jaxq import kernels
from jaxq.quantization.qarray import Layout, QArray

from .common import (
    MOSAIC_GPU_JAX_OK,
    MOSAIC_GPU_REASON,
    abs_product,
    assert_mosaic_gpu_version_rule,
    assert_within,
    lower_or_skip,
    needs_mosaic_gpu,
)

REL = 1e-5  # the module's tolerance (float32 output)

if not MOSAIC_GPU_JAX_OK:
    print(MOSAIC_GPU_REASON)


def _fp4(fmt, shape, seed=0, scale_bytes=None, codes=None):
    """An MXFP4 / NVFP4 QArray with random codes (every code) and scales (E8M0 2^-20..2^20,
    positive E4M3 with subnormals), or the given code / scale bytes; for NVFP4 a tensor
    scale. Built directly: ``jaxq.quantize``'s compilation would dominate these tests."""
    fmt = F.get(fmt)
    rng = np.random.default_rng(seed)
    if codes is None:
        codes = rng.integers(0, 256, (shape[0], shape[1] // 2), dtype=np.uint8)
    if scale_bytes is None:
        lo, hi = (107, 148) if fmt == F.MXFP4 else (1, 0x7F)
        scale_bytes = rng.integers(lo, hi, (shape[0], shape[1] // fmt.block_size), np.uint8)
    scale = jax.lax.bitcast_convert_type(jnp.asarray(scale_bytes, jnp.uint8),
                                         fmt.scale_format.dtype)  # fmt: skip
    ts = jnp.float32(rng.uniform(0.5, 2.0)) if fmt.tensor_scale else None
    return QArray(jnp.asarray(codes, jnp.uint8), scale, None, ts, fmt, tuple(shape),
                  np.dtype(np.float32), Layout("block", (1,), fmt.block_size)).validate()


@jax.jit
def _mm(a, b):
    return kernels.fp4_matmul(a, b, implementation="mosaic_gpu", interpret=True)


@functools.partial(jax.jit, static_argnames=("block_n", "split_k"))
def _mm_tiled(a, b, block_n, split_k):
    from jaxq.kernels import fp4_gemm_mosaic as fm

    return fm.matmul(a, b, True, block_n=block_n, split_k=split_k)


def _check(a, b, y=None):
    ref = fp4_gemm.reference(a, b)
    y = _mm(a, b) if y is None else y
    assert y.shape == ref.shape and y.dtype == jnp.float32
    deq = lambda q: jnp.nan_to_num(jaxq.dequantize(q))  # noqa: E731
    assert_within(y, ref, abs_product(deq(a), deq(b)), REL)
    return np.asarray(y), np.asarray(ref)


@needs_mosaic_gpu
@pytest.mark.parametrize("fmt,m,n,k", [
    ("mxfp4", 1, 100, 96),  # decode: 16-byte steps, K split over 3 programs; N padded
    ("nvfp4", 5, 72, 128),  # decode: one 64-byte step of eight E4M3 blocks
    ("mxfp4", 70, 130, 256),  # prefill: 2 row tiles x 2 column tiles, 2 steps of 4 blocks
    ("nvfp4", 70, 40, 160),  # prefill: 16-byte steps (5), two blocks each; N padded to 64
])  # fmt: skip
def test_matches_reference(fmt, m, n, k):
    """Random codes (every E2M1 value, both nibbles) and scales over a wide range, ragged
    M and N, decode and prefill shapes, every step width."""
    a, b = _fp4(fmt, (m, k), seed=m), _fp4(fmt, (n, k), seed=n + 1)
    assert fp4_gemm.kernel_for(a, b, interpret=True) == "mosaic_gpu"
    _check(a, b)


@needs_mosaic_gpu
def test_explicit_tiles_and_split_k():
    """``block_n = 64`` on N = 128 (two column tiles) and a K split over two programs, with
    the default tiling's result as well; and jaxq.quantize'd operands with a zero row."""
    a, b = _fp4("nvfp4", (20, 256), seed=3), _fp4("nvfp4", (128, 256), seed=4)
    y, _ = _check(a, b, _mm_tiled(a, b, 64, 2))
    np.testing.assert_allclose(y, _mm(a, b), rtol=1e-6, atol=1e-6 * np.abs(y).max())
    x = jax.random.normal(jax.random.key(0), (9, 64)).at[2].set(0.0).at[4, 7].set(300.0)
    w = jax.random.normal(jax.random.key(1), (24, 64)) * 0.02
    y, _ = _check(jaxq.quantize(x, "mxfp4"), jaxq.quantize(w, "mxfp4"))
    assert (y[2] == 0).all()


@needs_mosaic_gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_edge_values(fmt):
    """Zero blocks and all-maximum codes (±6 in both nibbles, and the two nibbles of a byte
    apart), power-of-two scales: every product and sum is exact, so the kernel equals the
    reference bit for bit. Then extreme scales (E8M0 2^-127, 2^-126, 2^73; E4M3 subnormal
    2^-9 and 448) within tolerance, and a NaN scale in ``a`` (``b``) makes its output row
    (column) NaN, as in the reference."""
    m, n, k = 10, 24, 128
    g = F.get(fmt).block_size
    rng = np.random.default_rng(7)
    pow2 = (126, 127, 128) if fmt == "mxfp4" else (0x30, 0x38, 0x40)  # 1/2, 1, 2
    ca = rng.integers(0, 256, (m, k // 2), dtype=np.uint8)
    ca[0], ca[1], ca[2, :g // 2] = 0x77, 0xFF, 0x00  # +6 +6, -6 -6, a zero block
    ca[3, ::2], ca[3, 1::2] = 0x07, 0x70  # 6 in the low nibble only, then the high only
    cb = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    cb[0], cb[1], cb[2] = 0x77, 0x0F, 0x00  # +6 +6; -6 in the low nibble, 0 in the high
    sa, sb = (rng.choice(pow2, (r, k // g)).astype(np.uint8) for r in (m, n))
    a, b = _fp4(fmt, (m, k), scale_bytes=sa, codes=ca), _fp4(fmt, (n, k), scale_bytes=sb,
                                                             codes=cb)  # fmt: skip
    if fmt == "nvfp4":  # exact tensor scales
        a = dataclasses.replace(a, tensor_scale=jnp.float32(0.5))
        b = dataclasses.replace(b, tensor_scale=jnp.float32(4.0))
    y, ref = _check(a, b)
    np.testing.assert_array_equal(y, ref)
    s_a, s_b = (np.asarray(q.scale).astype(np.float32).repeat(g, 1) for q in (a, b))
    ts = 2.0 if fmt == "nvfp4" else 1.0
    assert y[0, 0] == 36.0 * ts * np.sum(s_a[0] * s_b[0])
    assert y[1, 1] == 36.0 * ts * np.sum(s_a[1, ::2] * s_b[1, ::2])  # even elements only
    assert (y[:, 2] == 0).all() and np.isfinite(y).all()
    # extreme scales in three blocks of a, and a NaN scale in a and in b
    extremes, nan = ((0, 1, 200), 255) if fmt == "mxfp4" else ((0x01, 0x7E, 0x01), 0x7F)
    sa[4, 0], sa[5, 1], sa[6, -1] = extremes
    sa[7, 1], sb[5, 2] = nan, nan
    a, b = _fp4(fmt, (m, k), scale_bytes=sa, codes=ca), _fp4(fmt, (n, k), scale_bytes=sb,
                                                             codes=cb)  # fmt: skip
    y, _ = _check(a, b)
    assert np.isnan(y[7]).all() and np.isnan(y[:, 5]).all()
    assert np.isfinite(np.delete(np.delete(y, 7, 0), 5, 1)).all()


@needs_mosaic_gpu
@pytest.mark.parametrize("fmt,m", [("mxfp4", 1), ("nvfp4", 130)])
def test_lowers_for_h100(fmt, m):
    from jaxq.kernels import fp4_gemm_mosaic as fm

    a, b = _fp4(fmt, (m, 512)), _fp4(fmt, (320, 512), seed=1)
    text = lower_or_skip(lambda a, b: fm.matmul(a, b, False), a, b).as_text()
    assert "mosaic_gpu" in text and "triton" not in text
    assert f"jaxq_fp4_{fmt}_mosaic" in text


def test_dispatch(monkeypatch):
    """mosaic_gpu comes before triton; it is chosen in interpret mode on JAX >= 0.12 and on
    a Hopper GPU, refused for operands no kernel takes (before the JAX version is asked),
    and refused with the reason on an older JAX, off a GPU or on compute capability 10."""
    kernel = R.get("fp4_matmul")
    assert [i.name for i in kernel.implementations] == ["mosaic_gpu", "triton", "xla"]
    impl = kernel.implementation("mosaic_gpu")
    a, b = _fp4("mxfp4", (4, 64)), _fp4("mxfp4", (8, 64), seed=1)
    assert fp4_gemm.kernel_for(a, b) is None  # CPU, compiled: XLA
    odd = _fp4("nvfp4", (4, 48)), _fp4("nvfp4", (8, 48))
    assert "multiple of 32" in fp4_gemm.why_not(impl, *odd, interpret=True)
    assert_mosaic_gpu_version_rule("fp4_matmul", fp4_gemm, (a, b), lambda **kw: kernels.fp4_matmul(
        a, b, implementation="mosaic_gpu", **kw))  # fmt: skip
    # compiled on a (simulated) GPU: Hopper takes the Mosaic GPU kernel on JAX >= 0.12,
    # Ampere the Triton one, compute capability 10 neither
    monkeypatch.setattr(R, "platform", lambda: "gpu")
    for cc, want in ((9.0, "mosaic_gpu" if MOSAIC_GPU_JAX_OK else "triton"), (8.0, "triton"),
                     (10.0, None)):  # fmt: skip
        monkeypatch.setattr(R, "gpu_compute_capability", lambda cc=cc: cc)
        assert fp4_gemm.kernel_for(a, b) == want, cc
    if MOSAIC_GPU_JAX_OK:
        assert "scaled_matmul" in fp4_gemm.why_not(impl, a, b)
