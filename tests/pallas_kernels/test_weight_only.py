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
    impl = kernels.registry.get("weight_only_matmul").implementations[0]
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
