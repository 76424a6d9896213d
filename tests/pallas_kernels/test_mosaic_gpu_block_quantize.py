"""The Mosaic GPU block quantizer: interpret mode against jaxq.quantize, H100 lowering, dispatch.

Mosaic GPU's interpret mode exists from JAX 0.12 on; with an older JAX these tests skip
(saying so) and only the dispatch test runs, checking that the kernel refuses with that
reason. The number of blocks is not a multiple of the kernel's 128 rows, so the wrapper's
padding is tested, and some shapes need two programs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxq.kernels import registry as R

import jaxq
from jaxq import formats as F
from jaxq import kernels

from .common import MOSAIC_GPU_JAX_OK, MOSAIC_GPU_REASON, needs_mosaic_gpu
from .common import code_bits as _bits

fq = kernels.fused_quantize
NEW_JAX, REASON, needs_mosaic = MOSAIC_GPU_JAX_OK, MOSAIC_GPU_REASON, needs_mosaic_gpu

if not NEW_JAX:
    print(REASON)


@functools.partial(jax.jit, static_argnames=("fmt",))
def _bq(x, fmt):
    return kernels.block_quantize(x, fmt, implementation="mosaic_gpu", interpret=True)


def _assert_same(q, r):
    """Codes, scales and tensor scale bit for bit, with the reference's dtypes and shapes."""
    assert q.codes.dtype == r.codes.dtype and q.scale.dtype == r.scale.dtype
    assert q.codes.shape == r.codes.shape and q.scale.shape == r.scale.shape
    assert q.shape == r.shape and q.dtype == r.dtype and q.layout == r.layout
    np.testing.assert_array_equal(_bits(q.codes), _bits(r.codes))
    np.testing.assert_array_equal(_bits(q.scale), _bits(r.scale))
    assert (q.tensor_scale is None) == (r.tensor_scale is None)
    if r.tensor_scale is not None:
        assert np.asarray(q.tensor_scale).tobytes() == np.asarray(r.tensor_scale).tobytes()


