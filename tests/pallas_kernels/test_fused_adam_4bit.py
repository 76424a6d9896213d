"""The fused 4-bit Adam update in interpret mode against jaxq.optim's XLA path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxq.kernels import fused_adam_4bit as fa4

from jaxq import optim
from jaxq.optim import adam, engine, maps
from jaxq.optim import codecs as cd

from .common import assert_same_state, assert_same_steps, lower_or_skip

KW = dict(m_map=maps.SIGNED4, v_map=maps.LINEAR4)
# Betas whose products with the moments are exact, for gradients and old scales of 12
# significant bits: every moment is then one rounding of its exact value, whichever
# multiply-adds a compiler contracts, so the kernel and both XLA strategies must agree bit
# for bit. With other betas XLA's own strategies differ by an ulp (see the module).
EXACT = (0.5, 0.75)


def _short(x, bits=12):
    """float32 ``x`` rounded to ``bits`` significant bits (see EXACT)."""
    m, e = np.frexp(np.asarray(x, np.float32))
    return np.ldexp(np.round(m * 2.0**bits) / 2.0**bits, e).astype(np.float32)


def _random_state(codec, shape, scale_dtype, rng):
    """Random packed codes (every nibble, the padding's too) and positive scales of 12
    significant bits, with a zero block of m, and a zero row and a zero column of a
    rank-1 v."""
    st = codec.init(shape)
    codes = jnp.asarray(rng.integers(0, 256, st.codes.shape, dtype=np.uint8))
    if isinstance(st, cd.Rank1Moment):
        row = _short(rng.uniform(1e-3, 2.0, st.row_max.shape))
        col = _short(rng.uniform(1e-3, 2.0, st.col_max.shape))
        row[..., 1], col[..., 2] = 0.0, 0.0
        return cd.Rank1Moment(codes, jnp.asarray(row), jnp.asarray(col))
    scale = _short(rng.uniform(1e-3, 2.0, st.absmax.shape))
    scale[..., 0] = 0.0
    return cd.QuantizedMoment(codes, jnp.asarray(scale, scale_dtype))


def _rows(x, shape):
    """A 2-D view: the rows of a matrix, 8 rows of a vector."""
    return x.reshape((-1, shape[-1]) if len(shape) > 1 else (8, -1))


def _grad(shape, dtype, seed):
    """Normal gradients of 12 significant bits with NaN, +-inf, huge, tiny and an all-zero
    row."""
    g = _rows(jnp.asarray(_short(jax.random.normal(jax.random.key(seed), shape) * 0.1)), shape)
    g = g.at[0, 3].set(jnp.nan).at[1, 5].set(jnp.inf).at[2, 7].set(-jnp.inf)
    g = g.at[3, 11].set(1e30).at[3, 12].set(-3e38).at[4].set(0.0).at[5, 13].set(1e-30)
    return g.reshape(shape).astype(dtype)


def _step(count, b1=0.9, b2=0.999, eps=1e-8):
    b1, b2, eps, t = (jnp.float32(x) for x in (b1, b2, eps, count))

    def step(g, moments):
        m, v = moments
        m = b1 * m + (1.0 - b1) * g
        v = b2 * v + (1.0 - b2) * (g * g)
        return (m / (1.0 - b1**t)) / (jnp.sqrt(v) / jnp.sqrt(1.0 - b2**t) + eps), (m, v)

    return step


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _run(g, states, bs, scale_dtype, strategy, kernel, betas=(0.9, 0.999)):
    """One step of jaxq.optim's engine with adamw_4bit's codecs, the kernel's hook or not."""
    count = 7
    fused = None
    if kernel:
        hyper = fa4.hyperparameters(*betas, 1e-8, count)
        fused = adam._fused(hyper, "pallas", True)
    codecs = adam._codecs_4bit(bs, scale_dtype)
    u, (m, v) = engine.step_moments(g, states, codecs, _step(count, *betas), strategy=strategy,
                                    fused=fused)  # fmt: skip
    return u, m, v


def _unpacked(a):
    return np.stack([a & 15, a >> 4], -1) if a.dtype == np.uint8 else a


def _near(got, want):
    """Equal up to the contraction of a multiply-add: scales and maxima within one ulp of
    their dtype, codes within one step, and moved in at most 1 of 1000 elements."""
    for a, b in zip(jax.tree.leaves(got[1:]), jax.tree.leaves(want[1:]), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.dtype == np.uint8:
            d = np.abs(_unpacked(a).astype(int) - _unpacked(b))
            assert d.max() <= 1 and d.mean() <= 1e-3
        else:
            np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=0,
                                       rtol=float(jnp.finfo(a.dtype).eps))  # fmt: skip
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)




