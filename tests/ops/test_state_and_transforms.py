"""Recipe state (histories, accumulation, data parallelism, flax's delayed scaling),
transformations (jit, vmap, scan, remat, donation, sharding), the other ops, errors."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxq
from jaxq import recipes as R

DN = (((1,), (0,)), ((), ()))
SEED = np.random.SeedSequence().entropy % 2**31


def _xw(m=32, k=64, n=16, seed=SEED):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((m, k)), jnp.float32),
            jnp.asarray(rng.standard_normal((k, n)) * 0.1, jnp.float32))  # fmt: skip


def _loss(r):
    def loss(w, s, x):
        return jnp.sum(jaxq.ops.dot_general(x, w, DN, recipe=r, state=s) ** 2)

    return loss


def test_delayed_history_records_forward_and_backward_amax():
    x, w = _xw()
    r = R.FP8Delayed(history_length=3)
    _, g, s = R.value_and_grad(_loss(r))(w, r.init(), x)
    y = x @ w
    np.testing.assert_allclose(s.lhs_history, [np.abs(x).max(), 0, 0], rtol=1e-6)
    np.testing.assert_allclose(s.rhs_history, [np.abs(w).max(), 0, 0], rtol=1e-6)
    assert abs(float(s.grad_history[0]) / float(np.abs(2 * y).max()) - 1) < 0.05
    _, _, s2 = R.value_and_grad(_loss(r))(w, s, 2 * x)
    np.testing.assert_allclose(s2.lhs_history[:2], [2 * np.abs(x).max(), np.abs(x).max()],
                               rtol=1e-6)  # fmt: skip


def test_delayed_uses_history_not_current_amax():
    x, w = _xw()
    r = R.FP8Delayed(history_length=2)
    s = R.OpState(lhs_history=jnp.array([100.0, 0.0]), rhs_history=jnp.array([1.0, 0.0]),
                  grad_history=jnp.zeros(2))  # fmt: skip
    y = jaxq.ops.dot_general(x, w, DN, recipe=r, state=s)
    xd = jaxq.dequantize(jaxq.quantize(x, "e4m3", amax=jnp.float32(100.0)))
    wd = jaxq.dequantize(jaxq.quantize(w, "e4m3", amax=jnp.float32(1.0)))
    np.testing.assert_allclose(y, jnp.dot(xd, wd, precision="highest"), rtol=1e-5, atol=1e-5)


def test_matches_flax_fp8_dot_general_op():
    from flax.linen import fp8_ops

    x, w = _xw(m=16, k=64, n=32)
    hist_x = jnp.zeros(8).at[3].set(4.5).at[5].set(2.0)
    hist_w = jnp.zeros(8).at[0].set(0.37)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        op = fp8_ops.Fp8DotGeneralOp(amax_history_length=8)
        variables = op.init(jax.random.key(0), x, w, DN)
    col = dict(variables[fp8_ops.OVERWRITE_WITH_GRADIENT])
    col["input_amax_history"], col["kernel_amax_history"] = hist_x, hist_w
    y_flax = op.apply({fp8_ops.OVERWRITE_WITH_GRADIENT: col}, x, w, DN)
    r = R.FP8Delayed(history_length=8)
    s = R.OpState(lhs_history=hist_x, rhs_history=hist_w, grad_history=jnp.zeros(8))
    y = jaxq.ops.dot_general(x, w, DN, recipe=r, state=s)
    # jaxq's scale is the smallest float32 s with fl(448 s) >= amax; flax's is
    # 1 / (448 / amax): they differ by at most an ulp, which can flip a code that sits on
    # a rounding boundary. Measured: identical outputs up to float32 summation order.
    err = float(jnp.abs(y - y_flax).max() / jnp.abs(y_flax).max())
    assert err < 1e-3, err


def test_gradient_accumulation_records_max_over_microbatches():
    x, w = _xw(m=64)
    r = R.FP8Delayed(history_length=4)
    s = r.init()
    scales = [1.0, 5.0, 2.0, 0.5]  # the largest microbatch is not the last one
    grad_fn = jax.jit(jax.grad(_loss(r), argnums=(0, 1)))
    obs_total, g_total = None, 0
    for i, c in enumerate(scales):
        g, obs = grad_fn(w, s, c * x[16 * i:16 * (i + 1)])
        g_total = g_total + g
        obs_total = obs if obs_total is None else R.merge(obs_total, obs)
    s = R.update(s, obs_total)
    want = max(c * float(np.abs(x[16 * i:16 * (i + 1)]).max()) for i, c in enumerate(scales))
    np.testing.assert_allclose(float(s.lhs_history[0]), want, rtol=1e-6)
    assert float(s.lhs_history[1]) == 0.0  # one entry per optimizer step


def test_optax_multisteps_with_merged_observations():
    import optax

    x, w = _xw(m=64)
    r = R.FP8Delayed(history_length=4)
    tx = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2)
    opt, s, obs_acc = tx.init(w), r.init(), None
    for i in range(4):
        g, obs = jax.grad(_loss(r), argnums=(0, 1))(w, s, (i + 1.0) * x)
        upd, opt = tx.update(g, opt, w)
        w = w + upd
        obs_acc = obs if obs_acc is None else R.merge(obs_acc, obs)
        if i % 2 == 1:  # the optimizer stepped: commit the step's observations
            s, obs_acc = R.update(s, obs_acc), None
    np.testing.assert_allclose(s.lhs_history[:2], [4 * np.abs(x).max(), 2 * np.abs(x).max()],
                               rtol=1e-6)  # fmt: skip


def test_data_parallel_amax_is_global():
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 host devices (XLA_FLAGS from conftest)")
    mesh = jax.sharding.Mesh(np.array(devices[:8]), ("data",))
    x, w = _xw(m=64)
    x = x.at[3, 5].set(40.0)  # the largest value lives on the first shard only
    r = R.FP8Delayed(history_length=4)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    ws = jax.device_put(w, NamedSharding(mesh, P()))
    step = jax.jit(R.value_and_grad(_loss(r)))
    loss, g, s = step(ws, r.init(), xs)
    loss1, g1, s1 = jax.jit(R.value_and_grad(_loss(r)))(w, r.init(), x)
    assert float(s.lhs_history[0]) == 40.0
    np.testing.assert_allclose(s.grad_history, s1.grad_history, rtol=1e-6)
    np.testing.assert_allclose(g, g1, rtol=1e-5, atol=1e-5)
    # The loss sums over the sharded batch: the all-reduce adds the shards' partial sums
    # in another order than one device does (seen: 1.04e-6 relative), so allow 1e-5.
    np.testing.assert_allclose(loss, loss1, rtol=1e-5)


@pytest.mark.parametrize("name", ["fp8_current", "fp8_delayed", "mxfp4", "int8"])
def test_transformations(name):
    x, w = _xw(m=32, k=64, n=64)
    r = R.NAMED[name]()
    s = r.init(jax.random.key(0)) if r.needs_key else r.init()
    f = _loss(r)
    ref = jax.grad(f)(w, s, x)
    # jit + remat
    np.testing.assert_allclose(jax.jit(jax.grad(jax.checkpoint(f)))(w, s, x), ref, rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    # vmap over a batch of inputs (state broadcast)
    xb = jnp.stack([x, 2 * x])
    gv = jax.vmap(lambda xx: jax.grad(f)(w, s, xx))(xb)
    np.testing.assert_allclose(gv[0], ref, rtol=1e-5, atol=1e-6)
    # scan over layers with stacked weights and stacked states
    ws = jnp.stack([w, w * 0.5])
    ss = jax.tree.map(lambda a: jnp.stack([a, a]), s)

    def net(ws, ss, x):
        def layer(h, p):
            wl, sl = p
            return jnp.tanh(jaxq.ops.dot_general(h, wl, DN, recipe=r, state=sl)), None

        h, _ = jax.lax.scan(layer, x, (ws, ss))
        return jnp.sum(h**2)

    gw, obs = jax.jit(jax.grad(net, argnums=(0, 1)))(ws, ss, x)
    assert gw.shape == ws.shape and np.isfinite(np.asarray(gw)).all()
    new = R.update(ss, obs)
    assert jax.tree.structure(new) == jax.tree.structure(ss)
    if name == "fp8_delayed":
        assert (np.asarray(new.lhs_history[:, 0]) > 0).all()


def test_donation():
    x, w = _xw()
    r = R.FP8Delayed(history_length=4)
    step = jax.jit(R.value_and_grad(_loss(r)), donate_argnums=(1,))
    _, _, s = step(w, r.init(), x)
    _, _, s = step(w, s, x)
    assert float(s.lhs_history[1]) > 0


def test_sharded_weights_and_batch_match_unsharded():
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 host devices")
    mesh = jax.sharding.Mesh(np.array(devices[:8]).reshape(4, 2), ("data", "model"))
    x, w = _xw(m=64, k=64, n=32)
    for r in (R.FP8Current(), R.MXFP8(), R.FP8Blockwise(block_size=32)):
        f = jax.jit(jax.value_and_grad(lambda w, x, r=r: jnp.sum(
            jaxq.ops.dot_general(x, w, DN, recipe=r) ** 2)))  # fmt: skip
        xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
        ws = jax.device_put(w, NamedSharding(mesh, P(None, "model")))
        (l1, g1), (l2, g2) = f(w, x), f(ws, xs)
        np.testing.assert_allclose(l1, l2, rtol=1e-5)
        # The sharded contraction sums its partial products in another order (and XLA:CPU's
        # in-process all-reduce need not fix that order from run to run). Float32 rounding
        # then moves the gradient by ~1e-7 of max |g|, except where the different sum tips
        # an element of the quantized output gradient to the neighbouring code: that moves
        # a few entries by up to one FP8 step of their block, and every weight-gradient
        # entry that code reaches by a little (a run under load moved 2.4% of them past
        # 1e-4 with 1x32 blocks). Most entries agree to 1e-4, and the norm to 2e-3.
        d = np.abs(np.asarray(g1) - np.asarray(g2))
        top = float(jnp.abs(g1).max())
        close = np.mean(d <= 1e-4 * np.abs(np.asarray(g1)) + 1e-5 * top)
        rel = float(jnp.linalg.norm(g2 - g1) / jnp.linalg.norm(g1))
        assert close > 0.95 and d.max() < 0.05 * top and rel < 2e-3, (r.name, close, rel)


def test_einsum_matches_dot_general():
    rng = np.random.default_rng(SEED)
    x = jnp.asarray(rng.standard_normal((2, 16, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 4, 8)), jnp.float32)
    r = R.FP8Current()
    y = jaxq.ops.einsum("btd,dhk->bthk", x, w, recipe=r)
    y2 = jaxq.ops.dot_general(x, w, (((2,), (0,)), ((), ())), recipe=r)
    np.testing.assert_array_equal(y, y2)
    # batch dims, output permutation, ellipsis, implicit output, summed-out label
    q = jnp.asarray(rng.standard_normal((2, 16, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 12, 4, 8)), jnp.float32)
    for spec in ("bqhd,bkhd->bhqk", "...qhd,...khd->...hqk", "bqhd,bkhd", "bqhd,bkhd->bhq"):
        a = jaxq.ops.einsum(spec, q, k, recipe=r)
        b = jnp.einsum(spec, q, k, precision="highest")
        assert a.shape == b.shape
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 0.08
    with pytest.raises(ValueError, match="repeated labels"):
        jaxq.ops.einsum("ii,ij->j", jnp.ones((3, 3)), jnp.ones((3, 2)), recipe=r)


def test_einsum_in_nnx_einsum():
    from flax import nnx

    op = functools.partial(jaxq.ops.einsum, recipe=R.MXFP8())
    layer = nnx.Einsum("btd,dhk->bthk", (64, 4, 32), einsum_op=op, rngs=nnx.Rngs(0))
    assert layer(jnp.ones((2, 8, 64))).shape == (2, 8, 4, 32)


@pytest.mark.parametrize("name", ["fp8_current", "fp8_delayed"])
def test_conv_matches_reference(name):
    rng = np.random.default_rng(SEED)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 16)) * 0.2, jnp.float32)
    r = R.NAMED[name]()
    s = r.init()
    dn = ("NHWC", "HWIO", "NHWC")

    def ours(x, w, s):
        return jaxq.ops.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn,
                                             recipe=r, state=s)  # fmt: skip

    xd = jaxq.dequantize(jaxq.quantize(x, "e4m3"))
    wd = jaxq.dequantize(jaxq.quantize(w, "e4m3"))
    ref = jax.lax.conv_general_dilated(xd, wd, (1, 1), "SAME", dimension_numbers=dn,
                                       precision="highest")  # fmt: skip
    np.testing.assert_allclose(ours(x, w, s), ref, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda x, w: jnp.sum(ours(x, w, s) ** 2), argnums=(0, 1))(x, w)
    gr = jax.grad(lambda x, w: jnp.sum(jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=dn) ** 2), argnums=(0, 1))(x, w)  # fmt: skip
    for a, b in zip(g, gr, strict=True):
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 0.15


def test_conv_in_flax_linen_resnet_style_block():
    import flax.linen as nn

    conv = functools.partial(jaxq.ops.conv_general_dilated, recipe=R.FP8Current())

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, train=True):
            y = nn.Conv(8, (3, 3), conv_general_dilated=conv)(x)
            y = nn.BatchNorm(use_running_average=not train)(y)
            return nn.relu(y) + x

    x = jnp.ones((2, 8, 8, 8))
    v = Block().init(jax.random.key(0), x)
    y, _ = Block().apply(v, x, mutable=["batch_stats"])
    assert y.shape == x.shape


def test_ragged_dot_matches_per_group_reference():
    rng = np.random.default_rng(SEED)
    x = jnp.asarray(rng.standard_normal((12, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 32, 16)), jnp.float32)
    sizes = jnp.array([5, 0, 7], jnp.int32)
    r = R.FP8Current()
    y = jaxq.ops.ragged_dot(x, w, sizes, recipe=r)
    xd = np.asarray(jaxq.dequantize(jaxq.quantize(x, "e4m3")), np.float64)
    wd = np.asarray(jaxq.dequantize(jaxq.quantize(w, "e4m3")), np.float64)
    ref = np.concatenate([xd[:5] @ wd[0], xd[5:12] @ wd[2]])
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda w: jnp.sum(jaxq.ops.ragged_dot(x, w, sizes, recipe=r) ** 2))(w)
    assert g.shape == w.shape and float(jnp.abs(g[1]).max()) == 0.0


def test_errors_name_op_shapes_and_expectation():
    x, w = _xw()
    with pytest.raises(TypeError, match="int32"):
        jaxq.ops.dot_general(x.astype(jnp.int32), w, DN, recipe=R.FP8Current())
    with pytest.raises(ValueError, match="does not divide the contraction dimension 64"):
        jaxq.ops.dot_general(x, w, DN, recipe=R.FP8Blockwise())
    with pytest.raises(ValueError, match="contracting sizes differ"):
        jaxq.ops.dot_general(x, w[:32], DN, recipe=R.FP8Current())
    r = R.FP8Delayed(history_length=4)
    with pytest.raises(ValueError, match="needs its state"):
        jaxq.ops.dot_general(x, w, DN, recipe=r)
    with pytest.raises(ValueError, match=r"state.lhs_history has shape \(8,\)"):
        bad = R.OpState(jnp.zeros(8), jnp.zeros(4), jnp.zeros(4))
        jaxq.ops.dot_general(x, w, DN, recipe=r, state=bad)
    with pytest.raises(ValueError, match="asymmetric"):
        R.Quantizer("uint8")
    with pytest.raises(ValueError, match="fixed block size of 32"):
        R.Quantizer("mxfp8", "block", 64)
    with pytest.raises(ValueError, match="learned_step needs integer formats"):
        R.Recipe("x", R.Quantizer("e4m3"), None, None, learned_step=True)
    with pytest.raises(ValueError, match="needs key"):
        R.NVFP4().init()


def test_hadamard_is_orthogonal_and_preserves_products():
    rng = np.random.default_rng(SEED)
    for n, bs in ((64, None), (48, 16)):
        eye = jnp.eye(n)
        h = jaxq.hadamard(eye, axis=0, block_size=bs)
        np.testing.assert_allclose(h @ h.T, eye, atol=1e-6)
        np.testing.assert_allclose(jaxq.hadamard(h, axis=0, block_size=bs), eye, atol=1e-6)
    hn = jaxq.hadamard(jnp.eye(8, dtype=jnp.float64) if jax.config.x64_enabled else jnp.eye(8))
    from scipy.linalg import hadamard as scipy_hadamard

    np.testing.assert_allclose(hn, scipy_hadamard(8) / np.sqrt(8), atol=1e-6)
    x = jnp.asarray(rng.standard_normal((5, 128)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((7, 128)), jnp.float32)
    k = jax.random.key(SEED)
    xr, wr = jaxq.hadamard(x, key=k, block_size=16), jaxq.hadamard(w, key=k, block_size=16)
    np.testing.assert_allclose(xr @ wr.T, x @ w.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jaxq.hadamard(xr, key=k, block_size=16, inverse=True), x,
                               atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="power of two"):
        jaxq.hadamard(jnp.ones((3, 12)))
    with pytest.raises(ValueError, match="does not divide"):
        jaxq.hadamard(jnp.ones((3, 24)), block_size=16)


@pytest.mark.parametrize("name", ["mxfp8", "fp8_current"])
def test_scanned_layers_save_their_quantized_operands_as_integers(name):
    # Scan stacks each layer's saved operands; XLA:CPU stacks 8-bit float arrays several
    # times more slowly than integers, so FP8 codes and E8M0 scales are saved as uint8 bit
    # patterns. The gradient is the same as without scan.
    rng = np.random.default_rng(SEED)
    x = jnp.asarray(rng.standard_normal((4, 32, 64)), jnp.float32)
    ws = jnp.asarray(rng.standard_normal((2, 64, 64)) * 0.1, jnp.float32)
    r = R.NAMED[name]()
    dn = (((2,), (0,)), ((), ()))

    def loss(ws, scan):
        def layer(h, w):
            return jnp.tanh(jaxq.ops.dot_general(h, w, dn, recipe=r)), None

        if scan:
            h, _ = jax.lax.scan(layer, x, ws)
        else:
            h = x
            for i in range(ws.shape[0]):
                h, _ = layer(h, ws[i])
        return jnp.sum(h**2)

    g_scan = jax.jit(jax.grad(functools.partial(loss, scan=True)))(ws)
    g_loop = jax.jit(jax.grad(functools.partial(loss, scan=False)))(ws)
    np.testing.assert_allclose(g_scan, g_loop, rtol=1e-5, atol=1e-6)
    jaxpr = jax.make_jaxpr(jax.grad(functools.partial(loss, scan=True)))(ws).jaxpr
    stacked = {str(v.aval.dtype) for e in jaxpr.eqns if e.primitive.name == "scan"
               for v in e.outvars}  # fmt: skip
    assert "uint8" in stacked and not any("float8" in d for d in stacked), stacked