def _random(shape, binades, seed):
    """Normals times ``2^(u + v)``, ``u`` uniform in ``[-binades, binades]`` per element and
    ``v`` per 16 columns of a row: the elements within a block and the block amaxes both
    span many binades."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    u = jax.random.uniform(k2, shape, minval=-binades, maxval=binades)
    v = jax.random.uniform(k3, (shape[0], shape[1] // 16), minval=-binades, maxval=binades)
    return jax.random.normal(k1, shape) * jnp.exp2(u + jnp.repeat(v, 16, axis=1))


@needs_mosaic
@pytest.mark.parametrize("fmt,dtype,shape,binades", [
    ("mxfp8", jnp.float32, (37, 96), 12),  # 111 blocks: one program, padded
    ("mxfp8", jnp.bfloat16, (5, 64), 12),
    ("mxfp4", jnp.bfloat16, (45, 160), 12),  # 225 blocks: two programs
    ("nvfp4", jnp.float32, (70, 48), 6),  # 210 blocks of 16
    ("nvfp4", jnp.bfloat16, (9, 32), 6),
])  # fmt: skip
def test_block_quantize_equals_reference(fmt, dtype, shape, binades):
    x = _random(shape, binades, seed=sum(shape)).astype(dtype)
    q, r = _bq(x, fmt), fq.reference_block_quantize(x, fmt)
    _assert_same(q, r)
    scale = np.asarray(r.scale, np.float32)
    assert len(np.unique(scale)) >= min(8, scale.size // 2)  # many different block scales


def _edge_input(fmt, dtype):
    """``(10, 64)``: random values plus 0, -0, subnormals, ±inf, NaN, ±max, an all-zero
    block, a block of subnormals only, a block of non-finite values only and (row 9) the
    E2M1 rounding midpoints under the block amax 6 (MX: scale 1, so exact ties)."""
    bs = F.get(fmt).block_size
    x = _random((10, 64), 4, seed=7)
    tiny = float(jnp.finfo(dtype).smallest_subnormal)
    big = float(jnp.finfo(dtype).max)
    x = x.at[0, :5].set(jnp.array([0.0, -0.0, tiny, -3 * tiny, 1e-40]))
    x = x.at[1, 0].set(jnp.inf).at[2, bs + 1].set(-jnp.inf).at[3, 2].set(jnp.nan)
    x = x.at[4, 3].set(big).at[5, 4].set(-big)
    x = x.at[6, :bs].set(0.0)
    x = x.at[7, :bs].set(tiny * jnp.arange(1, bs + 1))
    x = x.at[8, bs:2 * bs].set(jnp.tile(jnp.array([jnp.nan, jnp.inf, -jnp.inf, jnp.nan]),
                                        bs // 4))  # fmt: skip
    mids = jnp.array([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    x = x.at[9, :32].set(jnp.concatenate([mids, -mids, jnp.zeros(16)]))
    return x.astype(dtype)


@needs_mosaic
@pytest.mark.parametrize("fmt,dtype", [("mxfp8", jnp.float32), ("mxfp4", jnp.bfloat16),
                                       ("nvfp4", jnp.float32)])  # fmt: skip
def test_edge_values_equal_reference(fmt, dtype):
    """Every edge value gives jaxq.quantize's codes and scales: a block with NaN or inf gets
    the NaN scale where the element format cannot encode it (E2M1), MXFP8 keeps the scale
    and encodes NaN; an all-zero block gets the unit E8M0 scale or a zero E4M3 scale."""
    x = _edge_input(fmt, dtype)
    q, r = _bq(x, fmt), fq.reference_block_quantize(x, fmt)
    _assert_same(q, r)
    bs = r.fmt.block_size
    scale = np.asarray(r.scale, np.float32)
    if fmt == "mxfp8":
        codes = np.asarray(r.codes, np.float32)
        assert np.isnan(codes[3, 2]) and np.isnan(codes[1, 0]) and not np.isnan(scale).any()
        assert (codes[6, :bs] == 0).all() and scale[6, 0] == 1.0
    else:
        nan_blocks = {(1, 0), (2, 1), (3, 0), (8, 1)}
        assert {tuple(i) for i in np.argwhere(np.isnan(scale))} == nan_blocks
        assert (_bits(r.codes)[6, :bs // 2] == 0).all()
        assert scale[6, 0] == (1.0 if fmt == "mxfp4" else 0.0)
    if fmt == "mxfp4":  # the midpoints round to even: 0.25 -> 0, 0.75 -> 1, ..., 5 -> 4
        deq = np.asarray(jaxq.dequantize(q, jnp.float32))[9, :8]
        np.testing.assert_array_equal(deq, [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])


@needs_mosaic
@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_for_h100(fmt, dtype):
    """The kernel lowers to a Mosaic GPU custom call for an H100 (nothing is compiled:
    ptxas has not seen it)."""
    from jaxq.kernels import block_quantize_mosaic as bqm

    f = F.get(fmt)
    fn = lambda x: bqm.block_quantize(x, f, jnp.float32(0.5), False)
    text = R.lower_for(fn, jax.ShapeDtypeStruct((256, 512), dtype), target="cuda").as_text()
    assert "mosaic_gpu" in text and "triton" not in text
    assert f"jaxq_{fmt}_quantize_mosaic" in text


def test_dispatch():
    """mosaic_gpu comes before triton; it is chosen in interpret mode on JAX >= 0.12 and
    refused, with the reason, on an older JAX, (compiled) off a Hopper GPU, and for input
    dtypes other than float32, bfloat16 and float16."""
    names = [i.name for i in R.get("block_quantize").implementations]
    assert names.index("mosaic_gpu") < names.index("triton")
    impl = R.get("block_quantize").implementation("mosaic_gpu")
    x = jnp.ones((8, 64))

    def why(fmt, x=x, interpret=True):
        f = F.get(fmt)
        return lambda i: fq.why_not(i, x, interpret=interpret, block=f.block_size, fmt=f)

    assert R.choose("block_quantize", None, why("mxfp8", interpret=False)) == "xla"  # CPU
    if NEW_JAX:
        for fmt in ("mxfp8", "mxfp4", "nvfp4"):
            assert R.choose("block_quantize", "pallas", why(fmt)) == "mosaic_gpu"
            assert R.choose("block_quantize", "mosaic_gpu", why(fmt)) == "mosaic_gpu"
        with pytest.raises(ValueError, match="mosaic_gpu: needs a GPU"):
            kernels.block_quantize(x, "mxfp4", implementation="mosaic_gpu")
        f8 = jax.ShapeDtypeStruct((8, 64), jnp.float8_e4m3fn)
        reason = fq.why_not(impl, f8, interpret=True, block=32, fmt=F.MXFP8)
        assert reason == "input dtype float8_e4m3fn (float32, bfloat16 or float16)"
        assert R.choose("block_quantize", "pallas", why("mxfp8", f8)) == "triton"
        ragged = fq.why_not(impl, jnp.ones((8, 48)), interpret=True, block=32, fmt=F.MXFP4)
        assert "not a multiple of the block" in ragged
        # cast_transpose's own Mosaic GPU kernel is unaffected by the dtype rule
        assert fq.why_not(R.get("cast_transpose").implementation("mosaic_gpu"), f8,
                          interpret=True, fmt=F.E4M3) is None  # fmt: skip
        from jaxq.kernels import block_quantize_mosaic as bqm

        codes, scale = bqm.block_quantize(jnp.ones((0, 64)), F.MXFP4, 1.0, True)
        assert codes.shape == (0, 32) and scale.shape == (0, 2)
    else:
        assert R.choose("block_quantize", "pallas", why("mxfp8")) == "triton"
        with pytest.raises(ValueError, match=r"mosaic_gpu: needs JAX >= 0\.12"):
            R.choose("block_quantize", "mosaic_gpu", why("nvfp4"))
        assert "JAX >= 0.12" in fq.why_not(impl, x, interpret=True, block=32, fmt=F.MXFP8)