@pytest.mark.parametrize("shape,bs,scale_dtype,g_dtype,rank1", [
    ((21, 1019), 32, jnp.float32, jnp.float32, True),     # odd ragged columns, ragged rows
    ((3, 20, 256), 64, jnp.bfloat16, jnp.bfloat16, True),  # a batch of three matrices
    ((5000,), 128, jnp.bfloat16, jnp.float32, False),      # a vector, padded to 5120
])  # fmt: skip
def test_kernel_equals_the_optimizer_xla_step(shape, bs, scale_dtype, g_dtype, rank1):
    codecs = adam._codecs_4bit(bs, scale_dtype)(shape)
    assert isinstance(codecs[1], cd.Rank1Codec) == rank1
    rng = np.random.default_rng(len(shape) + bs)
    states = tuple(_random_state(c, shape, scale_dtype, rng) for c in codecs)
    g = _grad(shape, g_dtype, seed=bs)
    jaxpr = str(jax.make_jaxpr(_run, static_argnums=(2, 3, 4, 5, 6))(g, states, bs, scale_dtype,
                                                                   "plain", True, EXACT))
    assert jaxpr.count("pallas_call") == (2 if rank1 else 1)
    got = _run(g, states, bs, scale_dtype, "plain", True, EXACT)
    for strategy in ("plain", "recompute"):
        assert_same_state(got, _run(g, states, bs, scale_dtype, strategy, False, EXACT))
    # the non-finite rule: no update; a huge gradient is clipped, not dropped
    u = _rows(np.asarray(got[0]), shape)
    assert u[0, 3] == u[1, 5] == u[2, 7] == 0.0
    assert np.abs(u[3, 11]) > 0.5 and np.abs(u[3, 12]) > 0.5
    if rank1:  # the zero column and row of the old maxima are nonzero again
        assert (np.asarray(got[2].row_max) > 0).all() and (np.asarray(got[2].col_max) > 0).all()


def test_with_other_betas_the_kernel_is_as_near_as_xla_to_itself():
    """Default betas: XLA contracts the moments' multiply-adds differently in its two
    strategies, so each of them and the kernel agree to an ulp of the scales."""
    shape, bs = (3, 20, 256), 64
    codecs = adam._codecs_4bit(bs, jnp.float32)(shape)
    rng = np.random.default_rng(0)
    states = tuple(_random_state(c, shape, jnp.float32, rng) for c in codecs)
    g = jax.random.normal(jax.random.key(1), shape).at[0, 1, 2].set(jnp.nan)
    got = _run(g, states, bs, jnp.float32, "plain", True)
    plain, recompute = (_run(g, states, bs, jnp.float32, s, False) for s in ("plain", "recompute"))
    for want in (plain, recompute):
        _near(got, want)
    _near(plain, recompute)


def test_adamw_4bit_with_the_kernel_equals_the_xla_path_over_steps():
    params = {
        "w": jnp.zeros((40, 384)),       # rank-1 v
        "t": jnp.zeros((3, 20, 256)),    # rank-1 v on a batch of matrices
        "v": jnp.zeros((5000,)),         # block v, padded
        "b": jnp.zeros((12, 512)),       # block v (no cheap rank-1 view), ragged row tiles
        "m": jnp.zeros((50, 100)),       # the row layout merges the short axis: XLA
        "small": jnp.zeros((64,)),       # keeps float32 moments
    }  # fmt: skip
    kw = dict(b1=0.5, b2=0.5, weight_decay=0.1)  # exact products over steps (see EXACT)
    kernel_tx = optim.adamw_4bit(1e-3, **kw, implementation="pallas", interpret=True)
    xla_tx = optim.adamw_4bit(1e-3, **kw)
    jaxpr = str(jax.make_jaxpr(kernel_tx.update)(params, kernel_tx.init(params), params))
    assert jaxpr.count("pallas_call") == 6  # two passes for w and t, one for v and b
    assert "pallas_call" not in str(jax.make_jaxpr(xla_tx.update)(params, xla_tx.init(params),
                                                                  params))  # fmt: skip
    grads = [jax.tree.map(
        lambda p, i=i: jnp.asarray(_short(jax.random.normal(jax.random.key(i), p.shape))),
        params) for i in range(3)]  # fmt: skip
    grads[1]["w"] = grads[1]["w"].at[2, 3].set(jnp.nan)
    grads[1]["v"] = grads[1]["v"].at[17].set(-jnp.inf)
    uk = assert_same_steps(kernel_tx, xla_tx, params, grads)
    assert float(uk["w"][2, 3]) != 0.0 and float(uk["v"][17]) != 0.0  # no trace of step 1


