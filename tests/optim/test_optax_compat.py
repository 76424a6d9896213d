"""Composition with optax, shapes, recompilation, 32-bit selection, bytes per parameter."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxq import optim

FACTORIES = {
    "adamw_8bit": lambda **kw: optim.adamw_8bit(1e-3, **kw),
    "adamw_4bit": lambda **kw: optim.adamw_4bit(1e-3, **kw),
    "adamw_fp8": lambda **kw: optim.adamw_fp8(1e-3, **kw),
    "adam_8bit": lambda **kw: optim.adam_8bit(1e-3, **kw),
    "lion_8bit": lambda **kw: optim.lion_8bit(1e-4, **kw),
    "sgd_8bit": lambda **kw: optim.sgd_8bit(1e-2, momentum=0.9, **kw),
}


def _params():
    k = jax.random.key(0)
    return {
        "dense": {"kernel": jax.random.normal(k, (64, 256)), "bias": jnp.zeros((256,))},
        "proj": jax.random.normal(k, (3, 40, 128)),
        "scale": jnp.ones(()),
    }


def _grads(params, i):
    return jax.tree.map(lambda p: jax.random.normal(jax.random.key(i), p.shape), params)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_no_recompilation_and_stable_state(name):
    tx = FACTORIES[name](min_quantized_size=1024)
    params = _params()
    traces = []

    @jax.jit
    def step(p, s, g):
        traces.append(1)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(tx.init, params)) == shapes
    for i in range(3):
        params, state = step(params, state, _grads(params, i))
        assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes
    assert len(traces) == 1
    assert all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in jax.tree.leaves(state))


def test_inject_hyperparams_no_recompilation():
    tx = optax.inject_hyperparams(optim.adamw_8bit)(learning_rate=1e-3, weight_decay=0.1)
    params = _params()
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(p, s, g):
        traces.append(1)
        return tx.update(g, s, p)

    g = _grads(params, 0)
    u1, _ = step(params, state, g)
    state.hyperparams["learning_rate"] = jnp.asarray(2e-3, jnp.float32)
    state.hyperparams["b1"] = jnp.asarray(0.8, jnp.float32)
    u2, _ = step(params, state, g)
    assert len(traces) == 1
    k = ("dense", "kernel")
    assert not np.allclose(np.asarray(u1[k[0]][k[1]]), np.asarray(u2[k[0]][k[1]]))
    # a static option passed explicitly must be declared static
    bad = optax.inject_hyperparams(optim.adamw_8bit)(1e-3, block_size=128)
    with pytest.raises(TypeError, match="static_args"):
        jax.jit(bad.update)(g, bad.init(params), params)
    ok = optax.inject_hyperparams(optim.adamw_8bit, static_args=("block_size",))(
        1e-3, block_size=128)
    jax.jit(ok.update)(g, ok.init(params), params)


def test_matches_optax_semantics_schedule_decay_mask():
    sched = optax.linear_schedule(1e-3, 1e-4, 10)
    mask = {"dense": {"kernel": True, "bias": False}, "proj": True, "scale": False}
    params = _params()
    # min_quantized_size huge -> all float32 state: must equal optax.adamw exactly-ish
    ours = optim.adamw_8bit(sched, weight_decay=0.1, mask=mask, min_quantized_size=10**9)
    ref = optax.adamw(sched, weight_decay=0.1, mask=mask)
    s1, s2 = ours.init(params), ref.init(params)
    for i in range(4):
        g = _grads(params, i)
        u1, s1 = ours.update(g, s1, params)
        u2, s2 = ref.update(g, s2, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), u1, u2)
        params = optax.apply_updates(params, u1)


def test_chain_multisteps_apply_if_finite_masked():
    params = _params()
    tx = optax.chain(optax.clip_by_global_norm(1.0), optim.adamw_8bit(1e-3, min_quantized_size=1))
    tx = optax.MultiSteps(tx, every_k_schedule=2)
    s = tx.init(params)
    step = jax.jit(tx.update)
    for i in range(4):
        u, s = step(_grads(params, i), s, params)
        params = optax.apply_updates(params, u)
    fin = optax.apply_if_finite(optim.adamw_4bit(1e-3, min_quantized_size=1), 2)
    s = fin.init(params)
    g = _grads(params, 0)
    g["proj"] = g["proj"].at[0, 0, 0].set(jnp.nan)
    u, s = jax.jit(fin.update)(g, s, params)
    assert int(s.notfinite_count) == 1
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))
    m = optax.masked(optim.adamw_8bit(1e-3, min_quantized_size=1),
                     {"dense": {"kernel": True, "bias": False}, "proj": True, "scale": False})
    s = m.init(params)
    u, s = jax.jit(m.update)(_grads(params, 1), s, params)
    np.testing.assert_array_equal(u["scale"], _grads(params, 1)["scale"])


def test_keep_fp32_and_min_size():
    params = _params()
    st = optim.adamw_8bit(1e-3, min_quantized_size=1000).init(params)[0]
    assert isinstance(st.mu["dense"]["kernel"], optim.QuantizedMoment)
    assert st.mu["dense"]["bias"].dtype == jnp.float32  # 256 < 1000
    assert st.mu["scale"].dtype == jnp.float32
    st = optim.adamw_8bit(1e-3, min_quantized_size=1,
                          keep_fp32=lambda path, p: path.startswith("proj")).init(params)[0]
    assert st.mu["proj"].dtype == jnp.float32 and st.nu["proj"].dtype == jnp.float32
    assert isinstance(st.mu["dense"]["bias"], optim.QuantizedMoment)
    tree = {"dense": {"kernel": True, "bias": False}, "proj": False, "scale": False}
    st = optim.adamw_4bit(1e-3, min_quantized_size=1, keep_fp32=tree).init(params)[0]
    assert st.mu["dense"]["kernel"].dtype == jnp.float32
    assert isinstance(st.nu["proj"], optim.Rank1Moment)
    assert isinstance(st.nu["dense"]["bias"], optim.QuantizedMoment)
    with pytest.raises(ValueError, match="keep_fp32"):
        optim.adamw_8bit(1e-3, keep_fp32={"a": True}).init(params)
    with pytest.raises(ValueError, match="block_size"):
        optim.adamw_4bit(1e-3, block_size=3)
    with pytest.raises(ValueError, match="min_quantized_size"):
        optim.adamw_8bit(1e-3, min_quantized_size=-1)
    with pytest.raises(ValueError, match="momentum"):
        optim.sgd_8bit(1e-2, momentum=None)
    with pytest.raises(ValueError, match="scale_dtype"):
        optim.adamw_8bit(1e-3, scale_dtype=jnp.float16).init(params)


def test_bytes_per_parameter():
    params = {f"w{i}": jax.ShapeDtypeStruct((1024, 1024), jnp.float32) for i in range(16)}
    n = 16 * 1024 * 1024
    for name, limit, low in (("adamw_8bit", 2.02, 2.0), ("adamw_4bit", 1.07, 1.0),
                             ("adamw_fp8", 2.02, 2.0)):
        shapes = jax.eval_shape(FACTORIES[name]().init, params)
        per = optim.state_nbytes(shapes) / n
        assert low < per <= limit, (name, per)
    shapes = jax.eval_shape(optim.adamw_8bit(1e-3, scale_dtype=jnp.float32).init, params)
    assert abs(optim.state_nbytes(shapes) / n - (2 + 8 / 256)) < 1e-5
    assert abs(optim.state_nbytes(jax.eval_shape(optax.adamw(1e-3).init, params)) / n - 8) < 1e-6
    st = optim.adamw_4bit(1e-3).init({"w": jnp.zeros((1024, 1024))})
    assert st[0].mu["w"].codes.shape == (1024, 512) and st[0].mu["w"].codes.dtype == jnp.uint8
    assert st[0].nu["w"].codes.shape == (1024, 512)


def test_state_nbytes_counts_typed_keys_and_shape_structs():
    keys = jax.random.split(jax.random.key(0), 3)  # threefry: 2 x uint32 each
    tree = {"k": keys, "raw": jax.random.PRNGKey(1), "x": jnp.zeros((5,), jnp.bfloat16),
            "step": 7, "none": None}
    assert optim.state_nbytes(tree) == 3 * 8 + 8 + 10
    # eval_shape turns the Python int into an int32 array: 4 more bytes.
    assert optim.state_nbytes(jax.eval_shape(lambda: tree)) == 3 * 8 + 8 + 10 + 4


@pytest.mark.parametrize("shape", [(1024, 16, 64), (4096, 64), (1024, 300), (1000, 300)])
def test_short_last_axes_cost_no_padding(shape):
    """Short last axes are merged into longer rows instead of padded to a block per row."""
    p = jax.ShapeDtypeStruct(shape, jnp.float32)
    per_param = {}
    for name, f in [("8bit", optim.adamw_8bit), ("fp8", optim.adamw_fp8)]:
        state = jax.eval_shape(f(1e-3).init, p)
        nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
        per_param[name] = nbytes / p.size
    assert max(per_param.values()) <= 2.02, per_param
    state = jax.eval_shape(optim.adamw_4bit(1e-3).init, p)
    four = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / p.size
    assert four <= 1.1, four


INJECTABLE = {
    "adamw_8bit": (optim.adamw_8bit, dict(learning_rate=1e-3, b1=0.9)),
    "adamw_4bit": (optim.adamw_4bit, dict(learning_rate=1e-3, b1=0.9)),
    "adamw_fp8": (optim.adamw_fp8, dict(learning_rate=1e-3, b1=0.9)),
    "adam_8bit": (optim.adam_8bit, dict(learning_rate=1e-3, b1=0.9)),
    "lion_8bit": (optim.lion_8bit, dict(learning_rate=1e-4, b1=0.9)),
    "sgd_8bit": (optim.sgd_8bit, dict(learning_rate=1e-2, momentum=0.9)),
}


@pytest.mark.parametrize("name", sorted(INJECTABLE))
def test_every_optimizer_composes_without_recompiling(name):
    """inject_hyperparams, MultiSteps, apply_if_finite and masked, jitted, for each one."""
    factory, hyper = INJECTABLE[name]
    params = _params()
    mask = {"dense": {"kernel": True, "bias": False}, "proj": True, "scale": False}
    wrapped = {
        "inject": optax.inject_hyperparams(factory, static_args=("min_quantized_size",))(
            **hyper, min_quantized_size=1),
        "multi": optax.MultiSteps(factory(**hyper, min_quantized_size=1), every_k_schedule=2),
        "finite": optax.apply_if_finite(factory(**hyper, min_quantized_size=1), 2),
        "masked": optax.masked(factory(**hyper, min_quantized_size=1), mask),
    }
    for kind, tx in wrapped.items():
        traces = []

        def update(g, s, p, tx=tx, traces=traces):
            traces.append(1)
            return tx.update(g, s, p)

        step = jax.jit(update)
        s, p = tx.init(params), params
        for i in range(3):
            if kind == "inject":  # a new hyperparameter value is an array: no retrace
                first = next(iter(hyper))
                s.hyperparams[first] = jnp.asarray(hyper[first] * (1 + i), jnp.float32)
            u, s = step(_grads(params, i), s, p)
            p = optax.apply_updates(p, u)
        assert len(traces) == 1, (name, kind)
        assert all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32))))
                   for x in jax.tree.leaves((p, s))), (name, kind)
        if kind == "masked":
            np.testing.assert_array_equal(u["scale"], _grads(params, 2)["scale"])


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_flax_nnx_optimizer_matches_the_optax_api(name):
    """nnx.Optimizer stores quantized moments as State mappings; steps still match."""
    from flax import nnx

    def loss(m):
        return jnp.mean(jnp.square(m(jnp.linspace(-1.0, 1.0, 128).reshape(2, 64))))

    model = nnx.Linear(64, 128, rngs=nnx.Rngs(0))
    twin = nnx.Linear(64, 128, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, FACTORIES[name](min_quantized_size=1024), wrt=nnx.Param)
    tx = FACTORIES[name](min_quantized_size=1024)
    params = nnx.state(twin, nnx.Param)
    state = tx.init(params)
    for _ in range(3):
        opt.update(model, nnx.grad(loss)(model))
        u, state = tx.update(nnx.state(nnx.grad(loss)(twin), nnx.Param), state, params)
        params = optax.apply_updates(params, u)
        nnx.update(twin, params)
    np.testing.assert_array_equal(np.asarray(model.kernel[...]), np.asarray(twin.kernel[...]))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_python_scalars_empty_tensors_and_mixed_precision(name):
    tx = FACTORIES[name]()
    u, _ = tx.update({"a": 1.0}, tx.init({"a": 1.0}), {"a": 1.0})
    assert np.isfinite(float(u["a"]))
    tx0 = FACTORIES[name](min_quantized_size=0)
    for shape in [(0, 5000), (5000, 0)]:
        p = {"p": jnp.zeros(shape)}
        assert tx0.update(p, tx0.init(p), p)[0]["p"].shape == shape
    # float32 parameters with bfloat16 gradients: the update keeps float32 precision
    p = {"w": jnp.ones((64, 128))}
    g = {"w": jnp.full((64, 128), 0.3, jnp.bfloat16)}
    assert tx.update(g, tx.init(p), p)[0]["w"].dtype == jnp.float32


def test_rank1_only_where_its_maxima_are_cheap():
    tx = optim.adamw_4bit(1e-3)
    for shape, rank1 in [((1, 8192), False), ((8192, 1), False), ((4096, 2), False),
                         ((16, 4096), False), ((48, 300), True), ((512, 512), True),
                         ((24, 16, 64), True)]:
        state = tx.init(jnp.zeros(shape))
        assert isinstance(state[0].nu, optim.Rank1Moment) == rank1, shape
        assert optim.state_nbytes(state) / np.prod(shape) < 1.21, shape


def test_argument_errors_name_the_argument():
    with pytest.raises(TypeError, match="block_size"):
        optim.adamw_8bit(1e-3, block_size=1.0)
    with pytest.raises(TypeError, match="scale_dtype"):
        optim.adamw_8bit(1e-3, scale_dtype="foo")
    for m in (np.float32(1.5), jnp.float32(1.5), 0.0):
        with pytest.raises(ValueError, match="momentum"):
            optim.sgd_8bit(1e-2, m)
    code = optim.dynamic_map(True)
    with pytest.raises(ValueError, match="ascending"):
        optim.quantize_blockwise(jnp.ones(8), code[::-1])
    with pytest.raises(TypeError, match="shape"):
        optim.dequantize_blockwise(jnp.zeros(8, jnp.uint8), jnp.ones(1), code, "x")
