"""Weight-only GEMM: the Triton kernel in interpret mode against the reference."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import kernels

from .common import abs_product, assert_within, lower_or_skip, random_qarray

wo = kernels.weight_only
REL = {np.dtype(jnp.float32): 1e-5, np.dtype(jnp.bfloat16): 2.0**-7,
       np.dtype(jnp.float16): 2.0**-7}


_weight = random_qarray


@functools.partial(jax.jit, static_argnames=("config",))
def _kernel(x, w, config=None):
    return kernels.weight_only_matmul(x, w, implementation="pallas", interpret=True,
                                      config=config)


def _check(x, w, **kw):
    y = _kernel(x, w, **kw)
    ref = wo.reference(x, w)
    assert y.shape == ref.shape and y.dtype == jnp.float32
    assert_within(y, ref, abs_product(x, jaxq.dequantize(w)), REL[x.dtype])


# M, N, K are not multiples of the tiles (16/64 rows and columns); K spans several groups.
CASES = [
    ("int4", 32, jnp.bfloat16, 5),
    ("nf4", 64, jnp.float16, 3),
    ("e2m1", 128, jnp.float32, 1),
    ("int8", None, jnp.bfloat16, 7),
]


@pytest.mark.parametrize("fmt,group,dtype,m", CASES)
def test_decode_shapes_match_reference(fmt, group, dtype, m):
    k = 96 if group is None else 3 * group
    w = _weight(fmt, group, (100, k))
    x = jax.random.normal(jax.random.key(1), (m, k)).astype(dtype)
    _check(x, w)


@pytest.mark.sweep
@pytest.mark.parametrize("fmt", ["int4", "nf4", "e2m1", "int8"])
@pytest.mark.parametrize("group", [32, 64, 128, 256, None])  # None: one scale per row
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_every_format_group_and_dtype(fmt, group, dtype):
    k = 160 if group is None else 2 * group
    w = _weight(fmt, group, (72, k), seed=3)
    x = jax.random.normal(jax.random.key(4), (9, k)).astype(dtype)
    _check(x, w)


def test_prefill_batched_with_split_k():
    """M >= 256 (prefill tiles), a batch axis, and an explicit uneven split-K."""
    w = _weight("int4", 64, (2, 40, 192))
    x = jax.random.normal(jax.random.key(2), (2, 260, 192)).astype(jnp.bfloat16)
    _check(x, w, config=wo.Config(split_k=2))


def test_edge_values():
    """Zero rows and groups, the largest codes, NaN activations and a NaN weight group."""
    w = _weight("int4", 32, (24, 128))
    codes = w.codes.at[0].set(0).at[1, :16].set(0).at[2, 32:48].set(0x77).at[4].set(0x88)
    w = dataclasses.replace(w, codes=codes, scale=w.scale.at[3, 1].set(jnp.nan))
    x = jax.random.normal(jax.random.key(1), (4, 128)).at[2, 7].set(jnp.nan)
    y, ref = _kernel(x, w), wo.reference(x, w)
    assert np.isnan(np.asarray(ref)[:, 3]).all() and np.isnan(np.asarray(ref)[2]).all()
    assert_within(y, ref, abs_product(jnp.nan_to_num(x), jnp.nan_to_num(jaxq.dequantize(w))),
                  REL[np.dtype(jnp.float32)])
    assert (np.asarray(y)[[0, 1, 3], 0] == 0.0).all()


def test_dispatch_on_cpu_is_the_reference_bit_for_bit(monkeypatch):
    w = _weight("nf4", 64, (30, 128))
    x = jax.random.normal(jax.random.key(1), (3, 128))
    assert wo.kernel_for(x, w) is None
    np.testing.assert_array_equal(kernels.weight_only_matmul(x, w), wo.reference(x, w))
    with pytest.raises(ValueError, match="needs a GPU"):
        kernels.weight_only_matmul(x, w, implementation="pallas")
    with pytest.raises(ValueError, match="unknown implementation"):
        kernels.weight_only_matmul(x, w, implementation="cuda")
    # interpret=True makes the kernel available anywhere; JAXQ_KERNELS=xla still forces XLA
    assert kernels.registry.choose("weight_only_matmul", None,
                                   lambda i: wo.why_not(i, x, w, interpret=True)) == "triton"
    monkeypatch.setenv("JAXQ_KERNELS", "xla")
    assert kernels.registry.choose("weight_only_matmul", None,
                                   lambda i: wo.why_not(i, x, w, interpret=True)) == "xla"


def test_unsupported_weights_fall_back_and_bad_input_raises():
    x = jnp.ones((2, 64))
    impl = kernels.registry.get("weight_only_matmul").implementation("triton")
    per_tensor = _weight("int4", "tensor", (8, 64))
    for w, why in ((per_tensor, "per-tensor"), (_weight("e4m3", 32, (8, 64)), "format"),
                   (_weight("int4", 16, (8, 64)), "groups of 32")):
        assert why in wo.why_not(impl, x, w, interpret=True)
    np.testing.assert_array_equal(kernels.weight_only_matmul(x, per_tensor, interpret=True),
                                  wo.reference(x, per_tensor))  # falls back to XLA
    w = _weight("int4", 32, (8, 64))
    with pytest.raises(TypeError, match="QArray"):
        kernels.weight_only_matmul(x, jnp.ones((8, 64)))
    with pytest.raises(TypeError, match="floating-point"):
        kernels.weight_only_matmul(jnp.ones((2, 64), jnp.int32), w)
    with pytest.raises(ValueError, match=r"\(2, 32\)"):
        kernels.weight_only_matmul(jnp.ones((2, 32)), w)


@pytest.mark.parametrize("fmt,group", [("int4", 128), ("nf4", 32), ("e2m1", 64), ("int8", None)])
def test_lowers_for_h100(fmt, group):
    w = _weight(fmt, group, (256, 512))
    x = jax.ShapeDtypeStruct((8, 512), jnp.bfloat16)
    low = lower_or_skip(lambda x, w: wo._triton(x, w, wo.Config(), False), x, w)
    assert "triton" in low.as_text()


def _block_fp4(fmt, shape, seed=0, scale_bytes=None, max_exp=20):
    """A random MXFP4 / NVFP4 QArray: every code, and random scale bytes (E8M0 exponents
    2^-20..2^max_exp; positive E4M3 values, subnormals included), or the given bytes."""
    from jaxq import formats as F
    from jaxq.quantization.qarray import Layout, QArray

    fmt = F.get(fmt)
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, shape[:-1] + (shape[-1] // 2,), dtype=np.uint8)
    sshape = shape[:-1] + (shape[-1] // fmt.block_size,)
    if scale_bytes is None:
        lo, hi = (107, 128 + max_exp) if fmt == F.MXFP4 else (1, 0x7F)
        scale_bytes = rng.integers(lo, hi, sshape, dtype=np.uint8)
    scale = jax.lax.bitcast_convert_type(jnp.asarray(scale_bytes, jnp.uint8),
                                         fmt.scale_format.dtype)  # fmt: skip
    ts = jnp.float32(rng.uniform(0.5, 2.0)) if fmt.tensor_scale else None
    return QArray(jnp.asarray(codes), scale, None, ts, fmt, shape, np.dtype(np.float32),
                  Layout("block", (len(shape) - 1,), fmt.block_size)).validate()


@pytest.mark.parametrize("fmt,dtype,m,k", [
    ("mxfp4", jnp.bfloat16, 1, 96), ("nvfp4", jnp.bfloat16, 7, 96),
    ("mxfp4", jnp.float16, 16, 160), ("nvfp4", jnp.float32, 3, 224),
    ("mxfp4", jnp.float32, 260, 64), ("nvfp4", jnp.float16, 257, 128),
])  # fmt: skip
def test_mx_and_nvfp4_weights_match_reference(fmt, dtype, m, k):
    """Scales decoded in the kernel (E8M0 over 2^+-20, E4M3 with subnormals); decode and
    prefill shapes, N = 100 not a multiple of the tile, K an odd number of blocks for MXFP4.
    The weight is cast to the activation dtype in the kernel, so float16 activations need
    |w| <= 65504: their E8M0 scales stop at 2^9."""
    w = _block_fp4(fmt, (100, k), seed=m, max_exp=9 if dtype == jnp.float16 else 20)
    x = jax.random.normal(jax.random.key(m), (m, k)).astype(dtype)
    _check(x, w)


def test_block_scale_bytes_decode_bit_exactly():
    """Every E8M0 and E4M3 byte, decoded as the kernel does, equals the dtype's own cast."""
    from jaxq import formats as F

    bits = jnp.arange(256, dtype=jnp.uint8)
    for name, fmt in (("mxfp4", F.E8M0), ("nvfp4", F.E4M3)):
        want = np.asarray(jax.lax.bitcast_convert_type(bits, fmt.dtype)).astype(np.float32)
        got = np.asarray(jax.jit(wo.decode_scales, static_argnums=1)(bits, name))
        np.testing.assert_array_equal(got.view(np.uint32)[~np.isnan(want)],
                                      want.view(np.uint32)[~np.isnan(want)])  # fmt: skip
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))


