"""Unit-scaled ops against float64 numpy references; constraints; bad input; edge values;
jit/grad/vmap/scan/remat."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normals

import jaxq.unit_scaling as us
from jaxq.unit_scaling import _stats

erf = np.vectorize(math.erf)


def f64(x):
    return np.asarray(x, np.float64)


# ---------------------------------------------------------------- primitives, constraints


def test_scale_primitives_values_and_grads():
    x = jnp.array([1.0, -2.0, 3.0])
    np.testing.assert_array_equal(us.scale_fwd(x, 4.0), x * 4)
    np.testing.assert_array_equal(us.scale_bwd(x, 4.0), x)
    g = jax.grad(lambda x: (us.scale_fwd(x, 4.0) * jnp.array([1.0, 2.0, 3.0])).sum())(x)
    np.testing.assert_array_equal(g, [1.0, 2.0, 3.0])
    g = jax.grad(lambda x: (us.scale_bwd(x, 4.0) * jnp.array([1.0, 2.0, 3.0])).sum())(x)
    np.testing.assert_array_equal(g, [4.0, 8.0, 12.0])
    # traced scale, under jit/vmap/second-order grad
    h = jax.jit(jax.grad(lambda x, s: us.scale_bwd(x, s).sum()))(x, jnp.float32(0.5))
    np.testing.assert_array_equal(h, [0.5, 0.5, 0.5])
    v = jax.vmap(lambda x: us.scale_fwd(x, 2.0))(jnp.ones((3, 2)))
    np.testing.assert_array_equal(v, 2 * np.ones((3, 2)))
    hess = jax.grad(jax.grad(lambda x: us.scale_bwd(x, 3.0) ** 2))(2.0)
    assert float(hess) == 6.0
    assert us.scale_fwd(jnp.ones(2, jnp.bfloat16), 2.0).dtype == jnp.bfloat16


@pytest.mark.parametrize("s", [0.0, -1.0, float("nan"), float("inf")])
def test_scale_rejects_bad_scales(s):
    with pytest.raises(ValueError, match="scale"):
        us.scale_fwd(jnp.ones(2), s)
    with pytest.raises(ValueError, match="scale"):
        us.scale_bwd(jnp.ones(2), s)
    with pytest.raises(ValueError, match="shape"):
        us.scale_fwd(jnp.ones(2), jnp.ones(2))


def test_apply_constraint_rules():
    assert us.apply_constraint(None, 4.0, 1.0, 16.0) == (4.0, 1.0, 16.0)
    assert us.apply_constraint("to_output_scale", 4.0, 1.0, 16.0) == (4.0, 4.0, 4.0)
    assert us.apply_constraint("to_grad_input_scale", 4.0, 1.0, 16.0) == pytest.approx((4.0,) * 3)
    assert us.apply_constraint("gmean", 4.0, 1.0, 16.0) == pytest.approx((4.0,) * 3)
    assert us.apply_constraint("gmean", 8.0, 2.0) == pytest.approx((4.0, 4.0))
    with pytest.raises(ValueError, match="constraint"):
        us.apply_constraint("hmean", 1.0, 1.0)


@pytest.mark.parametrize("constraint", us.CONSTRAINTS)
def test_linear_constraint_gradient_ratio(constraint):
    """Computed input gradient = exact gradient of the scaled forward * (s_grad / s_out)."""
    x, w = normals(0, (8, 16), (16, 64))
    s_out, s_in = us.apply_constraint(constraint, 16**-0.5, 64**-0.5)
    y_ref = f64(x) @ f64(w) * s_out
    np.testing.assert_allclose(us.linear(x, w, constraint=constraint), y_ref, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda x: (us.linear(x, w, constraint=constraint) ** 2).sum())(x)
    exact = 2 * y_ref @ f64(w).T * s_out
    np.testing.assert_allclose(g, exact * s_in / s_out, rtol=1e-4, atol=1e-5)
    if constraint == "to_output_scale":
        np.testing.assert_allclose(g, exact, rtol=1e-4, atol=1e-5)


def test_gelu_default_constraint_gives_exact_gradient():
    (x,) = normals(1, (256,))
    s_out = 1 / _stats.gaussian_moments("gelu", 1.0)[0]
    ref = lambda x: s_out * jax.nn.gelu(x, approximate=False)
    np.testing.assert_allclose(us.gelu(x), ref(x), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda x: us.gelu(x).sum())(x),
                               jax.grad(lambda x: ref(x).sum())(x), rtol=1e-5)  # fmt: skip


# ---------------------------------------------------------------- float64 references


def test_gaussian_moments_against_monte_carlo():
    z = np.random.default_rng(0).standard_normal(2_000_000)
    gelu = z * 0.5 * (1 + erf(z / math.sqrt(2)))
    std, rms, grad_rms = _stats.gaussian_moments("gelu", 1.0)
    assert std == pytest.approx(gelu.std(), rel=3e-3)
    assert rms == pytest.approx(np.sqrt((gelu**2).mean()), rel=3e-3)
    phi = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    dgelu = 0.5 * (1 + erf(z / math.sqrt(2))) + z * phi
    assert grad_rms == pytest.approx(np.sqrt((dgelu**2).mean()), rel=3e-3)


def test_forward_references():
    x, w, b = normals(2, (4, 6, 32), (32, 48), (48,))
    np.testing.assert_allclose(
        us.linear(x, w, b), f64(x) @ f64(w) / math.sqrt(32) + f64(b), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        us.linear_readout(x, w, mult=2.0), f64(x) @ f64(w) * 2 / 32, rtol=1e-5, atol=1e-5
    )
    a, c = normals(3, (3, 5, 8), (8, 7))
    np.testing.assert_allclose(us.matmul(a, c), f64(a) @ f64(c) / math.sqrt(8), rtol=1e-5)
    np.testing.assert_allclose(us.add(a, a), f64(a) * math.sqrt(2), rtol=1e-6)
    r, s = normals(4, (10,), (10,))
    np.testing.assert_allclose(
        us.residual_add(r, s, 0.5), (0.5 * f64(r) + f64(s)) / math.sqrt(1.25), rtol=1e-6
    )
    xs = f64(x)
    mu, var = xs.mean(-1, keepdims=True), xs.var(-1, keepdims=True)
    np.testing.assert_allclose(us.layer_norm(x), (xs - mu) / np.sqrt(var + 1e-5), atol=1e-5)
    np.testing.assert_allclose(
        us.rms_norm(x), xs / np.sqrt((xs**2).mean(-1, keepdims=True) + 1e-5), atol=1e-5
    )
    sm = np.exp(xs) / np.exp(xs).sum(-1, keepdims=True)
    np.testing.assert_allclose(us.softmax(x), sm / _stats.softmax_stds(32, 1.0)[0], rtol=1e-5)
    labels = jnp.arange(24).reshape(4, 6) % 32
    lse = np.log(np.exp(xs).sum(-1))
    picked = np.take_along_axis(xs, np.asarray(labels)[..., None], -1)[..., 0]
    assert float(us.cross_entropy(x, labels)) == pytest.approx((lse - picked).mean(), rel=1e-5)
    assert float(us.cross_entropy(x, labels, reduction="sum")) == pytest.approx(
        (lse - picked).sum(), rel=1e-5
    )
    assert float(us.mse_loss(x, 2 * x)) == pytest.approx((xs**2).mean(), rel=1e-5)
    table = normals(5, (32, 8))[0]
    np.testing.assert_array_equal(us.embedding(labels, table), np.asarray(table)[labels])


def _attention_ref(q, k, v, causal, mult):
    q, k, v = f64(q), f64(k), f64(v)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * mult / q.shape[-1]
    if causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_reference(causal):
    q, k, v = normals(6, *[(2, 16, 2, 8)] * 3)
    out_std, _ = _stats.attention_stds(16, 16, 8, 2.0, causal)
    got = us.scaled_dot_product_attention(q, k, v, causal=causal, mult=2.0)
    np.testing.assert_allclose(got, _attention_ref(q, k, v, causal, 2.0) / out_std, rtol=1e-4,
                               atol=1e-5)  # fmt: skip


def test_dropout_mask_and_determinism():
    x = jnp.ones((1000,))
    y = us.dropout(x, 0.75, key=jax.random.key(0))
    kept = np.asarray(y) != 0
    np.testing.assert_allclose(np.asarray(y)[kept], 2.0)  # 1 / sqrt(1 - 0.75)
    assert 0.15 < kept.mean() < 0.35
    np.testing.assert_array_equal(us.dropout(x, 0.75, key=jax.random.key(0)), y)
    np.testing.assert_array_equal(us.dropout(x, 0.5, deterministic=True), x)


# ---------------------------------------------------------------- edge values


def test_edge_values():
    z = jnp.zeros((4, 16))
    assert np.all(us.layer_norm(z) == 0) and np.all(us.rms_norm(z) == 0)
    assert np.all(np.isfinite(jax.grad(lambda x: us.rms_norm(x).sum())(z)))
    assert np.all(us.linear(z, jnp.ones((16, 8))) == 0)
    nan = z.at[0, 0].set(jnp.nan)
    out = us.linear(nan, jnp.ones((16, 8)))
    assert np.isnan(out[0]).all() and np.isfinite(out[1:]).all()  # NaN is never hidden
    tiny = jnp.full((4, 16), 1e-40)  # subnormal input: layer norm stays finite
    assert np.all(np.isfinite(us.layer_norm(tiny)))
    big = jnp.full((2, 8), 3e38)
    assert np.all(np.isfinite(us.softmax(big)))
    # bad token ids / labels give NaN rather than a silently wrong value
    table = jnp.ones((4, 3))
    assert np.isnan(us.embedding(jnp.array([0, 7]), table)[1]).all()
    assert np.isnan(float(us.cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 9]))))
    # attention row with nothing visible returns zeros, not NaN
    q = jnp.ones((1, 2, 1, 4))
    out = us.scaled_dot_product_attention(q, q, q, mask=jnp.array([[False, False], [True, True]]))
    assert np.all(out[0, 0] == 0) and np.all(np.isfinite(out))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call,err,match",
    [
        (lambda: us.linear(jnp.ones((2, 3)), jnp.ones((4, 5))), ValueError, r"\(2, 3\)"),
        (lambda: us.linear(jnp.ones((2, 4)), jnp.ones((4,))), ValueError, "weight"),
        (lambda: us.linear(jnp.ones((2, 4)), jnp.ones((4, 5)), jnp.ones(4)), ValueError, "bias"),
        (lambda: us.linear(jnp.ones((2, 4), jnp.int32), jnp.ones((4, 5))), TypeError, "x"),
        (lambda: us.matmul(jnp.ones((2, 3)), jnp.ones((4, 5))), ValueError, r"\(4, 5\)"),
        (lambda: us.matmul(jnp.ones(3), jnp.ones((3, 5))), ValueError, "a must"),
        (lambda: us.add(jnp.ones(3), jnp.ones(4)), ValueError, "broadcast"),
        (lambda: us.residual_add(jnp.ones(3), jnp.ones(4)), ValueError, "skip"),
        (lambda: us.residual_split(jnp.ones(3), -1.0), ValueError, "tau"),
        (lambda: us.gelu(jnp.ones(3), mult=0.0), ValueError, "mult"),
        (lambda: us.gelu(jnp.ones(3), constraint="max"), ValueError, "constraint"),
        (lambda: us.silu_glu(jnp.ones(3), jnp.ones(4)), ValueError, "gate"),
        (lambda: us.dropout(jnp.ones(3), 1.0, key=jax.random.key(0)), ValueError, "rate"),
        (lambda: us.dropout(jnp.ones(3), 0.5), ValueError, "key"),
        (lambda: us.embedding(jnp.ones(3), jnp.ones((4, 2))), TypeError, "ids"),
        (lambda: us.embedding(jnp.ones(3, int), jnp.ones(4)), ValueError, "table"),
        (lambda: us.cross_entropy(jnp.ones((2, 4)), jnp.ones(3, int)), ValueError, "labels"),
        (lambda: us.cross_entropy(jnp.ones((2, 4)), jnp.ones(2)), TypeError, "labels"),
        (
            lambda: us.cross_entropy(jnp.ones((2, 4)), jnp.ones(2, int), reduction="max"),
            ValueError,
            "reduction",
        ),  # fmt: skip
        (lambda: us.mse_loss(jnp.ones(3), jnp.ones(4)), ValueError, "target"),
        (lambda: us.layer_norm(jnp.ones((2, 4)), jnp.ones(3)), ValueError, "weight"),
        (lambda: us.scaled_dot_product_attention(*[jnp.ones((2, 4))] * 3), ValueError, "q"),
        (
            lambda: us.scaled_dot_product_attention(
                jnp.ones((2, 1, 4)), jnp.ones((2, 1, 5)), jnp.ones((2, 1, 4))
            ),
            ValueError,
            "k",
        ),
        (lambda: us.residual_taus(0), ValueError, "num_layers"),
    ],
)
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


# ---------------------------------------------------------------- transforms


def test_transforms_jit_vmap_scan_remat():
    x, w = normals(7, (4, 8, 16), (16, 16))

    def layer(h, w):
        r, s = us.residual_split(h, 0.5)
        return us.residual_add(us.gelu(us.linear(us.rms_norm(r), w)), s, 0.5)

    def unrolled(x, w):
        h = x
        for _ in range(3):
            h = layer(h, w)
        return us.cross_entropy(h, jnp.zeros(h.shape[:-1], jnp.int32))

    def scanned(x, w):
        h, _ = jax.lax.scan(lambda h, _: (jax.checkpoint(layer)(h, w), None), x, None, length=3)
        return us.cross_entropy(h, jnp.zeros(h.shape[:-1], jnp.int32))

    g1 = jax.grad(unrolled, argnums=(0, 1))(x, w)
    g2 = jax.jit(jax.grad(scanned, argnums=(0, 1)))(x, w)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # vmap: forward values are per-example identical (factors use per-example shapes)
    np.testing.assert_allclose(jax.vmap(lambda x: layer(x, w))(x), layer(x, w), rtol=1e-5)
