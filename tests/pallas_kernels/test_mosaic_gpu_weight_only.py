"""The weight-only GEMM's Pallas Mosaic GPU kernel: interpret mode against the reference,
H100 lowering, dispatch.

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
    assert_within,
    lower_or_skip,
    needs_mosaic_gpu,
    random_qarray,
)

wo = kernels.weight_only
NEW_JAX, REASON, needs_mosaic = MOSAIC_GPU_JAX_OK, MOSAIC_GPU_REASON, needs_mosaic_gpu
REL = 2.0**-7  # the module's tolerance for bfloat16/float16 activations

if not NEW_JAX:
    print(REASON)


@functools.partial(jax.jit, static_argnames=("config",))
def _mm(x, w, config=None):
    return kernels.weight_only_matmul(x, w, implementation="mosaic_gpu", interpret=True,
                                      config=config)  # fmt: skip


def _check(x, w, **kw):
    y, ref = _mm(x, w, **kw), wo.reference(x, w)
    assert y.shape == ref.shape and y.dtype == jnp.float32
    assert_within(y, ref, abs_product(x, jaxq.dequantize(w)), REL)
    return y, ref


@needs_mosaic
@pytest.mark.parametrize("fmt,group,dtype,m,n,k", [
    ("int4", 32, jnp.bfloat16, 5, 100, 128),  # 4 groups per step; decode, split-K
    ("int4", 64, jnp.float16, 130, 70, 256),  # prefill: 3 row tiles, 2 groups per step
    ("int4", 128, jnp.bfloat16, 1, 200, 256),  # one group per step; 2 column tiles
    ("int4", 256, jnp.float16, 16, 64, 512),  # a group spans two steps
    ("int4", None, jnp.bfloat16, 16, 72, 192),  # per-row scales applied to the tile
    ("int8", None, jnp.bfloat16, 3, 40, 48),  # one byte per code, 16-column steps
    ("int8", 32, jnp.float16, 7, 100, 128),
    ("nf4", 64, jnp.bfloat16, 2, 65, 128),
    ("e2m1", 32, jnp.float16, 9, 64, 160),  # K: five groups, 32-column steps
])  # fmt: skip
def test_matches_reference(fmt, group, dtype, m, n, k):
    """Fresh random codes (every value) and scales, ragged M and N, decode and prefill."""
    seed = m * 1000 + n + k
    w = random_qarray(fmt, group, (n, k), seed=seed)
    x = jax.random.normal(jax.random.key(seed), (m, k)).astype(dtype)
    assert wo.kernel_for(x, w, interpret=True) == "mosaic_gpu"
    _check(x, w)


@needs_mosaic
def test_extreme_codes_and_exact_products():
    """The most negative INT4 code (-8), the largest (7), zero rows and groups, a zero
    scale; with per-row power-of-two scales and small integer activations every product
    and sum is exact, so the kernel equals the reference bit for bit."""
    w = random_qarray("int4", 32, (70, 128), seed=11)
    codes = (w.codes.at[0].set(0).at[1, :16].set(0).at[2].set(0x88).at[3].set(0x77)
             .at[4].set(0x78).at[5, 16:32].set(0x87))  # fmt: skip
    w = dataclasses.replace(w, codes=codes, scale=w.scale.at[6, 2].set(0.0))
    x = jax.random.normal(jax.random.key(12), (5, 128)).astype(jnp.bfloat16)
    y, ref = _check(x, w)
    assert (np.asarray(y)[:, 0] == 0).all()
    s = np.asarray(w.scale)
    xs = np.asarray(x, np.float32)
    np.testing.assert_allclose(np.asarray(y)[:, 2], -8 * xs @ np.repeat(s[2], 32), rtol=1e-2)
    np.testing.assert_allclose(np.asarray(y)[:, 3], 7 * xs @ np.repeat(s[3], 32), rtol=1e-2)

    rng = np.random.default_rng(13)
    exact = random_qarray("int4", None, (80, 256), seed=13)
    exact = dataclasses.replace(
        exact, codes=exact.codes.at[0].set(0x88).at[1].set(0x77),
        scale=jnp.asarray(2.0 ** rng.integers(-6, 3, exact.scale.shape), jnp.float32))
    for dtype in (jnp.bfloat16, jnp.float16):
        xi = jnp.asarray(rng.integers(-4, 5, (16, 256)), dtype)
        np.testing.assert_array_equal(_mm(xi, exact), wo.reference(xi, exact))


@needs_mosaic
def test_batched_with_split_k():
    """A batch axis (a grid axis of the kernel) and an explicit split-K of two programs."""
    w = random_qarray("int4", 64, (2, 40, 256), seed=21)
    x = jax.random.normal(jax.random.key(22), (2, 70, 256)).astype(jnp.bfloat16)
    _check(x, w, config=wo.Config(split_k=2, block_n=64))


@needs_mosaic
def test_split_k_divides_the_steps():
    from jaxq.kernels import weight_only_mosaic as wm

    assert wm._split(32, 2, 1, None) == 32  # decode: two tiles, 32 steps, one each
    assert wm._split(12, 100, 5, None) == 2  # 264 // 100 = 2 programs per tile
    assert wm._split(3, 1, 16, 2) == 1  # 2 does not divide 3 steps
    assert wm._split(32, 1, 130, None) == 1  # prefill: no split


@needs_mosaic
def test_ops_dispatch_routes_bfloat16_activations_here(monkeypatch):
    """``JAXQ_KERNELS=interpret``: a W4A16 product of bfloat16 activations runs this kernel
    (float32 activations stay with the Triton kernel, see test_ops_dispatch)."""
    from jaxq.ops import Quantizer, Recipe

    recipe = Recipe("w4a16", None, Quantizer("int4", "block", 64), None)
    x = jax.random.normal(jax.random.key(31), (3, 40, 256)).astype(jnp.bfloat16)
    w = (jax.random.normal(jax.random.key(32), (256, 200)) * 0.05).astype(jnp.bfloat16)

    def f(x, w):
        return jaxq.ops.dot_general(x, w, (((2,), (0,)), ((), ())), recipe=recipe)

    y_xla = np.asarray(jax.jit(f)(x, w), np.float32)
    assert "pallas_call" not in str(jax.make_jaxpr(f)(x, w))  # CPU: XLA
    jax.clear_caches()  # the choice is made when traced: forget the XLA traces
    monkeypatch.setenv("JAXQ_KERNELS", "interpret")
    assert "jaxq_weight_only_int4_mosaic" in str(jax.make_jaxpr(f)(x, w))
    y = np.asarray(jax.jit(f)(x, w), np.float32)
    # the kernel's tolerance, 2^-7 of sum |x w| ~ 10 |y|, and the bfloat16 output's rounding
    np.testing.assert_allclose(y, y_xla, rtol=0, atol=2.0**-6 * np.abs(y_xla).max())


def _lowered_text(fn, *args):
    text = lower_or_skip(fn, *args).as_text()
    assert "mosaic_gpu" in text and "triton" not in text
    return text


@needs_mosaic
@pytest.mark.parametrize("fmt,group,m", [
    ("int4", 32, 1), ("int4", 128, 256), ("int4", None, 8), ("nf4", 64, 16),
    ("e2m1", 256, 1), ("int8", None, 64), ("int8", 128, 3),
])  # fmt: skip
def test_lowers_for_h100(fmt, group, m):
    from jaxq.kernels import weight_only_mosaic as wm

    w = random_qarray(fmt, group, (512, 1024))
    x = jax.ShapeDtypeStruct((m, 1024), jnp.bfloat16)
    text = _lowered_text(lambda x, w: wm.matmul(x, w, fmt, False), x, w)
    assert f"jaxq_weight_only_{fmt}_mosaic" in text


def test_dispatch():
    """mosaic_gpu comes before triton; it is chosen in interpret mode on JAX >= 0.12 for
    bfloat16/float16 activations and INT4/NF4/E2M1/INT8 weights, refused (Triton takes
    over) for float32 activations and MXFP4/NVFP4, and refused with the reason on an older
    JAX or (compiled) off a Hopper GPU."""
    names = [i.name for i in R.get("weight_only_matmul").implementations]
    assert names.index("mosaic_gpu") < names.index("triton")
    impl = R.get("weight_only_matmul").implementation("mosaic_gpu")
    w = random_qarray("int4", 32, (16, 64))
    x = jnp.ones((2, 64), jnp.bfloat16)
    why = lambda i: wo.why_not(i, x, w, interpret=True)
    assert R.choose("weight_only_matmul", None, lambda i: "no device") == "xla"
    assert wo.kernel_for(x, w) is None  # CPU, compiled: XLA
    # arguments no Pallas implementation takes are refused before the JAX version is asked
    per_tensor = random_qarray("int4", "tensor", (16, 64))
    assert "per-tensor" in wo.why_not(impl, x, per_tensor, interpret=True)
    if NEW_JAX:
        assert R.choose("weight_only_matmul", "pallas", why) == "mosaic_gpu"
        assert wo.kernel_for(x, w, interpret=True) == "mosaic_gpu"
        x32 = jnp.ones((2, 64), jnp.float32)
        assert "float32" in wo.why_not(impl, x32, w, interpret=True)
        assert wo.kernel_for(x32, w, interpret=True) == "triton"
        mx = jaxq.quantize(jnp.ones((16, 64)), "mxfp4")
        assert "Triton kernel only" in wo.why_not(impl, x, mx, interpret=True)
        assert wo.kernel_for(x, mx, interpret=True) == "triton"
        with pytest.raises(ValueError, match="mosaic_gpu: needs a GPU"):
            kernels.weight_only_matmul(x, w, implementation="mosaic_gpu")
    else:
        assert R.choose("weight_only_matmul", "pallas", why) == "triton"
        assert "JAX >= 0.12" in wo.why_not(impl, x, w, interpret=True)
        with pytest.raises(ValueError, match=r"mosaic_gpu: needs JAX >= 0\.12"):
            kernels.weight_only_matmul(x, w, implementation="mosaic_gpu", interpret=True)
