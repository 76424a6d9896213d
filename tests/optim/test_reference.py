"""jaxq.optim against an independent float64 numpy implementation and against optax."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from xla_options import RUN_BOUND

from jaxq import optim

from . import optim_numpy_ref as ref

S8, U8 = optim.dynamic_map(True), optim.dynamic_map(False)
M4, L4 = optim.dynamic_map_4bit(), optim.linear_map_4bit()


def _grads(key, shape, scale=0.01):
    return jax.random.normal(key, shape) * scale


def _codes_agree(got, want, tol=1e-3):
    """Codes equal except a tiny fraction of float32-vs-float64 midpoint ties (one step)."""
    got, want = np.asarray(got).astype(np.int64), np.asarray(want).astype(np.int64)
    diff = got != want
    assert diff.mean() <= tol, diff.mean()
    assert np.all(np.abs(got - want)[diff] <= 1)


@pytest.mark.parametrize("shape", [(64, 1000), (8192,), (24, 16, 64), (16, 1024)])
@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float32"])
def test_adamw_8bit_vs_float64_numpy(shape, scale_dtype):
    lr, wd = 1e-3, 0.1
    tx = optim.adamw_8bit(lr, weight_decay=wd, scale_dtype=scale_dtype)
    key = jax.random.key(0)
    p = jax.random.normal(key, shape) * 0.1
    state = tx.init(p)
    upd = jax.jit(tx.update)
    bs = 256
    for t in range(1, 6):
        g = _grads(jax.random.fold_in(key, t), shape)
        st = state[0]
        dq = lambda q, code: ref.dequantize(np.asarray(q.codes), np.asarray(q.absmax, np.float64),
                                            code, bs, shape)
        m, v = dq(st.mu, S8), dq(st.nu, U8)
        u_ref, m_new, v_new = ref.adam_step(g, m, v, t, lr=lr, wd=wd, p=p)
        u, state = upd(g, state, p)
        p_new = p + u
        np.testing.assert_allclose(np.asarray(p_new), np.asarray(p, np.float64) + u_ref, atol=1e-6)
        mc, ma = ref.quantize(m_new, S8, bs, scale_dtype=scale_dtype, sign_fix=True)
        vc, va = ref.quantize(v_new, U8, bs, scale_dtype=scale_dtype)
        _codes_agree(state[0].mu.codes, mc)
        _codes_agree(state[0].nu.codes, vc)
        np.testing.assert_allclose(np.asarray(state[0].mu.absmax, np.float64), ma, rtol=8e-3)
        np.testing.assert_allclose(np.asarray(state[0].nu.absmax, np.float64), va, rtol=8e-3)
        assert int(state[0].count) == t
        p = p_new


def test_sign_never_flips_8bit():
    # Tiny negative moments next to a huge one in the same block: their nearest code is 0,
    # the sign fix moves them to the smallest negative code.
    x = np.full((1, 256), -1e-9, np.float32)
    x[0, 0] = 1.0
    x[0, 1] = 3e-9
    codec = optim.adam._codecs_8bit(None, None)((1024, 1024))[0]
    q = codec.encode(jnp.asarray(x))
    back = np.asarray(codec.decode(q, x.shape))
    assert np.all(back[0, 2:] < 0) and back[0, 0] == 1.0 and back[0, 1] >= 0


@pytest.mark.parametrize("shape", [(48, 300), (24, 16, 64)])
def test_adamw_4bit_vs_float64_numpy(shape):
    """Rank-1 normalized v on the matrix view: the matrix, or (24, 16 * 64) for (24, 16, 64)."""
    lr = 1e-3
    view = (shape[0], int(np.prod(shape[1:])))
    tx = optim.adamw_4bit(lr, weight_decay=0.0)
    key = jax.random.key(1)
    p = jax.random.normal(key, shape) * 0.1
    state = tx.init(p)
    upd = jax.jit(tx.update)
    for t in range(1, 4):
        g = _grads(jax.random.fold_in(key, t), shape)
        st = state[0]
        m = ref.dequantize(ref.unpack4(st.mu.codes), np.asarray(st.mu.absmax, np.float64), M4,
                           128, shape)
        norm = np.minimum(np.asarray(st.nu.row_max, np.float64)[:, None],
                          np.asarray(st.nu.col_max, np.float64)[None, :])
        v = (L4[ref.unpack4(st.nu.codes)[:, : view[-1]]] * norm).reshape(shape)
        u_ref, m_new, v_new = ref.adam_step(g, m, v, t, lr=lr)
        u, state = upd(g, state, p)
        np.testing.assert_allclose(np.asarray(p + u), np.asarray(p, np.float64) + u_ref, atol=1e-6)
        mc, _ = ref.quantize(m_new, M4, 128, scale_dtype="float32", sign_fix=True)
        _codes_agree(ref.unpack4(state[0].mu.codes), mc)
        v_new = v_new.reshape(view)
        row, col = v_new.max(axis=1), v_new.max(axis=0)
        np.testing.assert_allclose(np.asarray(state[0].nu.row_max), row, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(state[0].nu.col_max), col, rtol=1e-6)
        r = v_new / np.minimum(row[:, None], col[None, :])
        assert r.max() <= 1 + 1e-6
        _codes_agree(ref.unpack4(state[0].nu.codes)[:, : view[-1]], ref.nearest(r, L4))
        p = p + u


def test_adamw_fp8_vs_float64_numpy():
    lr, shape = 1e-3, (16, 512)
    tx = optim.adamw_fp8(lr, weight_decay=0.0)
    key = jax.random.key(2)
    p = jax.random.normal(key, shape) * 0.1
    state = tx.init(p)
    for t in range(1, 4):
        g = _grads(jax.random.fold_in(key, t), shape)
        st = state[0]
        dq = lambda q: (np.asarray(q.codes).astype(np.float64).reshape(16, 2, 256)
                        * np.asarray(q.absmax, np.float64)[..., None]).reshape(shape)
        u_ref, m_new, v_new = ref.adam_step(g, dq(st.mu), dq(st.nu), t, lr=lr)
        u, state = tx.update(g, state, p)
        np.testing.assert_allclose(np.asarray(p + u), np.asarray(p, np.float64) + u_ref, atol=1e-6)
        for new, q in ((m_new, state[0].mu), (v_new, state[0].nu)):
            amax = np.abs(ref.blocks(new, 256)).max(-1)
            scale = ref.round_up(amax / 448, "bfloat16")
            np.testing.assert_allclose(np.asarray(q.absmax, np.float64), scale, rtol=8e-3)
            want = (ref.blocks(new, 256) / np.asarray(q.absmax, np.float64)[..., None])
            want = want.astype(np.float32).astype(ml_dtypes.float8_e4m3fn).reshape(shape)
            want = want.astype(np.float32)
            if q is state[0].nu:  # positive second moments never round to 0
                want = np.where((new > 0) & (want == 0), 2.0**-9, want)
            same = np.asarray(q.codes).astype(np.float32) == want
            assert same.mean() > 0.999
        p = p + u


def test_fp8_second_moment_never_rounds_to_zero():
    """E4M3 keeps ~18 binades per block; a positive v below that is stored as 2**-9 * scale.

    The first moment rounds to nearest (it may flush to 0), the second moment rounds a
    positive value that would flush up to the smallest subnormal, and true zeros stay 0.
    Without this, an element whose v flushed next to a nonzero m takes a ~30x update.
    """
    rng = np.random.default_rng(0)
    x = np.float32(10.0) ** rng.uniform(-12, 0, (4, 256)).astype(np.float32)
    x[:, :3] = [1.0, 0.0, 1e-30]  # block max, an exact zero, far below 2**-9 * scale
    m_codec = optim.codecs.FP8Codec(256)
    v_codec = optim.codecs.FP8Codec(256, keep_nonzero=True)
    xj = jnp.asarray(x)
    qm, qv = m_codec.encode(xj), v_codec.encode(xj)
    inv = (1 / np.asarray(qv.absmax, np.float32)).astype(np.float32)  # (4, 1): one block a row
    rne = (x * inv).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(qm.codes).astype(np.float32), rne)
    want_v = np.where((x > 0) & (rne == 0), np.float32(2.0**-9), rne)
    np.testing.assert_array_equal(np.asarray(qv.codes).astype(np.float32), want_v)
    assert (rne == 0).sum() > 100 and (want_v == 0).sum() == 4  # only the exact zeros
    decoded = np.asarray(v_codec.decode(qv, x.shape))
    assert np.all(decoded[x > 0] > 0) and np.all(np.isfinite(decoded))

    # A constant gradient 2**-12 beside 1.0 in one block: m (ratio 2**-12) is kept, v
    # (ratio 2**-24) would flush. Adam's update under a constant gradient is 1; with a
    # flushed v it would approach 1 / sqrt(1 - b2) = 10 once bias correction fades.
    tx = optim.adamw_fp8(1.0, b2=0.99, weight_decay=0.0, min_quantized_size=1)
    p = jnp.zeros((1, 256))
    g = jnp.full((1, 256), 2.0**-12).at[0, 0].set(1.0)

    def body(state, _):
        u, state = tx.update(g, state, p)
        return state, jnp.max(jnp.abs(u))

    _, u_max = jax.lax.scan(body, tx.init(p), None, length=300)
    assert float(u_max.max()) <= 1.0 + 1e-2, float(u_max.max())


def test_lion_and_sgd_8bit_vs_float64_numpy():
    shape, key = (8, 1024), jax.random.key(3)
    p = jax.random.normal(key, shape)
    for kind in ("lion", "sgd", "nesterov"):
        if kind == "lion":
            tx = optim.lion_8bit(1e-4, weight_decay=0.0)
        else:
            tx = optim.sgd_8bit(0.01, momentum=0.9, nesterov=kind == "nesterov")
        state = tx.init(p)
        for t in range(1, 4):
            g = np.asarray(_grads(jax.random.fold_in(key, t), shape, 1.0), np.float64)
            q = state[0].mu
            m = ref.dequantize(np.asarray(q.codes), np.asarray(q.absmax, np.float64), S8, 256,
                               shape)
            if kind == "lion":
                u_ref = -1e-4 * np.sign(0.9 * m + 0.1 * g)
                m_new = 0.99 * m + 0.01 * g
            else:
                m_new = g + 0.9 * m
                u_ref = -0.01 * (g + 0.9 * m_new if kind == "nesterov" else m_new)
            u, state = tx.update(jnp.asarray(g, jnp.float32), state, p)
            np.testing.assert_allclose(np.asarray(u), u_ref, atol=1e-6)
            mc, _ = ref.quantize(m_new, S8, 256, sign_fix=True)
            _codes_agree(state[0].mu.codes, mc)


def _resync_run(tx, codecs, steps, shape, *, sync_moments):
    ref_tx = optax.adamw(1e-3, weight_decay=0.0)
    key = jax.random.key(0)
    p = jax.random.normal(key, shape) * 0.1
    s, r = tx.init(p), ref_tx.init(p)

    @functools.partial(jax.jit, compiler_options=RUN_BOUND)
    def step(p, s, r, key):
        if sync_moments:  # the reference starts from our dequantized moments
            m = codecs[0].decode(s[0].mu, shape)
            v = codecs[1].decode(s[0].nu, shape)
            r = (r[0]._replace(mu=m, nu=v),) + r[1:]
        g = jax.random.normal(key, shape) * 0.01
        u, s = tx.update(g, s, p)
        ur, r = ref_tx.update(g, r, p)
        pq, pr = p + u, p + ur
        err = jnp.abs(pq - pr)
        return pq, s, r, err.mean(), (err / (jnp.abs(pr) + 1e-9)).mean()

    errs = []
    for i in range(steps):  # the reference's parameters are ours at every step
        p, s, r, e, rel = step(p, s, r, jax.random.fold_in(key, i))
        errs.append((float(e), float(rel)))
    return np.array(errs)


def test_adamw_8bit_vs_optax_resynced_100_steps():
    tx = optim.adamw_8bit(1e-3, weight_decay=0.0)
    errs = _resync_run(tx, optim.adam._codecs_8bit(None, None)((1024, 1024)), 100, (1024, 1024),
                       sync_moments=True)
    assert errs[:, 0].max() < 6e-5, errs[:, 0].max()
    assert errs[:, 1].max() < 6e-4, errs[:, 1].max()


def test_adamw_8bit_drift_vs_optax_short():
    # Only parameters re-synchronised: the reference keeps its own float32 moments, so the
    # error measures what 8-bit moments change in the update.
    tx = optim.adamw_8bit(1e-3, weight_decay=0.0)
    errs = _resync_run(tx, None, 30, (256, 1024), sync_moments=False)
    assert errs[:, 0].max() < 6e-5, errs[:, 0].max()


@pytest.mark.fidelity
@pytest.mark.parametrize("kind,limit", [("8bit", 6e-5), ("fp8", 6e-5), ("4bit", 3e-4)])
def test_drift_vs_optax_100_steps(kind, limit):
    factory = {"8bit": optim.adamw_8bit, "4bit": optim.adamw_4bit, "fp8": optim.adamw_fp8}
    errs = _resync_run(factory[kind](1e-3, weight_decay=0.0), None, 100, (1024, 1024),
                       sync_moments=False)
    assert errs[:, 0].max() < limit, errs[:, 0].max()
