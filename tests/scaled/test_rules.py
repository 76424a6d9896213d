"""Per-primitive scalify rules against the unscaled computation.

For each op: inputs are represented as ScaledArrays with several scales (powers of two
far from 1, and a non-power-of-two), the scalified value ``data * scale`` must equal the
plain float32 computation, and the primitive under test must appear in the traced jaxpr
(so no case passes vacuously).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend import core as jex

from jaxq.scaled import as_scaled_array, asarray, is_scaled, scalify

RNG = np.random.default_rng(0)
SCALES = (2.0**-20, 3.0)  # far from 1, and not a power of two


def _prims(fn, *args):
    """Names of all primitives in fn's jaxpr, nested jaxprs included."""
    names = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for v in eqn.params.values():
                for sub in v if isinstance(v, tuple | list) else (v,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


def _normal(*shape):
    return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def _pos(*shape):
    return jnp.asarray(RNG.uniform(0.1, 3.0, shape), jnp.float32)


def _check(fn, args, prim, *, scaled=None, rtol=1e-6, atol=0.0, scale=2.0**13):
    """Scalified fn on scaled versions of ``args`` equals fn on args."""
    assert prim in _prims(fn, *args), f"{prim} not in jaxpr of the test function"
    scaled = range(len(args)) if scaled is None else scaled
    if np.log2(scale) != np.round(np.log2(scale)):
        rtol = max(rtol, 1e-5)  # data = x / scale is rounded once, then amplified
    sargs = [
        as_scaled_array(a, scale=scale) if i in scaled and jnp.issubdtype(a.dtype, jnp.floating)
        else a
        for i, a in enumerate(args)
    ]
    want = jax.tree_util.tree_leaves(fn(*args))
    got = jax.tree_util.tree_leaves(scalify(fn)(*sargs), is_leaf=is_scaled)
    assert len(want) == len(got)
    for w, g in zip(want, got, strict=True):
        gv = asarray(g, jnp.float32) if is_scaled(g) else g
        assert np.shape(gv) == np.shape(w)
        if jnp.issubdtype(jnp.result_type(w), jnp.floating):
            np.testing.assert_allclose(np.asarray(gv), np.asarray(w), rtol=rtol, atol=atol)
        else:
            np.testing.assert_array_equal(np.asarray(gv), np.asarray(w))
    return got


X, Y = _normal(6, 8), _normal(6, 8)
P1 = _pos(6, 8)

UNARY = [
    ("neg", jnp.negative, X, 0),
    ("abs", jnp.abs, X, 0),
    ("sign", jnp.sign, X, 0),
    ("exp", jnp.exp, X, 2e-6),
    ("log", jnp.log, P1, 2e-6),
    ("tanh", jnp.tanh, X, 2e-6),
    ("logistic", jax.nn.sigmoid, X, 2e-6),
    ("erf", lax.erf, X, 2e-6),
    ("sqrt", jnp.sqrt, P1, 2e-7),
    ("rsqrt", lax.rsqrt, P1, 2e-7),
    ("integer_pow", lambda x: x**3, X, 2e-7),
    ("integer_pow", lambda x: lax.integer_pow(x, -2), P1, 2e-7),
    ("square", jnp.square, X, 0),
    ("pow", lambda x: x**1.5, P1, 4e-6),
    ("copy", lambda x: jnp.array(x, copy=True), X, 0),
    ("stop_gradient", lax.stop_gradient, X, 0),
    ("cumsum", lambda x: jnp.cumsum(x, axis=1), X, 2e-6),
    ("cummax", lambda x: lax.cummax(x, axis=0), X, 0),
    ("reduce_sum", lambda x: jnp.sum(x, axis=1), X, 2e-6),
    ("reduce_sum", jnp.sum, X, 2e-6),
    ("reduce_max", lambda x: jnp.max(x, axis=0), X, 0),
    ("reduce_min", jnp.min, X, 0),
    ("argmax", lambda x: jnp.argmax(x, axis=1), X, 0),
    ("argmin", lambda x: jnp.argmin(x, axis=0), X, 0),
    ("broadcast_in_dim", lambda x: jnp.broadcast_to(x[:, None, :], (6, 3, 8)), X, 0),
    ("reshape", lambda x: x.reshape(12, 4), X, 0),
    ("squeeze", lambda x: lax.squeeze(x[None], (0,)), X, 0),
    ("broadcast_in_dim", lambda x: jnp.expand_dims(x, 1), X, 0),
    ("transpose", jnp.transpose, X, 0),
    ("rev", lambda x: x[::-1], X, 0),
    ("slice", lambda x: x[1:4, 2:7:2], X, 0),
    ("dynamic_slice", lambda x: lax.dynamic_slice(x, (jnp.int32(1), jnp.int32(2)), (3, 4)), X, 0),
    ("gather", lambda x: x[jnp.array([4, 0, 2])], X, 0),
    ("pad", lambda x: jnp.pad(x, ((1, 2), (0, 1)), constant_values=0.5), X, 0),
    ("split", lambda x: jnp.split(x, 2, axis=1), X, 0),
    ("top_k", lambda x: lax.top_k(x, 3), X, 0),
    ("convert_element_type", lambda x: (x * 10).astype(jnp.int32), X, 0),
    ("custom_jvp_call", jax.nn.relu, X, 0),
    ("erfc", lambda x: jax.nn.gelu(x, approximate=False), X, 2e-6),
    ("tanh", jax.nn.gelu, X, 2e-6),
    ("exp", lambda x: jax.nn.softmax(x, axis=-1), X, 2e-6),
    ("log", lambda x: jax.nn.log_softmax(x, axis=-1), X, 2e-6),
    ("is_finite", jnp.isfinite, X, 0),
    ("iota", lambda x: x + jnp.arange(8, dtype=jnp.float32), X, 0),
    ("sin", jnp.sin, X, 2e-6),
]


@pytest.mark.parametrize("prim,fn,x,rtol", UNARY, ids=[f"{u[0]}-{i}" for i, u in enumerate(UNARY)])
@pytest.mark.parametrize("scale", SCALES)
def test_unary(prim, fn, x, rtol, scale):
    _check(fn, (x,), prim, rtol=rtol, scale=scale, atol=1e-30)


BINARY = [
    ("add", jnp.add, X, Y),
    ("sub", jnp.subtract, X, Y),
    ("mul", jnp.multiply, X, Y),
    ("div", jnp.divide, X, P1),
    ("max", jnp.maximum, X, Y),
    ("min", jnp.minimum, X, Y),
    ("pow", jnp.power, P1, Y),
    ("atan2", jnp.arctan2, X, Y),
    ("lt", jnp.less, X, Y),
    ("ge", jnp.greater_equal, X, Y),
    ("eq", lambda a, b: a == jnp.round(b), X, Y),
    ("select_n", lambda a, b: jnp.where(a > 0, a, b), X, Y),
    ("concatenate", lambda a, b: jnp.concatenate([a, b], axis=0), X, Y),
    ("dynamic_update_slice", lambda a, b: lax.dynamic_update_slice(a, b[:2, :3], (1, 2)), X, Y),
    ("scatter-add", lambda a, b: a.at[jnp.array([0, 2, 0])].add(b[:3]), X, Y),
    ("scatter", lambda a, b: a.at[jnp.array([1, 3])].set(b[:2]), X, Y),
    ("dot_general", lambda a, b: a @ b.T, X, Y),
    ("clamp", lambda a, b: lax.clamp(-0.5, a, 0.5), X, Y),
]


@pytest.mark.parametrize("prim,fn,a,b", BINARY, ids=[f"{u[0]}-{i}" for i, u in enumerate(BINARY)])
@pytest.mark.parametrize("which", [(0, 1), (0,), (1,)], ids=["both", "lhs", "rhs"])
def test_binary(prim, fn, a, b, which):
    got = _check(fn, (a, b), prim, scaled=which, rtol=2e-6, atol=1e-30, scale=2.0**-17)
    if prim == "clamp" and which == (1,):
        assert not any(is_scaled(g) for g in jax.tree_util.tree_leaves(got, is_leaf=is_scaled))


@pytest.mark.parametrize(
    "spec,shapes,k",
    [
        ("ij,jk->ik", ((5, 7), (7, 3)), 7),
        ("bij,bjk->bik", ((2, 5, 7), (2, 7, 3)), 7),  # batched (attention)
        ("ijk,jkl->il", ((4, 3, 5), (3, 5, 2)), 15),  # two contracting dims
        ("bhqd,bhkd->bhqk", ((2, 3, 4, 8), (2, 3, 5, 8)), 8),
        ("i,i->", ((16,), (16,)), 16),
    ],
)
def test_dot_general(spec, shapes, k):
    a, b = _normal(*shapes[0]), _normal(*shapes[1])
    fn = lambda x, y: jnp.einsum(spec, x, y)  # noqa: E731
    got = _check(fn, (a, b), "dot_general", rtol=1e-5, atol=1e-6 * 2.0**26)
    # scale = sa * sb * r(sqrt K): data is the plain dot divided by r(sqrt K)
    assert float(got[0].scale) == 2.0**26 * 2.0 ** np.round(np.log2(np.sqrt(k)))


def test_dot_general_scale_rule():
    a, b = _normal(8, 64), _normal(64, 8)
    sa, sb = as_scaled_array(a, scale=2.0**-3), as_scaled_array(b, scale=2.0**5)
    out = scalify(jnp.matmul)(sa, sb)
    assert float(out.scale) == 2.0**-3 * 2.0**5 * 8.0  # r(sqrt(64)) = 8
    np.testing.assert_allclose(out.data, (sa.data @ sb.data) / 8.0, rtol=1e-6)


def test_add_and_reduce_scale_rules():
    a = as_scaled_array(_normal(16), scale=2.0**4)
    b = as_scaled_array(_normal(16), scale=2.0**1)
    out = scalify(jnp.add)(a, b)
    assert float(out.scale) == 16.0  # r(sqrt(256 + 4)) = 16
    out = scalify(jnp.add)(a, a)
    assert float(out.scale) == 32.0  # r(sqrt(2) * 16): tie rounds up
    out = scalify(jnp.sum)(as_scaled_array(_normal(100), scale=2.0**-3))
    assert float(out.scale) == 2.0**-3 * 8.0  # r(sqrt(100)) = 8 (log2 10 = 3.32)
    out = scalify(lambda x: x * 0.375)(a)  # plain scalar: 0.375 = 0.75 * 2^-1
    assert float(out.scale) == 8.0
    out = scalify(lambda x: x / 0.375)(a)  # divisor: 0.375 = 1.5 * 2^-2
    assert float(out.scale) == 64.0


def test_conv_general_dilated():
    x, w = _normal(2, 3, 9, 9), _normal(4, 3, 3, 3)
    fn = lambda a, b: lax.conv_general_dilated(a, b, (1, 1), "SAME")  # noqa: E731
    got = _check(fn, (x, w), "conv_general_dilated", rtol=1e-5, atol=1e-5 * 2.0**26)
    assert float(got[0].scale) == 2.0**26 * 4.0  # K = 3*3*3 = 27, r(sqrt 27) = 4


def _fori(x):
    return lax.fori_loop(0, 3, lambda i, c: c * 1.5 + x, jnp.zeros_like(x))


def _while(x):
    return lax.while_loop(lambda c: c[0] < 4, lambda c: (c[0] + 1, jnp.tanh(c[1]) * 2), (0, x))[1]


def _scan(x):
    def body(c, xi):
        c = c + xi * 2.0
        return c, jnp.sin(c) * 3.0

    return lax.scan(body, jnp.zeros(x.shape[1]), x)


@jax.custom_vjp
def _custom(x):
    return jnp.sin(x) * 2.0


_custom.defvjp(lambda x: (_custom(x), x), lambda x, g: (g * 2.0 * jnp.cos(x),))

CONTROL = [
    ("jit", jax.jit(lambda x: x * 2 + 1)),
    ("remat2", jax.checkpoint(lambda x: jnp.sin(x) * x)),
    ("scan", _fori),
    ("while", _while),
    ("scan", _scan),
    ("scan", lambda x: lax.scan(lambda c, xi: (c * xi, c), jnp.ones(8), x, reverse=True)),
    ("cond", lambda x: lax.cond(x.sum() > 0, lambda a: a * 2, lambda a: -a, x)),
    ("cond", lambda x: lax.cond(x.sum() < 0, lambda a: a, lambda a: jnp.ones_like(a), x)),
    ("custom_vjp_call", _custom),
]


@pytest.mark.parametrize("prim,fn", CONTROL, ids=[f"{c[0]}-{i}" for i, c in enumerate(CONTROL)])
def test_control_flow(prim, fn):
    _check(fn, (X,), prim, rtol=2e-6, atol=1e-30)


def test_scan_ys_get_per_step_scales():
    _, ys = scalify(_scan)(as_scaled_array(X, scale=2.0**10))
    assert ys.scale.shape == (6, 1)  # one scale per iteration, a per-block scale
    np.testing.assert_allclose(asarray(ys), _scan(X)[1], rtol=2e-6)


def test_plain_inputs_give_plain_outputs():
    out = scalify(lambda x, y: (x @ y, jnp.tanh(x)))(X, Y.T)
    assert not any(is_scaled(o) for o in out)
    np.testing.assert_array_equal(out[0], X @ Y.T)


def test_float16_data_no_overflow():
    """Plain float16 overflows at 1e6; a scaled float16 tensor does not."""
    x = jnp.asarray(RNG.standard_normal((16, 16)) * 1e6, jnp.float32)
    sa = as_scaled_array(x.astype(jnp.float32)).astype(jnp.float16)
    assert not bool(jnp.isfinite(x.astype(jnp.float16) @ x.astype(jnp.float16)).any())
    out = scalify(lambda a: a @ a.T)(sa)
    want = np.asarray(x, np.float64) @ np.asarray(x, np.float64).T
    assert out.dtype == jnp.float16 and bool(jnp.isfinite(out.data).all())
    err = np.linalg.norm(asarray(out, jnp.float32) - want) / np.linalg.norm(want)
    assert err < 2e-3


EDGE = jnp.array([0.0, -0.0, 1.0, -3.0e38, 3.0e38, jnp.inf, -jnp.inf, jnp.nan], jnp.float32)


@pytest.mark.parametrize(
    "prim,fn",
    [
        ("add", lambda x: x + 1.0),
        ("mul", lambda x: x * -2.0),
        ("max", jax.nn.relu),
        ("abs", jnp.abs),
        ("exp", jnp.exp),
        ("tanh", jnp.tanh),
        ("reduce_max", lambda x: jnp.max(x[:5])),
        ("select_n", lambda x: jnp.where(jnp.isnan(x), 0.0, x)),
        ("div", lambda x: x / 7.0),
        ("sign", jnp.sign),
    ],
)
def test_edge_values(prim, fn):
    """0, -0, +-max, +-inf and NaN give what plain float32 gives."""
    _check(fn, (EDGE,), prim, scale=1.0, rtol=1e-6)
    _check(fn, (EDGE,), prim, scale=2.0**4, rtol=1e-6)  # data stays finite: 3e38 / 16


@pytest.mark.parametrize(
    "prim,fn",
    [
        ("reduce_precision", lambda x: lax.reduce_precision(x, exponent_bits=5, mantissa_bits=2)),
        ("convert_element_type", lambda x: x.astype(jnp.float16).astype(jnp.float32)),
    ],
)
def test_casts_change_data_only(prim, fn):
    """A cast rounds the data, not the value: 1e6-sized values survive a float16 cast."""
    x = _normal(6, 8) * 1e6
    sa = as_scaled_array(x)
    assert prim in _prims(fn, x)
    out = scalify(fn)(sa)
    assert float(out.scale) == float(sa.scale)
    np.testing.assert_array_equal(out.data, fn(sa.data))
    np.testing.assert_allclose(asarray(out), x, rtol=2**-2)
    assert not bool(jnp.isfinite(fn(x)).all())  # the plain cast overflows


@pytest.mark.parametrize("c", [0.1, -24.0, 3.0, 1e-30])
def test_literal_factors_are_split_when_tracing(c):
    """A literal factor's power-of-two split is done on the host: the traced program holds
    no bit manipulation for it (only the product with the scale and its NaN guard), and
    the result equals the value computed in float64."""
    x = as_scaled_array(_normal(4, 8) * 3.0)
    fn = scalify(lambda v: v * c)
    assert not {"bitcast_convert_type", "shift_right_logical"} & _prims(fn, x)
    y = jax.jit(fn)(x)
    ref = np.asarray(asarray(x), np.float64) * np.float64(np.float32(c))
    np.testing.assert_allclose(np.asarray(asarray(y), np.float64), ref, rtol=1e-7)
    m, e = np.frexp(np.float32(c))
    assert float(y.scale) == float(x.scale) * 2.0 ** int(e)  # m in [0.5, 1) stays in the data


def test_unit_scales_of_nonlinear_outputs_stay_constants():
    """A nonlinear op's output scale is the constant 1: later scale arithmetic on it is
    done when tracing (no scalar ops on scales in the program), and the scale returned
    from ``scalify`` is a JAX array all the same."""
    x = as_scaled_array(_normal(4, 8))
    fn = scalify(lambda v: jnp.tanh(v) * 3.0 + jnp.exp(v) * 0.25)
    closed = jax.make_jaxpr(fn)(x)
    scalar_ops = [e.primitive.name for e in closed.jaxpr.eqns if e.outvars[0].aval.shape == ()]
    assert scalar_ops == ["is_finite", "gt", "and", "select_n"], scalar_ops  # the input guard
    assert isinstance(closed.jaxpr.outvars[1], jex.Literal)  # the output scale: a constant
    y = fn(x)
    assert isinstance(y.scale, jax.Array) and y.scale.dtype == jnp.float32
    v = np.asarray(asarray(x), np.float64)
    ref = np.tanh(v) * 3.0 + np.exp(v) * 0.25  # terms of opposite signs: an absolute bound
    np.testing.assert_allclose(np.asarray(asarray(y), np.float64), ref, rtol=1e-6, atol=1e-6)
