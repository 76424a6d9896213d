"""Property tests of quantize/dequantize invariants (hypothesis)."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxq
from jaxq import formats as F
from jaxq.quantization import packing

# Values vary freely; shapes are fixed so that each case compiles once.
SETTINGS = settings(max_examples=20, deadline=None)

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
arrays = hnp.arrays(np.float32, (4, 64), elements=finite)
UNIFORM = [F.INT8, F.INT4, F.INT2]  # grids with a constant step: |error| <= step / 2


@SETTINGS
@given(x=arrays, fmt=st.sampled_from(UNIFORM), gran=st.sampled_from(["tensor", "channel", "block"]))
def test_error_within_half_a_step(x, fmt, gran):
    kw = {"tensor": {}, "channel": {"axis": 0}, "block": {"block_size": 32}}[gran]
    q = jaxq.quantize(jnp.asarray(x), fmt, **kw)
    err = np.abs(np.asarray(jaxq.dequantize(q)) - x)
    g = q.layout.grouped_shape(q.shape)
    step = np.broadcast_to(np.asarray(q.scale).reshape(q.layout.group_scale_shape(q.shape)), g)
    assert np.all(err <= step.reshape(x.shape) / 2 * (1 + 1e-5) + 1e-30)


@SETTINGS
@given(x=arrays, fmt=st.sampled_from([F.E4M3, F.E5M2, F.E2M1, F.E3M2]))
def test_float_error_within_half_a_local_step(x, fmt):
    q = jaxq.quantize(jnp.asarray(x), fmt, block_size=32)
    d = np.asarray(jaxq.dequantize(q)).astype(np.float64)
    s = np.repeat(np.asarray(q.scale, np.float64), 32, axis=-1)
    y = np.abs(x / s)
    # local step of the element grid around y: 2^(max(floor(log2 y), emin) - m)
    with np.errstate(divide="ignore"):
        e = np.maximum(np.floor(np.log2(np.where(y > 0, y, 1.0))), fmt.emin)
    step = np.exp2(e - fmt.mantissa_bits) * s
    assert np.all(np.abs(d - x) <= step / 2 * (1 + 1e-5) + 1e-30)


@SETTINGS
@given(x=arrays, name=st.sampled_from(["e4m3", "int4", "nf4", "mxfp4", "mxfp6_e3m2", "int2"]))
def test_idempotent(x, name):
    kw = {} if name.startswith("mx") else {"block_size": 32}
    q = jaxq.quantize(jnp.asarray(x), name, **kw)
    q2 = jaxq.quantize(jaxq.dequantize(q), name, **kw)
    np.testing.assert_array_equal(np.asarray(q2.codes).view(np.uint8),
                                  np.asarray(q.codes).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(jaxq.dequantize(q2)), np.asarray(jaxq.dequantize(q)))


@SETTINGS
@given(bits=st.sampled_from([2, 4, 6]), n=st.sampled_from([1, 7, 13]), seed=st.integers(0, 2**16))
def test_pack_roundtrip(bits, n, seed):
    c = np.random.default_rng(seed).integers(0, 2**bits, (3, n)).astype(np.uint8)
    np.testing.assert_array_equal(packing.unpack(packing.pack(jnp.asarray(c), bits=bits),
                                                 bits=bits, n=n), c)


@settings(max_examples=5, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), data=st.data())
def test_channel_and_block_shapes(shape, data):
    shape = tuple(shape)
    axis = data.draw(st.integers(0, len(shape) - 1))
    x = jnp.ones(shape)
    q = jaxq.quantize(x, "int8", axis=axis)
    assert q.scale.shape == tuple(d if i == axis else 1 for i, d in enumerate(shape))
    shape_b = shape[:axis] + (shape[axis] * 4,) + shape[axis + 1 :]
    q = jaxq.quantize(jnp.ones(shape_b), "int4", axis=axis, block_size=4)
    assert q.scale.shape == shape
    assert q.codes.shape[-1] == packing.packed_length(shape_b[-1], 4)
    np.testing.assert_array_equal(jaxq.dequantize(q), 1.0)
