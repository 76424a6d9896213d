"""The unit-scaling criterion for every op: unit-variance inputs (and a unit-variance
cotangent where the op is not a loss) give output, input-gradient and weight-gradient
standard deviations within 1 +- 0.1.

The criterion concerns each op's own (unconstrained, ``constraint=None``) scale factors;
where an op's forward and backward factors coincide the default constraint meets it too,
which is tested as well. Ops whose factors necessarily differ (GELU, SiLU, softmax,
cross-entropy) trade one of them away under a constraint, which ``test_constraints``
checks exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normals, unit_grads

import jaxq.unit_scaling as us


@pytest.mark.parametrize("constraint,use_bias", [(None, False), ("to_output_scale", True)])
def test_linear(assert_unit, constraint, use_bias):
    x, w = normals(0, (512, 256), (256, 256))
    b = jnp.zeros((256,)) if use_bias else None
    f = lambda x, w, *b: us.linear(x, w, *b, constraint=constraint)
    out, grads = unit_grads(f, x, w, *([b] if use_bias else []))
    assert_unit("out", out)
    for name, g in zip(["x", "w", "b"][: len(grads)], grads, strict=True):
        assert_unit(f"grad {name}", g)


def test_linear_rectangular_unconstrained(assert_unit):
    x, w = normals(1, (512, 128), (128, 512))
    out, (gx, gw) = unit_grads(lambda x, w: us.linear(x, w, constraint=None), x, w)
    for name, t in [("out", out), ("gx", gx), ("gw", gw)]:
        assert_unit(name, t)


@pytest.mark.parametrize("mult", [1.0, 4.0])
def test_linear_readout(assert_unit, mult):
    x, w = normals(2, (512, 256), (256, 512))
    out, (gx, gw) = unit_grads(lambda x, w: us.linear_readout(x, w, mult=mult, constraint=None),
                               x, w)  # fmt: skip
    # forward carries u-muP's deliberate mult / sqrt(fan_in) on top of the unit scale
    assert_unit("out * sqrt(fan_in) / mult", out * 256**0.5 / mult)
    assert_unit("grad x", gx)
    assert_unit("grad w", gw)


@pytest.mark.parametrize(
    "sa,sb", [((4, 128, 256), (4, 256, 64)), ((4, 128, 256), (256, 64)), ((128, 256), (256, 512))]
)
def test_matmul(assert_unit, sa, sb):
    a, b = normals(3, sa, sb)
    out, (ga, gb) = unit_grads(lambda a, b: us.matmul(a, b, constraint=None), a, b)
    for name, t in [("out", out), ("ga", ga), ("gb", gb)]:
        assert_unit(name, t)


@pytest.mark.parametrize("sb", [(64, 512), (512,)])
def test_add(assert_unit, sb):
    a, b = normals(4, (64, 512), sb)
    out, (ga, gb) = unit_grads(lambda a, b: us.add(a, b, constraint=None), a, b)
    for name, t in [("out", out), ("ga", ga), ("gb", gb)]:
        assert_unit(name, t)


@pytest.mark.parametrize("tau", [0.2, 3.0])
def test_residual_split_add(assert_unit, tau):
    x, r, s = normals(5, (128, 256), (128, 256), (128, 256))
    (res, skip), (gx,) = unit_grads(lambda x: us.residual_split(x, tau), x)
    assert_unit("residual", res)
    assert_unit("skip", skip)
    assert_unit("grad x (independent branch/skip cotangents)", gx)
    out, (gr, gs) = unit_grads(lambda r, s: us.residual_add(r, s, tau), r, s)
    for name, t in [("out", out), ("gr", gr), ("gs", gs)]:
        assert_unit(name, t)
    # a whole residual block around a unit-scaled branch (independent of the skip)
    w = normals(6, (256, 256))[0]

    def block(x):
        r, s = us.residual_split(x, tau)
        return us.residual_add(us.gelu(us.linear(r, w), constraint=None), s, tau)

    out, (gx,) = unit_grads(block, x)
    assert_unit("block out", out)
    assert_unit("block grad x", gx)


@pytest.mark.parametrize("op,mult", [("gelu", 1.0), ("gelu", 0.5), ("silu", 1.0), ("silu", 2.0)])
def test_elementwise(assert_unit, op, mult):
    (x,) = normals(7, (1 << 16,))
    out, (gx,) = unit_grads(lambda x: getattr(us, op)(x, mult=mult, constraint=None), x)
    assert_unit("out", out)
    assert_unit("grad x", gx)


@pytest.mark.parametrize("mult", [1.0])
def test_silu_glu(assert_unit, mult):
    x, g = normals(8, (1 << 16,), (1 << 16,))
    out, (gx, gg) = unit_grads(lambda x, g: us.silu_glu(x, g, mult=mult), x, g)
    for name, t in [("out", out), ("gx", gx), ("ggate", gg)]:
        assert_unit(name, t)


@pytest.mark.parametrize("mult", [0.5, 1.0])
def test_softmax(assert_unit, mult):
    (x,) = normals(9, (64, 1024))
    out, (gx,) = unit_grads(lambda x: us.softmax(x, mult=mult, constraint=None), x)
    assert_unit("out", out)
    assert_unit("grad x", gx)


@pytest.mark.parametrize(
    "causal,constraint", [(False, None), (True, None), (True, "to_output_scale")]
)
def test_attention(assert_unit, causal, constraint):
    q, k, v = normals(10, *[(2, 256, 4, 64)] * 3)
    f = lambda q, k, v: us.scaled_dot_product_attention(
        q, k, v, causal=causal, constraint=constraint
    )
    out, (gq, gk, gv) = unit_grads(f, q, k, v)
    assert_unit("out", out)
    assert_unit("grad v", gv)
    if constraint is None:  # to_output_scale keeps q/k gradients exact (~ mult/sqrt(d))
        assert_unit("grad q", gq)
        assert_unit("grad k", gk)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norms(assert_unit, op):
    x, w, b = normals(11, (512, 256), (256,), (256,))
    w = 1.0 + 0.0 * w
    if op == "layer_norm":
        f = lambda x, w, b: us.layer_norm(x, w, b)
        out, (gx, gw, gb) = unit_grads(f, x, w, jnp.zeros(256))
        assert_unit("grad bias", gb)
    else:
        out, (gx, gw) = unit_grads(lambda x, w: us.rms_norm(x, w), x, w)
    assert_unit("out", out)
    assert_unit("grad x", gx)
    assert_unit("grad weight", gw)


def test_embedding(assert_unit):
    ids = jnp.asarray(np.random.default_rng(12).integers(0, 256, (64, 256)), jnp.int32)
    (table,) = normals(13, (256, 128))
    out, (gt,) = unit_grads(lambda t: us.embedding(ids, t), table)
    assert_unit("out", out)
    assert_unit("grad table", gt)


def test_cross_entropy(assert_unit):
    (logits,) = normals(14, (4096, 256))
    labels = jnp.asarray(np.random.default_rng(15).integers(0, 256, (4096,)), jnp.int32)
    g = jax.jit(jax.grad(lambda x: us.cross_entropy(x, labels)))(logits)
    assert_unit("grad logits", g)
    g_sum = jax.jit(jax.grad(lambda x: us.cross_entropy(x, labels, reduction="sum")))(logits)
    assert_unit("grad logits (sum)", g_sum)


def test_mse_loss(assert_unit):
    p, t = normals(16, (1 << 16,), (1 << 16,))
    gp, gt = jax.jit(jax.grad(lambda p, t: us.mse_loss(p, t), argnums=(0, 1)))(p, t)
    assert_unit("grad pred", gp)
    assert_unit("grad target", gt)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout(assert_unit, rate):
    (x,) = normals(17, (1 << 16,))
    out, (gx,) = unit_grads(lambda x: us.dropout(x, rate, key=jax.random.key(0)), x)
    assert_unit("out", out)
    assert_unit("grad x", gx)
