"""Non-finite, zero, denormal and huge gradients never poison the quantized state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq import optim

FACTORIES = {
    "adamw_8bit": lambda: optim.adamw_8bit(1e-3, min_quantized_size=1),
    "adamw_4bit": lambda: optim.adamw_4bit(1e-3, min_quantized_size=1),
    "adamw_fp8": lambda: optim.adamw_fp8(1e-3, min_quantized_size=1),
    "lion_8bit": lambda: optim.lion_8bit(1e-4, min_quantized_size=1),
    "sgd_8bit": lambda: optim.sgd_8bit(1e-2, momentum=0.9, min_quantized_size=1),
    "fp32_state": lambda: optim.adamw_8bit(1e-3, min_quantized_size=10**9),
}


def _finite_state(state):
    for leaf in jax.tree.leaves(state):
        assert bool(jnp.all(jnp.isfinite(leaf.astype(jnp.float32)))), leaf


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_edge_gradients_keep_state_finite(name):
    tx = FACTORIES[name]()
    shape = (4, 512)
    p = jnp.ones(shape)
    state = tx.init(p)
    step = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    base = rng.standard_normal(shape).astype(np.float32) * 0.01
    # finite warm-up so moments are nonzero
    _, state = step(jnp.asarray(base), state, p)
    g = base.copy()
    g[0, :7] = [np.nan, np.inf, -np.inf, np.nan, 1e30, -1e30, 3e38]
    g[1, :] = 0.0  # an all-zero row: two all-zero blocks of 256
    g[2, :] = 1e-40  # denormal gradients
    g[3, :256] = rng.standard_normal(256) * 1e30  # huge gradients
    prev_u, prev_state = step(jnp.asarray(base), state, p)
    u, state2 = step(jnp.asarray(g), state, p)
    _finite_state(state2)
    u = np.asarray(u)
    assert np.all(np.isfinite(u))
    # non-finite elements: no Adam/Lion/SGD contribution (only the decoupled weight decay)
    decay_only = np.asarray(step(jnp.zeros(shape), tx.init(p), p)[0])[0, :4]
    np.testing.assert_allclose(u[0, :4], decay_only, atol=1e-12)
    for _ in range(3):  # keeps going from the edge state
        u, state2 = step(jnp.asarray(g), state2, p)
        _finite_state(state2)
        assert np.all(np.isfinite(np.asarray(u)))


@pytest.mark.parametrize("name", ["adamw_8bit", "adamw_4bit", "adamw_fp8", "sgd_8bit"])
def test_nonfinite_element_keeps_its_moments(name):
    tx = FACTORIES[name]()
    p = jnp.ones((2, 256))
    state = tx.init(p)
    g = jax.random.normal(jax.random.key(0), p.shape)
    _, state = jax.jit(tx.update)(g, state, p)
    bad = g.at[0, 5].set(jnp.nan)
    _, after = jax.jit(tx.update)(bad, state, p)
    _finite_state(after)
    st = after[0]
    for q in ((st.mu, st.nu) if hasattr(st, "nu") else (st.mu,)):
        assert not any(bool(jnp.isnan(x.astype(jnp.float32)).any()) for x in jax.tree.leaves(q))


def test_nonfinite_element_moment_is_held_8bit():
    tx = optim.scale_by_adam_8bit(min_quantized_size=1)
    m_codec, v_codec = optim.adam._codecs_8bit(None, None)((1024, 1024))
    p = jnp.ones((1, 256))
    g = jax.random.normal(jax.random.key(0), p.shape)
    _, s1 = tx.update(g, tx.init(p))
    _, s2 = tx.update(g.at[0, 5].set(jnp.inf), s1)
    for codec, a, b in ((m_codec, s1.mu, s2.mu), (v_codec, s1.nu, s2.nu)):
        before = float(codec.decode(a, p.shape)[0, 5])
        after = float(codec.decode(b, p.shape)[0, 5])
        scale = float(b.absmax.astype(jnp.float32)[0, 0])
        assert abs(after - before) <= 0.01 * scale  # not decayed, not updated: re-coded only
        assert before != 0


def test_all_zero_gradients_give_zero_update_and_state():
    tx = optim.adamw_8bit(1e-3, weight_decay=0.0, min_quantized_size=1)
    p = jnp.ones((8, 256))
    state = tx.init(p)
    u, state = jax.jit(tx.update)(jnp.zeros_like(p), state, p)
    assert float(jnp.abs(u).max()) == 0.0
    assert float(jnp.abs(state[0].mu.absmax.astype(jnp.float32)).max()) == 0.0
