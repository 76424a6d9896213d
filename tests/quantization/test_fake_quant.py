import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq


@pytest.mark.parametrize("fmt,kw", [("e4m3", {}), ("int4", {"block_size": 32}), ("mxfp4", {}),
                                    ("nvfp4", {}), ("uint8", {"axis": 0})])
def test_forward_is_exactly_quantize_dequantize(fmt, kw):
    x = jax.random.normal(jax.random.key(0), (8, 64))
    y = jax.jit(lambda x: jaxq.fake_quant(x, fmt, **kw))(x)
    np.testing.assert_array_equal(y, jaxq.dequantize(jaxq.quantize(x, fmt, **kw)))


def test_identity_ste_gradient():
    x = jax.random.normal(jax.random.key(1), (16, 32))
    w = jax.random.normal(jax.random.key(2), (16, 32))
    g = jax.grad(lambda x: jnp.sum(w * jaxq.fake_quant(x, "int4", block_size=32)))(x)
    np.testing.assert_array_equal(g, w)


def test_clipped_ste_gradient_masks_outside_range():
    x = jnp.array([[0.1, -0.9, 3.0, -5.0], [0.2, 0.3, -0.4, 2.0]])
    amax = jnp.array([[1.0], [0.5]])
    f = lambda x: jnp.sum(jaxq.fake_quant(x, "int8", axis=0, amax=amax, ste="clipped"))
    g = jax.grad(f)(x)
    np.testing.assert_array_equal(g, [[1, 1, 0, 0], [1, 1, 1, 0]])
    # The percentile clip bound of a group is respected too.
    xs = jnp.concatenate([jnp.linspace(-1, 1, 999), jnp.array([50.0])])
    g = jax.grad(lambda x: jnp.sum(jaxq.fake_quant(
        x, "int8", calibration=jaxq.Percentile(99.0), ste="clipped")))(xs)
    assert float(g[-1]) == 0.0 and float(g[500]) == 1.0


def test_fake_quant_vmap_jit_scan_and_stochastic():
    x = jax.random.normal(jax.random.key(3), (4, 8, 32))
    f = lambda x: jaxq.fake_quant(x, "e2m1", block_size=32)
    np.testing.assert_array_equal(jax.vmap(f)(x), jnp.stack([f(r) for r in x]))
    gv = jax.vmap(jax.grad(lambda r: jnp.sum(f(r) ** 2)))(x)
    np.testing.assert_allclose(gv, 2 * jax.vmap(f)(x))
    _, ys = jax.lax.scan(lambda c, r: (c, jax.checkpoint(f)(r)), 0, x)
    np.testing.assert_array_equal(ys, jax.vmap(f)(x))
    k = jax.random.key(0)
    ys = jaxq.fake_quant(x, "e2m1", block_size=32, rounding="stochastic", key=k)
    assert not np.array_equal(ys, f(x))


def _lsq_reference(x, s, qn, qp, g):
    """LSQ forward and gradients in float64 (Esser et al. 2020, eqs. 1-3 and 5)."""
    v = x / s
    q = np.round(np.clip(v, qn, qp))
    inside = (v >= qn) & (v <= qp)
    dx = g * inside
    ds_elem = np.where(inside, q - v, np.where(v < qn, qn, qp))
    gs = 1.0 / np.sqrt(x.size / np.size(s) * qp)
    return q * s, dx, ds_elem * g * gs


def test_lsq_matches_reference_per_tensor_and_per_channel():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 8)).astype(np.float32) * 2
    g = rng.standard_normal((32, 8)).astype(np.float32)
    for s in (np.float32(0.3), (rng.uniform(0.1, 0.5, (1, 8))).astype(np.float32)):
        y, vjp = jax.vjp(lambda x, s: jaxq.lsq_quant(x, s, "int4"), jnp.asarray(x), jnp.asarray(s))
        dx, ds = vjp(jnp.asarray(g))
        ry, rdx, rds = _lsq_reference(x.astype(np.float64), s.astype(np.float64), -7, 7, g)
        np.testing.assert_allclose(y, ry, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(dx, rdx)
        rds = rds.sum() if np.ndim(s) == 0 else rds.sum(0, keepdims=True)
        np.testing.assert_allclose(ds, rds, rtol=1e-4, atol=1e-6)


def test_lsq_float_format_and_errors():
    x = jnp.array([0.26, 1.3, 100.0])
    np.testing.assert_allclose(jaxq.lsq_quant(x, jnp.float32(0.5), "e2m1"), [0.25, 1.5, 3.0])
    with pytest.raises(ValueError, match="does not broadcast"):
        jaxq.lsq_quant(jnp.ones((4, 3)), jnp.ones((4,)), "int4")
    with pytest.raises(ValueError, match="block format"):
        jaxq.lsq_quant(jnp.ones(4), jnp.float32(1.0), "mxfp4")
    with pytest.raises(TypeError, match="step"):
        jaxq.lsq_quant(jnp.ones(4), jnp.int32(1), "int4")


def test_lsq_learns_a_step():
    x = jax.random.normal(jax.random.key(0), (4096,))
    loss = lambda s: jnp.mean((jaxq.lsq_quant(x, s, "int4") - x) ** 2)
    s = jnp.float32(2.0)
    for _ in range(200):
        s = s - 0.5 * jax.grad(loss)(s) * jnp.sqrt(4096 * 7.0)
    assert float(loss(s)) < 0.5 * float(loss(jnp.float32(2.0)))