def test_block_fp4_edge_scales_and_refusals():
    """The smallest and largest E8M0 scales, a NaN scale byte, a zero NVFP4 block; NVFP4
    needs K to be a multiple of 32 (one step covers two blocks)."""
    sb = np.full((24, 4), 127, np.uint8)
    sb[0, 0], sb[1, 1], sb[2, 2], sb[3, 3] = 0, 230, 255, 1  # 2^-127, 2^103, NaN, 2^-126
    w = _block_fp4("mxfp4", (24, 128), scale_bytes=sb)
    x = jax.random.normal(jax.random.key(3), (5, 128))
    y, ref = _kernel(x, w), wo.reference(x, w)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    assert np.isnan(np.asarray(y)[:, 2]).all() and np.isfinite(np.asarray(y)[:, [0, 1, 3]]).all()
    assert_within(y, ref, abs_product(x, jnp.nan_to_num(jaxq.dequantize(w))), 1e-5)
    sb = np.full((24, 8), 0x38, np.uint8)
    sb[5, 2] = 0  # a zero block scale
    w = _block_fp4("nvfp4", (24, 128), scale_bytes=sb)
    _check(x, w)
    impl = kernels.registry.get("weight_only_matmul").implementation("triton")
    odd = _block_fp4("nvfp4", (8, 48))
    assert "multiple of 32" in wo.why_not(impl, jnp.ones((2, 48)), odd, interpret=True)
    tpu = kernels.registry.get("weight_only_matmul").implementation("mosaic_tpu")
    assert "Triton kernel only" in wo.why_not(tpu, x, w, interpret=True)
    np.testing.assert_array_equal(kernels.weight_only_matmul(jnp.ones((2, 48)), odd,
                                                             interpret=True),
                                  wo.reference(jnp.ones((2, 48)), odd))  # fmt: skip


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_block_fp4_lowers_for_h100(fmt):
    w = _block_fp4(fmt, (256, 512))
    x = jax.ShapeDtypeStruct((8, 512), jnp.bfloat16)
    low = lower_or_skip(lambda x, w: wo._triton(x, w, wo.Config(), False), x, w)
    assert "triton" in low.as_text()


