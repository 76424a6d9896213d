"""The fused Adam update (8-bit maps, E4M3) in interpret mode against jaxq.optim's XLA path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxq.kernels import fused_adam as fa

from jaxq import optim
from jaxq.optim import codecs as cd
from jaxq.optim import engine, maps

from .common import assert_same_state, assert_same_steps, lower_or_skip

KW = dict(m_map=maps.SIGNED8, v_map=maps.UNSIGNED8)


def _state(rows, n, bs, scale_dtype, seed, fp8=False):
    """Random codes (every value; E4M3: every finite one, v non-negative) and positive
    scales, one block column of first moments all zero."""
    rng = np.random.default_rng(seed)
    codes = [rng.integers(0, 256, (rows, n), dtype=np.uint8) for _ in range(2)]
    if fp8:
        codes = [np.where((c & 0x7F) == 0x7F, c ^ 1, c) for c in codes]  # no NaN codes
        codes[1] &= 0x7F
    codes = [jnp.asarray(c) for c in codes]
    scales = [rng.uniform(1e-3, 2.0, (rows, n // bs)).astype(np.float32) for _ in range(2)]
    scales[0][:, 0] = 0.0  # a block whose first moment is zero
    codes[0] = codes[0].at[:, :bs].set(0 if fp8 else 127)
    return codes[0], jnp.asarray(scales[0], scale_dtype), codes[1], jnp.asarray(scales[1],
                                                                                   scale_dtype)


def _grad(rows, n, dtype, seed):
    g = jax.random.normal(jax.random.key(seed), (rows, n)) * 0.1
    g = g.at[0, 3].set(jnp.nan).at[1, 5].set(jnp.inf).at[2, 7].set(-jnp.inf)
    g = g.at[3, 11].set(1e30).at[4].set(0.0).at[5, 13].set(1e-30)
    return g.astype(dtype)


def _xla(g, mc, ms, vc, vs, count, strategy, fp8):
    """jaxq.optim's own step on the same state (the codecs adamw_8bit / adamw_fp8 use)."""
    bs = g.shape[1] // ms.shape[1]
    if fp8:
        m = cd.FP8Codec(bs, ms.dtype)
        v = cd.FP8Codec(bs, ms.dtype, keep_nonzero=True)
        as_f8 = lambda c: jax.lax.bitcast_convert_type(c, jnp.float8_e4m3fn)  # noqa: E731
        mc, vc = as_f8(mc), as_f8(vc)
    else:
        m = cd.BlockCodec(maps.SIGNED8, bs, 8, sign_fix=True, scale_dtype=ms.dtype)
        v = cd.BlockCodec(maps.UNSIGNED8, bs, 8, scale_dtype=ms.dtype)
    b1, b2, eps = jnp.float32(0.9), jnp.float32(0.999), jnp.float32(1e-8)
    t = jnp.float32(count)

    def step(g, moments):
        mm, vv = moments
        mm = b1 * mm + (1.0 - b1) * g
        vv = b2 * vv + (1.0 - b2) * (g * g)
        return (mm / (1.0 - b1**t)) / (jnp.sqrt(vv) / jnp.sqrt(1.0 - b2**t) + eps), (mm, vv)

    u, (mm, vv) = engine.step_moments(g, (cd.QuantizedMoment(mc, ms), cd.QuantizedMoment(vc, vs)),
                                      lambda shape: (m, v), step, strategy=strategy)
    as_u8 = lambda c: jax.lax.bitcast_convert_type(c, jnp.uint8) if fp8 else c  # noqa: E731
    return u, as_u8(mm.codes), mm.absmax, as_u8(vv.codes), vv.absmax




@pytest.mark.parametrize("rows,n,bs,scale_dtype,g_dtype,fp8", [
    (13, 768, 256, jnp.bfloat16, jnp.float32, False),  # ragged rows, 3 blocks per row
    (9, 512, 64, jnp.float32, jnp.bfloat16, False),    # 8 blocks per row, bf16 gradients
    (11, 512, 128, jnp.bfloat16, jnp.float32, True),   # E4M3 moments
])  # fmt: skip
def test_kernel_equals_the_optimizer_xla_step(rows, n, bs, scale_dtype, g_dtype, fp8):
    mc, ms, vc, vs = _state(rows, n, bs, scale_dtype, seed=rows, fp8=fp8)
    g = _grad(rows, n, g_dtype, seed=n)
    count = 7
    hyper = fa.hyperparameters(0.9, 0.999, 1e-8, count)
    maps_kw = dict(m_map="e4m3", v_map="e4m3") if fp8 else KW
    kernel = jax.jit(functools.partial(fa.adam_update, **maps_kw, implementation="pallas",
                                       interpret=True))  # fmt: skip
    got = kernel(g, mc, ms, vc, vs, hyper)
    for strategy in ("plain", "recompute"):
        want = jax.jit(_xla, static_argnums=(5, 6, 7))(g, mc, ms, vc, vs, count, strategy, fp8)
        assert_same_state(got, want)
    if fp8:  # a positive second moment never rounds to 0 (the subnormal 1 instead)
        v = np.asarray(got[3])
        assert (v[:, bs:] == 1).any() and not (v >= 0x80).any()
    # the non-finite rule: no update, moments kept (same codes, as their block's scale holds)
    u = np.asarray(got[0])
    assert u[0, 3] == u[1, 5] == u[2, 7] == 0.0
    assert np.abs(u[3, 11]) > 0.5  # a huge gradient is clipped, not dropped


