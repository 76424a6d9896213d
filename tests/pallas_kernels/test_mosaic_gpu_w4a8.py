"""The W4A8 GEMM's Pallas Mosaic GPU kernel: interpret mode against the reference, H100
lowering, dispatch.

Mosaic GPU's interpret mode exists from JAX 0.12 on; with an older JAX these tests skip
(saying so) and only the dispatch test runs, checking that the kernel refuses with that
reason. ``M`` and ``N`` are ragged (not multiples of the 64-row and 64/128-column tiles), so
the wrapper's padding is tested; the decode shapes (``M <= 16``) split ``K``.
"""

import dataclasses
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
    assert_mosaic_gpu_version_rule,
    assert_within,
    lower_or_skip,
    needs_mosaic_gpu,
    random_qarray,
)

w4a8 = kernels.w4a8
NEW_JAX, REASON, needs_mosaic = MOSAIC_GPU_JAX_OK, MOSAIC_GPU_REASON, needs_mosaic_gpu
REL = 1e-5  # the module's tolerance (float32 output)

if not NEW_JAX:
    print(REASON)


@jax.jit
def _mm(x, w):
    return kernels.w4a8_matmul(x, w, implementation="mosaic_gpu", interpret=True)


@functools.partial(jax.jit, static_argnames=("block_n", "split_k"))
def _mm_tiled(x, w, block_n, split_k):
    from jaxq.kernels import w4a8_mosaic as wm

    return wm.matmul(x, w, True, block_n=block_n, split_k=split_k)


def _bound(x, w):
    return abs_product(jnp.nan_to_num(jaxq.dequantize(x)), jaxq.dequantize(w))


def _check(x, w, y=None):
    ref = w4a8.reference(x, w)
    y = _mm(x, w) if y is None else y
    assert y.shape == ref.shape and y.dtype == jnp.float32
    assert_within(y, ref, _bound(x, w), REL)
    return y, ref


def _replace_codes(q, codes):
    return dataclasses.replace(q, codes=jnp.asarray(codes, q.codes.dtype))


@needs_mosaic
@pytest.mark.parametrize("x_scale,group,m,n,k", [
    ("tensor", 128, 5, 100, 256),  # decode: split-K over the two groups; N padded to 128
    ("tensor", 64, 130, 70, 256),  # prefill: 3 row tiles, 32-byte steps, 4 groups
    (None, 256, 1, 200, 512),  # per-row activation scales, 128-byte steps, 2 column tiles
    ("tensor", None, 16, 72, 192),  # per-row weight scales on the tile, 32-byte steps
    (None, None, 130, 64, 256),  # per-row scales on both sides, one 128-byte step
])  # fmt: skip
def test_matches_reference(x_scale, group, m, n, k):
    """Fresh random codes (every INT4 value, normal E4M3 values) and scales, ragged M and
    N, grouped and per-row scales."""
    seed = m * 1000 + n + k
    x = random_qarray("e4m3", x_scale, (m, k), seed=seed)
    w = random_qarray("int4", group, (n, k), seed=seed + 1)
    assert w4a8.kernel_for(x, w, interpret=True) == "mosaic_gpu"
    _check(x, w)


@needs_mosaic
def test_explicit_tiles_and_split_k():
    """``block_n = 64`` on N = 128 (two column tiles) and a K split over two programs, each
    with its own running sum over two groups; and the split rule."""
    from jaxq.kernels import w4a8_mosaic as wm

    x = random_qarray("e4m3", "tensor", (70, 512), seed=41)
    w = random_qarray("int4", 128, (128, 512), seed=42)
    _check(x, w, _mm_tiled(x, w, 64, 2))
    assert wm._split(32, 2, 1, None) == 32  # decode: two tiles, 32 steps, one each
    assert wm._split(12, 100, 5, None) == 2  # 264 // 100 = 2 programs per tile
    assert wm._split(3, 1, 16, 2) == 1  # 2 does not divide 3 steps
    assert wm._split(32, 1, 130, None) == 1  # prefill: no split