@functools.partial(jax.jit, static_argnames=())
def _tpu(x, w):
    return kernels.weight_only_matmul(x, w, implementation="mosaic_tpu", interpret=True)


def test_mosaic_tpu_kernel_matches_reference():
    """Ragged N (300 = 256 + 44), two K steps of eight groups, bfloat16 activations."""
    w = _weight("int4", 32, (300, 512), seed=5)
    x = jax.random.normal(jax.random.key(6), (5, 512)).astype(jnp.bfloat16)
    assert_within(_tpu(x, w), wo.reference(x, w), abs_product(x, jaxq.dequantize(w)),
                  REL[np.dtype(jnp.bfloat16)])


@pytest.mark.sweep
@pytest.mark.parametrize("fmt,group,dtype,shape,m", [
    ("nf4", 128, jnp.float32, (100, 384), 20),  # K/2 = 192: one full-extent K step
    ("int8", None, jnp.bfloat16, (130, 256), 3),
    ("e2m1", 64, jnp.float16, (2, 40, 1024), 7),  # batched
])
def test_mosaic_tpu_kernel_formats(fmt, group, dtype, shape, m):
    w = _weight(fmt, group, shape, seed=7)
    x = jax.random.normal(jax.random.key(8), shape[:-2] + (m, shape[-1])).astype(dtype)
    assert_within(_tpu(x, w), wo.reference(x, w), abs_product(x, jaxq.dequantize(w)),
                  REL[np.dtype(dtype)])


@pytest.mark.parametrize("fmt,group", [("int4", 32), ("nf4", 128), ("int8", None)])
def test_mosaic_tpu_kernel_lowers_for_tpu(fmt, group):
    w = _weight(fmt, group, (256, 1024))
    x = jax.ShapeDtypeStruct((16, 1024), jnp.bfloat16)
    low = lower_or_skip(lambda x, w: kernels.weight_only_tpu.matmul(x, w, fmt, False), x, w,
                        target="tpu")
    assert "tpu_custom_call" in low.as_text()