def test_where_the_kernel_cannot_run_it_falls_back_or_says_why():
    g, ms = jnp.ones((4, 512)), jnp.zeros((4, 32), jnp.float32)  # blocks of 16
    assert fa4.implementation_for(g, ms, maps.SIGNED4, maps.LINEAR4, None, True) == "xla"
    with pytest.raises(ValueError, match="power of two >= 32"):
        fa4.implementation_for(g, ms, maps.SIGNED4, maps.LINEAR4, "pallas", interpret=True)
    with pytest.raises(ValueError, match="16-value map"):
        fa4.implementation_for(g, ms[:, :4], maps.SIGNED8, maps.LINEAR4, "pallas",
                               interpret=True)  # fmt: skip
    with pytest.raises(ValueError, match="needs a GPU"):
        fa4.implementation_for(g, ms[:, :4], maps.SIGNED4, maps.LINEAR4, "pallas")
    tx = optim.adamw_4bit(1e-3, block_size=16, implementation=None, interpret=True)
    params = {"w": jnp.ones((48, 256))}
    state = tx.init(params)
    assert "pallas_call" not in str(jax.make_jaxpr(tx.update)(params, state, params))


def test_bad_operands_are_named():
    g = jnp.ones((4, 512))
    mc, ms = jnp.zeros((4, 256), jnp.uint8), jnp.zeros((4, 4), jnp.float32)
    rank1 = (jnp.zeros((4,)), jnp.zeros((2, 500)))
    h = fa4.hyperparameters(0.9, 0.999, 1e-8, 1)
    with pytest.raises(ValueError, match="m_codes must be packed uint8"):
        fa4.adam_update(g, mc.astype(jnp.int8), ms, mc, ms, h, **KW)
    with pytest.raises(ValueError, match="m_codes must be packed"):
        fa4.adam_update(g, jnp.zeros((4, 512), jnp.uint8), ms, mc, ms, h, **KW)
    with pytest.raises(ValueError, match="v_scale must be like m_scale"):
        fa4.adam_update(g, mc, ms, mc, jnp.zeros((4, 3)), h, **KW)
    with pytest.raises(ValueError, match="v_codes must be packed uint8\\[4, 250\\]"):
        fa4.adam_update(g, mc, ms, mc, rank1, h, **KW)
    with pytest.raises(ValueError, match="column maxima"):
        fa4.adam_update(g, mc, ms, mc[:, :250], (rank1[0], jnp.zeros((3, 500))), h, **KW)
    with pytest.raises(ValueError, match="n \\(300\\) must be in \\(384, 512\\]"):
        fa4.adam_update(g, mc, ms, mc, ms, h, n=300, **KW)
    with pytest.raises(ValueError, match="m_map must be a 16-value"):
        fa4.adam_update(g, mc, ms, mc, ms, h, m_map=maps.SIGNED8, v_map=maps.LINEAR4)
    with pytest.raises(ValueError, match="g must be a 2-D float"):
        fa4.adam_update(g.reshape(-1), mc, ms, mc, ms, h, **KW)
    with pytest.raises(ValueError, match="hyper"):
        fa4.adam_update(g, mc, ms, mc, ms, h[:, :4], **KW)


@pytest.mark.parametrize("rank1", [True, False], ids=["rank1", "block"])
def test_kernel_lowers_for_an_h100(rank1):
    rows, n, bs = 40, 1000, 128
    s = jax.ShapeDtypeStruct
    v = ((s((rows, n // 2), jnp.uint8), (s((rows,), jnp.float32), s((2, n), jnp.float32)))
         if rank1 else (s((rows, 512), jnp.uint8), s((rows, 8), jnp.bfloat16)))  # fmt: skip
    args = (s((rows, 1024), jnp.float32), s((rows, 512), jnp.uint8),
            s((rows, 1024 // bs), jnp.float32), *v, s((1, 8), jnp.float32))  # fmt: skip
    fn = functools.partial(fa4._triton, **KW, n=n, interpret=False)
    text = lower_or_skip(fn, *args).as_text()
    assert "triton" in text
