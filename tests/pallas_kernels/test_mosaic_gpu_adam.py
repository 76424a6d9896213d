"""The fused E4M3 Adam update's Mosaic GPU kernel: interpret mode against the reference,
H100 lowering, dispatch.

Mosaic GPU's interpret mode exists from JAX 0.12 on; with an older JAX these tests skip
(saying so) and only the dispatch test runs, checking that the kernel refuses with that
reason. Block counts below, at and above multiples of the kernel's 128 blocks test the
padding of a short state and the overlapping last program of a long one.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxq.kernels import fused_adam as fa
from jaxq.kernels import fused_adam_mosaic as fam
from jaxq.kernels import registry as R

from jaxq import optim
from jaxq.optim import maps

from .common import (
    MOSAIC_GPU_JAX_OK,
    MOSAIC_GPU_REASON,
    assert_same_state,
    assert_same_steps,
    needs_mosaic_gpu,
)

FP8 = dict(m_map="e4m3", v_map="e4m3")
MAPS = dict(m_map=maps.SIGNED8, v_map=maps.UNSIGNED8)

if not MOSAIC_GPU_JAX_OK:
    print(MOSAIC_GPU_REASON)


@jax.jit
def _kernel(*args):
    return fa.adam_update(*args, **FP8, implementation="mosaic_gpu", interpret=True)


@jax.jit
def _reference(*args):
    return fa.reference(*args, **FP8)


def _state(rows, n, bs, scale_dtype, seed):
    """Random E4M3 codes (every finite pattern; ``v`` non-negative) and positive scales;
    the first block column of ``m`` all zero, one ``v`` block all zero with scale 0."""
    rng = np.random.default_rng(seed)
    mc = rng.integers(0, 256, (rows, n), dtype=np.uint8)
    mc = np.where((mc & 0x7F) == 0x7F, mc ^ 1, mc)  # no NaN codes
    vc = rng.integers(0, 0x7F, (rows, n), dtype=np.uint8)
    ms, vs = (rng.uniform(1e-3, 2.0, (rows, n // bs)).astype(np.float32) for _ in range(2))
    mc[:, :bs], ms[:, 0] = 0, 0.0
    vc[-1, -bs:], vs[-1, -1] = 0, 0.0
    return (jnp.asarray(mc), jnp.asarray(ms, scale_dtype), jnp.asarray(vc),
            jnp.asarray(vs, scale_dtype))  # fmt: skip


def _grad(rows, n, dtype, seed):
    """Normal gradients with NaN, ±inf, ±max, 0 and subnormals at ``(k, n - 1 - 7k)``:
    at the ends of the rows, away from the zero first moments of the first block."""
    g = jax.random.normal(jax.random.key(seed), (rows, n)) * 0.1
    info = jnp.finfo(dtype)
    edges = [jnp.nan, jnp.inf, -jnp.inf, float(info.max), -float(info.max), 0.0,
             float(info.smallest_subnormal), -3 * float(info.smallest_subnormal)]  # fmt: skip
    for k, e in enumerate(edges):
        g = g.at[k % rows, n - 1 - 7 * k].set(e)
    return g.astype(dtype)


def _step(g, state, count):
    hyper = fa.hyperparameters(0.9, 0.999, 1e-8, count)
    got, want = _kernel(g, *state, hyper), _reference(g, *state, hyper)
    assert_same_state(got, want)
    return got


@needs_mosaic_gpu
@pytest.mark.parametrize("rows,n,bs,scale_dtype,g_dtype,count", [
    (13, 768, 256, jnp.bfloat16, jnp.float32, 1),  # 39 blocks: padded to one program
    (300, 512, 256, jnp.float32, jnp.bfloat16, 7),  # 600 blocks: the last program overlaps
    (40, 512, 16, jnp.bfloat16, jnp.float16, 3),  # 1280 blocks of 16: ten whole programs
    (9, 576, 64, jnp.float32, jnp.float32, 2),  # 81 blocks of 64
])  # fmt: skip
def test_kernel_equals_reference(rows, n, bs, scale_dtype, g_dtype, count):
    """New codes and scales bit for bit, the update within 1e-6·max(1, |u|); the edge
    gradients: NaN and ±inf give u = 0 and keep the moments, ±max is clipped, not
    dropped."""
    mc, ms, vc, vs = _state(rows, n, bs, scale_dtype, seed=rows + bs)
    g = _grad(rows, n, g_dtype, seed=n)
    u = np.asarray(_step(g, (mc, ms, vc, vs), count)[0])
    assert u[0, n - 1] == u[1, n - 8] == u[2, n - 15] == 0.0  # NaN, inf, -inf
    assert u[3, n - 22] > 0.3 and u[4, n - 29] < -0.3  # ±max


@needs_mosaic_gpu
@pytest.mark.parametrize("scale_dtype", [jnp.bfloat16, jnp.float32])
def test_steps_from_a_zero_state(scale_dtype):
    """adamw_fp8's first steps from its zero state, the kernel's state fed back: the
    first step is sign(g); a positive second moment never rounds to 0; a block of
    non-finite gradients keeps its zero moments (scale 0) and updates nothing; a block
    whose max |m| / 448 is below float32's smallest normal gets scale 0."""
    rows, n, bs = 6, 512, 128
    zeros = jnp.zeros((rows, n), jnp.uint8)
    state = (zeros, jnp.zeros((rows, n // bs), scale_dtype)) * 2
    for count in (1, 2, 3):
        g = _grad(rows, n, jnp.float32, seed=count) * jnp.exp2(jnp.linspace(-30, 10, n))
        g = g.at[5, :bs].set(jnp.where(jnp.arange(bs) % 2, jnp.nan, jnp.inf))
        g = g.at[4, bs:2 * bs].set(jnp.where(jnp.arange(bs) % 3, 1e-36, -1e-36))
        u, *state = _step(g, state, count)
        u = np.asarray(u)
        assert (u[5, :bs] == 0).all() and float(state[1][5, 0]) == float(state[3][5, 0]) == 0
        assert float(state[1][4, 1]) == 0 and not (np.asarray(state[0][4, bs:2 * bs]) & 0x7F).any()
        if count == 1:
            big = np.abs(np.nan_to_num(np.asarray(g), posinf=0, neginf=0)) > 1e-4  # >> eps
            np.testing.assert_allclose(u[big], np.sign(np.asarray(g))[big], atol=1e-3)
        v = np.asarray(state[2])
        assert (v == 1).any() and not (v >= 0x80).any()  # the smallest subnormal, never < 0


@needs_mosaic_gpu
def test_adamw_fp8_runs_the_kernel_and_equals_the_xla_path():
    """adamw_fp8 with implementation="pallas" in interpret mode runs this kernel once per
    quantized leaf and equals the XLA path over steps (state bit for bit)."""
    params = {"w": jnp.zeros((40, 512)), "t": jnp.zeros((3, 5, 384)), "v": jnp.zeros((33000,)),
              "small": jnp.zeros((64,))}  # fmt: skip
    kernel_tx = optim.adamw_fp8(1e-3, weight_decay=0.1, implementation="pallas", interpret=True)
    xla_tx = optim.adamw_fp8(1e-3, weight_decay=0.1)
    jaxpr = str(jax.make_jaxpr(kernel_tx.update)(params, kernel_tx.init(params), params))
    assert jaxpr.count("kernel_name='jaxq_adam_update_e4m3_mosaic'") == 3  # w, t and v
    assert "pallas_call" not in jaxpr  # the Triton kernel is not used
    grads = [jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.key(i), p.shape), params)
             for i in range(2)]  # fmt: skip
    assert_same_steps(kernel_tx, xla_tx, params, grads)


@needs_mosaic_gpu
@pytest.mark.parametrize("g_dtype,bs", [(jnp.float32, 256), (jnp.bfloat16, 16)])
def test_lowers_for_h100(g_dtype, bs):
    """The kernel lowers to a Mosaic GPU custom call for an H100 (nothing is compiled:
    ptxas has not seen it)."""
    rows, n = 70, 1024
    args = (jax.ShapeDtypeStruct((rows, n), g_dtype),
            jax.ShapeDtypeStruct((rows, n), jnp.uint8),
            jax.ShapeDtypeStruct((rows, n // bs), jnp.bfloat16),
            jax.ShapeDtypeStruct((rows, n), jnp.uint8),
            jax.ShapeDtypeStruct((rows, n // bs), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, 8), jnp.float32))  # fmt: skip
    fn = functools.partial(fam.adam_update, interpret=False)
    text = R.lower_for(fn, *args, target="cuda").as_text()
    assert "mosaic_gpu" in text and "triton" not in text
    assert "jaxq_adam_update_e4m3_mosaic" in text


def test_dispatch():
    """mosaic_gpu comes before triton; it takes E4M3 moments in interpret mode on JAX >=
    0.12 and refuses, with the reason, on an older JAX, (compiled) off a GPU, for the
    dynamic maps (a gather) and for blocks over 256."""
    names = [i.name for i in R.get("adam_update").implementations]
    assert names.index("mosaic_gpu") < names.index("triton")
    mosaic = R.get("adam_update").implementation("mosaic_gpu")
    g, ms = jnp.ones((4, 512)), jnp.zeros((4, 2), jnp.bfloat16)

    def why(g=g, ms=ms, kw=FP8, interpret=True):
        return fa.why_not(mosaic, g, ms, kw["m_map"], kw["v_map"], interpret=interpret)

    def choose(implementation, g=g, ms=ms, kw=FP8):
        return fa.implementation_for(g, ms, kw["m_map"], kw["v_map"], implementation,
                                     interpret=True)  # fmt: skip

    assert fa.implementation_for(g, ms, "e4m3", "e4m3", None) == "xla"  # CPU, compiled
    big = (jnp.ones((4, 1024)), jnp.zeros((4, 2), jnp.bfloat16))
    if MOSAIC_GPU_JAX_OK:
        assert why() is None
        assert choose("pallas") == choose(None) == choose("mosaic_gpu") == "mosaic_gpu"
        assert why(interpret=False).startswith("needs a GPU")
        with pytest.raises(ValueError, match="mosaic_gpu: needs a GPU"):
            _ = fa.adam_update(g, *[jnp.zeros((4, 512), jnp.uint8), ms] * 2,
                               fa.hyperparameters(0.9, 0.999, 1e-8, 1), **FP8,
                               implementation="mosaic_gpu")  # fmt: skip
        for kw in (MAPS, dict(m_map="e4m3", v_map=maps.UNSIGNED8)):
            assert "Pallas Mosaic GPU lowers no gather" in why(kw=kw)
            assert choose("pallas", kw=kw) == "triton"
        assert why(*big) == ("block size 512 > 256: 128 blocks of gradients and codes do not "
                             "fit in shared memory")  # fmt: skip
        assert choose("pallas", *big) == "triton"
        assert "power of two" in why(jnp.ones((4, 300)), jnp.zeros((4, 3)))
        empty = (jnp.zeros((0, 512)), *[jnp.zeros((0, 512), jnp.uint8), jnp.zeros((0, 2))] * 2)
        out = fam.adam_update(*empty, fa.hyperparameters(0.9, 0.999, 1e-8, 1), interpret=True)
        assert [o.shape for o in out] == [(0, 512), (0, 512), (0, 2), (0, 512), (0, 2)]
    else:
        assert choose("pallas") == choose("pallas", *big) == "triton"
        with pytest.raises(ValueError, match=r"mosaic_gpu: needs JAX >= 0\.12"):
            choose("mosaic_gpu")
        assert "JAX >= 0.12" in why()
    assert fam.why_not(g, ms, "e4m3", "e4m3") is None  # no platform check of its own