@pytest.mark.parametrize("make", [optim.adamw_8bit, optim.adamw_fp8])
def test_adamw_with_the_kernel_equals_the_xla_path_over_steps(make):
    params = {
        "w": jnp.zeros((40, 512)),         # one row of blocks per row
        "t": jnp.zeros((3, 5, 384)),       # leading axes flattened into rows
        "v": jnp.zeros((70000,)),          # a vector, padded to whole blocks
        "small": jnp.zeros((64,)),         # keeps float32 moments
    }  # fmt: skip
    kernel_tx = make(1e-3, weight_decay=0.1, implementation="pallas", interpret=True)
    xla_tx = make(1e-3, weight_decay=0.1)
    jaxpr = str(jax.make_jaxpr(kernel_tx.update)(params, kernel_tx.init(params), params))
    # w, t and v ("small" keeps float32 moments); a Mosaic GPU kernel (JAX >= 0.12, E4M3
    # moments) is not a pallas_call in the jaxpr but names itself
    calls = jaxpr.count("pallas_call") + jaxpr.count("kernel_name='jaxq_adam_update_e4m3_mosaic'")
    assert calls == 3
    assert "pallas_call" not in str(jax.make_jaxpr(xla_tx.update)(params, xla_tx.init(params),
                                                                  params))  # fmt: skip
    grads = [jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.key(i), p.shape), params)
             for i in range(3)]  # fmt: skip
    grads[1]["w"] = grads[1]["w"].at[2, 3].set(jnp.nan)
    uk = assert_same_steps(kernel_tx, xla_tx, params, grads)
    assert float(uk["w"][2, 3]) != 0.0  # the NaN of step 1 left no trace on step 2


def test_block_sizes_the_kernel_cannot_tile_fall_back_to_xla():
    g = jnp.ones((4, 300))
    ms = jnp.zeros((4, 3), jnp.float32)
    impl = fa.implementation_for(g, ms, maps.SIGNED8, maps.UNSIGNED8, None, interpret=True)
    assert impl == "xla"  # block 100 is not a power of two
    with pytest.raises(ValueError, match="power of two"):
        fa.implementation_for(g, ms, maps.SIGNED8, maps.UNSIGNED8, "pallas", interpret=True)
    with pytest.raises(ValueError, match="needs a GPU"):
        fa.implementation_for(jnp.ones((4, 512)), jnp.zeros((4, 2)), maps.SIGNED8,
                              maps.UNSIGNED8, "pallas")  # fmt: skip
    tx = optim.adamw_8bit(1e-3, block_size=100, implementation=None, interpret=True)
    params = {"w": jnp.ones((8, 600))}
    upd, _ = jax.jit(tx.update)(params, tx.init(params), params)
    assert np.isfinite(np.asarray(upd["w"])).all()


def test_bad_operands_are_named():
    g = jnp.ones((4, 512))
    mc, ms = jnp.zeros((4, 512), jnp.uint8), jnp.zeros((4, 2), jnp.bfloat16)
    h = fa.hyperparameters(0.9, 0.999, 1e-8, 1)
    with pytest.raises(ValueError, match="m_codes must be uint8"):
        fa.adam_update(g, mc.astype(jnp.int8), ms, mc, ms, h, **KW)
    with pytest.raises(ValueError, match="v_scale"):
        fa.adam_update(g, mc, ms, mc, jnp.zeros((4, 3)), h, **KW)
    with pytest.raises(ValueError, match="hyper"):
        fa.adam_update(g, mc, ms, mc, ms, h[:, :4], **KW)


@pytest.mark.parametrize("maps_kw", [KW, dict(m_map="e4m3", v_map="e4m3")], ids=["map8", "e4m3"])
def test_kernel_lowers_for_an_h100(maps_kw):
    rows, n = 40, 1024
    args = (jax.ShapeDtypeStruct((rows, n), jnp.float32),
            jax.ShapeDtypeStruct((rows, n), jnp.uint8),
            jax.ShapeDtypeStruct((rows, n // 256), jnp.bfloat16),
            jax.ShapeDtypeStruct((rows, n), jnp.uint8),
            jax.ShapeDtypeStruct((rows, n // 256), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, 8), jnp.float32))  # fmt: skip
    fn = functools.partial(fa._triton, **maps_kw, sign_fix=True, interpret=False)
    assert "triton" in lower_or_skip(fn, *args).as_text()
