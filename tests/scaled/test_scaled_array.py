"""ScaledArray, block scales, explicit ops, bad input, and jit/grad/vmap of scalify."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from jaxq.formats import E4M3
from jaxq.scaled import (
    ScaledArray,
    ScalifyRuleError,
    as_scaled_array,
    asarray,
    cast_on_backward,
    cast_on_forward,
    dynamic_rescale_l1,
    dynamic_rescale_l1_grad,
    dynamic_rescale_l2,
    dynamic_rescale_max,
    dynamic_rescale_max_grad,
    expand_scale,
    is_scaled,
    scalify,
    set_scaling,
    stop_scaling,
)
from jaxq.scaled import rules as scaled_rules

RNG = np.random.default_rng(1)


def _normal(*shape):
    return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


# -- ScaledArray -------------------------------------------------------------------------
def test_scaled_array_basics():
    sa = ScaledArray(jnp.ones((2, 4), jnp.float16), 2.0**-20)
    assert sa.shape == (2, 4) and sa.dtype == jnp.float16 and sa.ndim == 2 and sa.size == 8
    assert sa.aval.shape == (2, 4) and sa.aval.dtype == jnp.float16
    assert sa.scale.dtype == jnp.float32
    leaves, tree = jax.tree_util.tree_flatten(sa)
    assert len(leaves) == 2 and is_scaled(jax.tree_util.tree_unflatten(tree, leaves))
    np.testing.assert_array_equal(asarray(sa, jnp.float32), np.full((2, 4), 2.0**-20))
    assert asarray(sa).dtype == jnp.float16


def test_as_scaled_array_picks_power_of_two_rms_scale():
    x = _normal(64, 32) * 3e5
    sa = as_scaled_array(x)
    assert float(np.log2(sa.scale)) == np.round(np.log2(sa.scale))
    rms = float(jnp.sqrt(jnp.mean(sa.data**2)))
    assert 2**-0.5 <= rms < 2**0.5
    np.testing.assert_allclose(asarray(sa), x, rtol=1e-7)
    s2 = as_scaled_array(x * 2.0**-40)  # power-of-two change moves the scale only
    np.testing.assert_array_equal(s2.data, sa.data)
    assert float(s2.scale) == float(sa.scale) * 2.0**-40
    zero = as_scaled_array(jnp.zeros(4))
    assert float(zero.scale) == 1.0
    bad = as_scaled_array(jnp.array([1.0, jnp.inf]))  # inf stays visible in the data
    assert float(bad.scale) == 1.0 and bool(jnp.isinf(bad.data[1]))


def test_operators():
    a, b = _normal(4, 4), _normal(4, 4)
    sa, sb = as_scaled_array(a * 1e6), as_scaled_array(b * 1e-6)
    for got, want in [
        (sa + 1e6 * b, (a + b) * 1e6), (sa * sb, a * b), (sa @ sb, a @ b), (-sa, -a * 1e6),
        (sa / sb, a / b * 1e12), (sa - 1e6 * b, (a - b) * 1e6), (sa.T, a.T * 1e6),
        (sa[1:3], a[1:3] * 1e6), (sa.reshape(16), a.reshape(16) * 1e6), (abs(sa), abs(a) * 1e6),
        (sa.sum(axis=0), a.sum(0) * 1e6), (2.0 * sa, 2e6 * a), (sa**2, (a * 1e6) ** 2),
    ]:  # fmt: skip
        np.testing.assert_allclose(asarray(got), want, rtol=2e-5, atol=1e-30)
    np.testing.assert_array_equal(sa > 0, a > 0)


# -- block scales ---------------------------------------------------------------------------
def _blocked(x, block):
    """ScaledArray with one power-of-two scale per ``block``-sized block along axis 1."""
    m, k = x.shape
    amax = jnp.max(jnp.abs(x.reshape(m, k // block, block)), axis=-1)
    scale = 2.0 ** jnp.ceil(jnp.log2(amax))
    return ScaledArray(x / expand_scale(scale, x.shape), scale)


def test_block_scale_validation():
    ScaledArray(jnp.ones((4, 64)), jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 64\)"):
        ScaledArray(jnp.ones((4, 64)), jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="does not tile"):
        ScaledArray(jnp.ones((4, 64)), jnp.ones((2,)))


def test_block_scales_elementwise_and_matmul():
    x, y, w = _normal(4, 64), _normal(4, 64), _normal(64, 8)
    bx, by = _blocked(x, 32), _blocked(y, 32)
    assert bx.scale.shape == (4, 2)
    np.testing.assert_allclose(asarray(bx), x, rtol=1e-6)
    out = scalify(lambda a, b: jnp.tanh(a * b + a))(bx, by)
    np.testing.assert_allclose(asarray(out), jnp.tanh(x * y + x), rtol=2e-6, atol=1e-7)
    out = scalify(lambda a, b: a + b)(bx, by)
    assert out.scale.shape == (4, 2)  # per-block scale kept through elementwise ops
    t = scalify(jnp.transpose)(bx)
    assert t.scale.shape == (2, 4)
    np.testing.assert_array_equal(asarray(t), asarray(bx).T)
    # per-row (free-axis) scales carry through a matmul; contraction blocks are folded
    rows = ScaledArray(x, 2.0 ** jnp.arange(4.0).reshape(4, 1))
    out = scalify(jnp.matmul)(rows, as_scaled_array(w))
    assert out.scale.shape == (4, 1)
    np.testing.assert_allclose(asarray(out), asarray(rows) @ w, rtol=1e-5, atol=1e-5)
    out = scalify(jnp.matmul)(bx, as_scaled_array(w))
    np.testing.assert_allclose(asarray(out), x @ w, rtol=1e-5, atol=1e-5)
    # a reshape that keeps blocks contiguous keeps them (one block per row of 32)
    out = scalify(lambda a: a.reshape(8, 32) * 2)(bx)
    assert out.scale.shape == (8, 1)
    np.testing.assert_allclose(asarray(out), x.reshape(8, 32) * 2, rtol=1e-6)
    # ops without block support see one scalar scale (value unchanged)
    out = scalify(lambda a: jnp.cumsum(a, axis=1))(bx)
    assert jnp.ndim(out.scale) == 0
    np.testing.assert_allclose(asarray(out), jnp.cumsum(x, axis=1), rtol=1e-5, atol=1e-5)


def test_mismatched_block_shapes_raise():
    bx, by = _blocked(_normal(4, 64), 32), _blocked(_normal(4, 64), 16)
    with pytest.raises(ValueError, match=r"mismatched block shapes.*\(4, 2\).*\(4, 4\)"):
        scalify(jnp.add)(bx, by)


# -- explicit ops ---------------------------------------------------------------------------
def test_set_and_stop_scaling():
    x = _normal(8)
    y = scalify(lambda a: set_scaling(a, 2.0**-10))(as_scaled_array(x))
    assert float(y.scale) == 2.0**-10
    np.testing.assert_allclose(asarray(y), x, rtol=1e-7)
    z = scalify(lambda a: stop_scaling(a * 3.0) + 1.0)(as_scaled_array(x))
    assert not is_scaled(z)
    np.testing.assert_allclose(z, x * 3 + 1, rtol=1e-6)
    np.testing.assert_array_equal(set_scaling(x, 4.0), x)  # identity outside scalify
    assert stop_scaling(x, jnp.float16).dtype == jnp.float16


@pytest.mark.parametrize(
    "fn,norm",
    [
        (dynamic_rescale_l1, lambda d: np.mean(np.abs(d))),
        (dynamic_rescale_l2, lambda d: np.sqrt(np.mean(d**2))),
        (dynamic_rescale_max, lambda d: np.max(np.abs(d))),
    ],
)
def test_dynamic_rescale(fn, norm):
    x = _normal(64) * 300.0
    sa = ScaledArray(x, 1.0)
    out = scalify(fn)(sa)
    np.testing.assert_allclose(asarray(out), x, rtol=1e-7)
    assert 2**-0.5 <= norm(np.asarray(out.data)) <= 2**0.5
    np.testing.assert_array_equal(fn(x), x)  # identity on plain arrays
    z = scalify(fn)(ScaledArray(jnp.zeros(4), 2.0))  # zero norm keeps the scale
    assert float(z.scale) == 2.0


@pytest.mark.parametrize(
    "fn,norm",
    [
        (dynamic_rescale_l1_grad, lambda d: jnp.mean(jnp.abs(d))),
        (dynamic_rescale_max_grad, lambda d: jnp.max(jnp.abs(d))),
    ],
)
def test_dynamic_rescale_grad_rescales_only_the_gradient(fn, norm):
    x = as_scaled_array(_normal(16))

    def loss(a):
        return jnp.sum(fn(a) ** 2) * 0.5e-6  # gradient: a * 1e-6, a scaled tensor

    g = scalify(jax.grad(loss))(x)
    np.testing.assert_allclose(asarray(g), asarray(x) * 1e-6, rtol=1e-6)
    assert 2**-0.5 <= float(norm(g.data)) <= 2**0.5  # data renormalised
    np.testing.assert_array_equal(fn(x.data), x.data)


def test_cast_on_forward_and_backward():
    x = _normal(256) * 1e5  # beyond E4M3's range as values
    sa = as_scaled_array(x)
    y = scalify(lambda a: cast_on_forward(a, "e4m3"))(sa)
    np.testing.assert_array_equal(y.data, sa.data.astype(E4M3.dtype).astype(jnp.float32))
    assert float(y.scale) == float(sa.scale)
    assert float(jnp.max(jnp.abs(cast_on_forward(x, E4M3)))) == E4M3.max  # plain: saturates
    def loss(a):  # backward: the gradient's data is renormalised, then cast to E5M2
        return jnp.sum(dynamic_rescale_l1_grad(cast_on_backward(a, "e5m2")) ** 2) * 0.5e-9

    g = scalify(jax.grad(loss))(sa)
    np.testing.assert_allclose(asarray(g), x * 1e-9, rtol=0.13)  # E5M2: 2 mantissa bits
    np.testing.assert_array_equal(g.data, g.data.astype(jnp.float8_e5m2).astype(jnp.float32))
    with pytest.raises(TypeError, match="element format"):
        cast_on_forward(x, "mxfp8")


# -- bad input ------------------------------------------------------------------------------
def test_rule_returning_wrong_shape_or_dtype_raises():
    scaled_rules.register(lax.neg_p, lambda x: ScaledArray(x.data[:1], x.scale), override=True)
    try:
        with pytest.raises(ScalifyRuleError, match="'neg'.*shape"):
            scalify(jnp.negative)(as_scaled_array(_normal(4)))
        scaled_rules.register(
            lax.neg_p, lambda x: ScaledArray(x.data.astype(jnp.float16), x.scale), override=True
        )
        with pytest.raises(ScalifyRuleError, match="'neg'.*float16"):
            scalify(jnp.negative)(as_scaled_array(_normal(4)))
    finally:
        scaled_rules.restore(lax.neg_p)
    np.testing.assert_array_equal(asarray(scalify(jnp.negative)(ScaledArray(jnp.ones(2), 1.0))),
                                  -np.ones(2))  # fmt: skip


def test_missing_rule_raises_not_implemented():
    with pytest.raises(NotImplementedError, match="'bitcast_convert_type'"):
        scalify(lambda a: lax.bitcast_convert_type(a, jnp.int32))(as_scaled_array(_normal(4)))


def test_register_refuses_duplicates():
    with pytest.raises(ValueError, match="already has a scalify rule"):
        scaled_rules.register(lax.exp_p, lambda x: x)
    scaled_rules.register("my_test_prim", lambda x: x)
    try:
        assert "my_test_prim" in scaled_rules.registered()
        with pytest.raises(ValueError):
            scaled_rules.register("my_test_prim", lambda x: x)
        scaled_rules.register("my_test_prim", lambda x: x, override=True)
    finally:
        scaled_rules.unregister("my_test_prim")
    with pytest.raises(TypeError, match="callable"):
        scaled_rules.register("other", 3)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.inf, np.nan])
def test_bad_scales_never_propagate_silently(bad):
    with pytest.raises(ValueError, match="positive and finite"):
        ScaledArray(jnp.ones(2), bad)
    # traced bad scale (jit): the result is NaN, not silently zero or infinite
    sa = ScaledArray.tree_unflatten(None, (jnp.ones(2), jnp.float32(bad)))
    out = jax.jit(scalify(lambda a: a * 2.0 + 1.0))(sa)
    assert bool(jnp.all(jnp.isnan(asarray(out))))
    with pytest.raises(ValueError, match="positive and finite"):
        scalify(jnp.negative)(sa)


def test_scale_overflow_and_underflow_become_nan():
    big = ScaledArray(jnp.ones(2), 2.0**100)
    small = ScaledArray(jnp.ones(2), 2.0**-100)
    assert bool(jnp.all(jnp.isnan(asarray(scalify(jnp.multiply)(big, big)))))
    assert bool(jnp.all(jnp.isnan(asarray(scalify(jnp.multiply)(small, small)))))
    # and the NaN survives later rules that would otherwise hide it
    out = scalify(lambda a, b: jnp.maximum(a * a + b, 0.0))(small, ScaledArray(jnp.ones(2), 1.0))
    assert bool(jnp.all(jnp.isnan(asarray(out))))


# -- transformations ------------------------------------------------------------------------
def _f(x, w):
    return jnp.sum(jax.nn.gelu(x @ w) ** 2)


def test_jit_grad_vmap_of_scalify():
    x, w = _normal(4, 8), _normal(8, 3)
    sx, sw = as_scaled_array(x * 2.0**12), as_scaled_array(w * 2.0**-12)
    want = _f(x, w)
    got = jax.jit(scalify(_f))(sx, sw)
    np.testing.assert_allclose(asarray(got), want, rtol=1e-5)
    # grad through the interpreter: d/d data = d/d value * scale
    g = jax.grad(lambda a, b: asarray(scalify(_f)(a, b)))(sx, sw)
    gx = jax.grad(_f)(x * 2.0**12, w * 2.0**-12)
    np.testing.assert_allclose(g.data, gx * sx.scale, rtol=1e-4)
    # vmap: shared scale, and one scale per example
    xs = _normal(5, 4, 8)
    v = jax.vmap(scalify(_f), in_axes=(ScaledArray(0, None), None))(as_scaled_array(xs), sw)
    np.testing.assert_allclose(asarray(v), jax.vmap(_f, (0, None))(xs, w * 2.0**-12), rtol=1e-5)
    per = ScaledArray.tree_unflatten(None, (xs, 2.0 ** jnp.arange(5.0)))  # a batch of 5
    v = jax.vmap(scalify(_f), in_axes=(0, None))(per, sw)
    want = jax.vmap(_f, (0, None))(xs * 2.0 ** jnp.arange(5.0)[:, None, None], w * 2.0**-12)
    np.testing.assert_allclose(asarray(v), want, rtol=1e-5)


def test_scalify_inside_scan_and_remat():
    x = as_scaled_array(_normal(3, 8) * 1e4)

    def body(c, xi):
        return c + jax.checkpoint(jnp.tanh)(xi * 1e-4), None

    out, _ = scalify(lambda xs: lax.scan(body, jnp.zeros(8), xs))(x)
    np.testing.assert_allclose(asarray(out), jnp.tanh(asarray(x) * 1e-4).sum(0), rtol=2e-6)


# -- optax Adam with float16 moments ------------------------------------------------------
def test_adam_update_float16_moments():
    """Scaled float16 moments hold 1e-6-sized gradients that plain float16 loses.

    Three Adam steps with gradients of size 1e-6 (squares ~1e-12, below float16's smallest
    subnormal 6e-8). ``eps=0`` because float16 cannot hold optax's default 1e-8 either.
    """
    opt = optax.adam(1e-3, eps=0.0, mu_dtype=jnp.float16)
    ref_opt = optax.adam(1e-3, eps=0.0)  # float32 moments: the reference
    params = {"w": _normal(32, 16)}
    grads = [{"w": _normal(32, 16) * 1e-6} for _ in range(3)]
    ref_state = ref_opt.init(params)
    for g in grads:
        ref_upd, ref_state = ref_opt.update(g, ref_state, params)

    def f16(tree):
        return jax.tree.map(lambda a: a.astype(jnp.float16) if a.dtype == jnp.float32 else a, tree)

    update = scalify(opt.update)
    s_state = f16(opt.init(params))
    s_params = {"w": as_scaled_array(params["w"]).astype(jnp.float16)}
    for g in grads:
        s_upd, s_state = update({"w": as_scaled_array(g["w"]).astype(jnp.float16)}, s_state,
                                s_params)  # fmt: skip
    nu = s_state[0].nu["w"]
    assert is_scaled(nu) and nu.dtype == jnp.float16 and s_upd["w"].dtype == jnp.float16
    np.testing.assert_allclose(asarray(nu, jnp.float32), ref_state[0].nu["w"], rtol=5e-3)
    np.testing.assert_allclose(asarray(s_upd["w"], jnp.float32), ref_upd["w"], rtol=5e-3,
                               atol=1e-6)  # fmt: skip
    # plain float16 storage: nu underflows to zero and the update is NaN or wrong
    p_state = f16(opt.init(params))
    for g in grads:
        p_upd, p_state = opt.update(f16(g), p_state, f16(params))
    assert not np.any(np.asarray(p_state[0].nu["w"]))
    assert not np.allclose(np.asarray(p_upd["w"], np.float32), ref_upd["w"], rtol=5e-2)