@needs_mosaic
@pytest.mark.parametrize("group", [64, None])
def test_special_values_exact(group):
    """INT4 codes -8, 7 and 0 (whole rows, and the two nibbles of a byte apart), E4M3
    activations 0, ±448 and small integers, power-of-two scales: every product and sum is
    exact, so the kernel equals the reference bit for bit; a NaN activation makes its row
    NaN (the reference's NaN · 0 as well)."""
    m, n, k = 20, 72, 256
    rng = np.random.default_rng(51)
    xv = rng.integers(-4, 5, (m, k)).astype(np.float32)
    xv[1] = 0.0
    xv[2] = 448.0
    xv[3, ::2], xv[3, 1::2] = -448.0, 448.0
    xv[4, 7] = np.nan
    x = random_qarray("e4m3", "tensor", (m, k), seed=52)
    x = dataclasses.replace(_replace_codes(x, jnp.asarray(xv, jnp.float8_e4m3fn)),
                            scale=jnp.asarray(0.25, jnp.float32))  # fmt: skip
    w = random_qarray("int4", group, (n, k), seed=53)
    codes = np.asarray(w.codes).copy()
    codes[0], codes[1], codes[2] = 0x88, 0x77, 0x00  # -8, 7, 0 in both nibbles
    codes[3], codes[4] = 0x78, 0x87  # low 8 / high 7 and low 7 / high -8
    w = _replace_codes(w, codes)
    w = dataclasses.replace(w, scale=jnp.asarray(
        2.0 ** rng.integers(-6, 3, w.scale.shape), jnp.float32))  # fmt: skip
    y, ref = np.asarray(_mm(x, w)), np.asarray(w4a8.reference(x, w))
    assert np.isnan(y[4]).all() and not np.isnan(np.delete(y, 4, axis=0)).any()
    np.testing.assert_array_equal(y, ref)
    assert (y[1] == 0).all() and (np.delete(y, 4, axis=0)[:, 2] == 0).all()
    s = np.repeat(np.asarray(w.scale), k // w.scale.shape[1], axis=1)  # (N, K)
    np.testing.assert_array_equal(y[2, 0], 0.25 * 448.0 * -8 * s[0].sum())
    np.testing.assert_array_equal(y[2, 1], 0.25 * 448.0 * 7 * s[1].sum())
    # row 3: -448 on the low nibbles' columns, 448 on the high ones'
    np.testing.assert_array_equal(y[3, 3], 0.25 * 448.0 * (-8 * -1 + 7) * s[3, ::2].sum())
    np.testing.assert_array_equal(y[3, 4], 0.25 * 448.0 * (7 * -1 - 8) * s[4, ::2].sum())


@needs_mosaic
def test_ops_dispatch_routes_w4a8_here(monkeypatch):
    """``JAXQ_KERNELS=interpret``: the W4A8 recipe's forward product runs this kernel."""
    from jaxq import recipes

    recipe = recipes.Int4(block_size=128, learned_step=False, activations="e4m3")
    x = jax.random.normal(jax.random.key(61), (2, 9, 256))
    w = jax.random.normal(jax.random.key(62), (256, 72)) * 0.05

    def f(x, w):
        return jaxq.ops.dot_general(x, w, (((2,), (0,)), ((), ())), recipe=recipe)

    y_xla = np.asarray(jax.jit(f)(x, w))
    assert "pallas_call" not in str(jax.make_jaxpr(f)(x, w))  # CPU: XLA
    jax.clear_caches()  # the choice is made when traced: forget the XLA traces
    monkeypatch.setenv("JAXQ_KERNELS", "interpret")
    assert "jaxq_w4a8_mosaic" in str(jax.make_jaxpr(f)(x, w))
    y = np.asarray(jax.jit(f)(x, w))
    np.testing.assert_allclose(y, y_xla, rtol=0, atol=1e-4 * np.abs(y_xla).max())


@needs_mosaic
@pytest.mark.parametrize("x_scale,group,m", [
    ("tensor", 128, 1), ("tensor", 64, 16), (None, 256, 130), ("tensor", None, 8),
    (None, None, 256),
])  # fmt: skip
def test_lowers_for_h100(x_scale, group, m):
    from jaxq.kernels import w4a8_mosaic as wm

    x = random_qarray("e4m3", x_scale, (m, 1024))
    w = random_qarray("int4", group, (512, 1024))
    text = lower_or_skip(lambda x, w: wm.matmul(x, w, False), x, w).as_text()
    assert "mosaic_gpu" in text and "triton" not in text
    assert "jaxq_w4a8_mosaic" in text


def test_dispatch():
    """mosaic_gpu comes before triton; it is chosen in interpret mode on JAX >= 0.12,
    refused for layouts no kernel takes (with the Triton kernel's reason), and refused with
    the reason on an older JAX or (compiled) off a Hopper GPU."""
    kernel = R.get("w4a8_matmul")
    names = [i.name for i in kernel.implementations]
    assert names == ["mosaic_gpu", "triton", "xla"]
    impl = kernel.implementation("mosaic_gpu")
    x = random_qarray("e4m3", "tensor", (2, 128))
    w = random_qarray("int4", 128, (8, 128))
    assert w4a8.kernel_for(x, w) is None  # CPU, compiled: XLA
    # operands no Pallas implementation takes are refused before the JAX version is asked
    g32 = random_qarray("int4", 32, (8, 128))
    assert "groups of 64" in w4a8.why_not(impl, x, g32, interpret=True)
    rows64 = random_qarray("int4", None, (8, 96))  # K = 96: not a multiple of 64
    assert "multiple of 64" in w4a8.why_not(impl, random_qarray("e4m3", "tensor", (2, 96)),
                                            rows64, interpret=True)  # fmt: skip
    xb = random_qarray("e4m3", 128, (2, 128))  # 1x128 activation blocks
    assert "activation layout" in w4a8.why_not(impl, xb, w, interpret=True)
    assert_mosaic_gpu_version_rule("w4a8_matmul", w4a8, (x, w), lambda **kw: kernels.w4a8_matmul(
        x, w, implementation="mosaic_gpu", **kw))  # fmt: skip
