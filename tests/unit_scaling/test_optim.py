"""u-muP AdamW: learning-rate rules from tags, equivalence with optax, non-finite steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxq.unit_scaling as us
from jaxq.unit_scaling import ParamTag, optim


def test_lr_scale_rules():
    assert optim.lr_scale(ParamTag("weight", 256)) == pytest.approx(1 / 16)
    assert optim.lr_scale(ParamTag("weight", 256, depth=4)) == pytest.approx(1 / 32)
    assert optim.lr_scale(ParamTag("bias", 256, depth=4)) == pytest.approx(1 / 2)
    assert optim.lr_scale(ParamTag("norm", 256)) == 1.0
    assert optim.lr_scale(ParamTag("output", 256)) == 1.0


def test_adamw_matches_optax_per_parameter():
    """Each parameter follows optax.adamw with lr * lr_scale(tag)."""
    tags = {("w",): ParamTag("weight", 64, depth=4), ("b",): ParamTag("bias", 64, depth=4),
            ("o",): ParamTag("output", 64)}  # fmt: skip
    rng = np.random.default_rng(0)
    params = {k[0]: jnp.asarray(rng.standard_normal((3, 5)), jnp.float32) for k in tags}
    grads = [{k: jnp.asarray(rng.standard_normal((3, 5)), jnp.float32) for k in params}
             for _ in range(3)]  # fmt: skip
    for indep in (True, False):
        tx = optim.adamw(0.3, tags=tags, weight_decay=0.01, independent_weight_decay=indep)
        p, s = params, tx.init(params)
        for g in grads:
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
        for (name,), tag in tags.items():
            lr = 0.3 * optim.lr_scale(tag)
            wd = 0.01 / lr if indep else 0.01  # optax.adamw decays by lr * wd
            ref_tx = optax.adamw(lr, weight_decay=wd)
            rp, rs = params[name], ref_tx.init(params[name])
            for g in grads:
                ru, rs = ref_tx.update(g[name], rs, rp)
                rp = optax.apply_updates(rp, ru)
            np.testing.assert_allclose(p[name], rp, rtol=1e-5, atol=1e-6)


def test_adamw_on_model_state_and_untagged_error():
    m = us.TransformerDecoder(features=16, layers=1, heads=1, rngs=nnx.Rngs(0))
    params = nnx.state(m, nnx.Param)
    tx = optim.adamw(0.1, tags=m)
    grads = jax.tree.map(jnp.ones_like, params)
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    flat = {us.params.path_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(u)[0]}
    np.testing.assert_allclose(flat[("readout", "weight")], -0.1, rtol=1e-5)
    np.testing.assert_allclose(flat[("embed", "weight")], -0.1 / 4, rtol=1e-5)
    np.testing.assert_allclose(flat[("layers", 0, "mlp", "down", "weight")], -0.1 / 8, rtol=1e-5)
    plain = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="w has no u-muP tag"):
        optim.adamw(0.1, tags=m).update(plain, optim.adamw(0.1, tags=m).init(plain), plain)
    u, _ = optim.adamw(0.1, tags=m, default_scale=0.5).update(plain, tx.init(plain), plain)
    np.testing.assert_allclose(u["w"], -0.05, rtol=1e-5)
    with pytest.raises(TypeError, match="tags"):
        optim.adamw(0.1, tags=[1, 2])
    with pytest.raises(ValueError, match="weight_decay"):
        optim.adamw(0.1, tags=m, weight_decay=-1.0)


def test_nonfinite_gradients_skip_the_step():
    tags = {("w",): ParamTag("weight", 4)}
    tx = optim.adamw(0.1, tags=tags)
    p = {"w": jnp.ones(3)}
    s = tx.init(p)
    u, s2 = tx.update({"w": jnp.array([1.0, jnp.nan, 1.0])}, s, p)
    np.testing.assert_array_equal(u["w"], 0.0)  # parameters unchanged
    assert int(s2.total_notfinite) == 1
    for a, b in zip(jax.tree.leaves(s2.inner_state), jax.tree.leaves(s.inner_state), strict=True):
        np.testing.assert_array_equal(a, b)  # moments unchanged
    u, s3 = tx.update({"w": jnp.ones(3)}, s2, p)
    assert np.all(np.isfinite(u["w"])) and np.all(u["w"] < 0)


def test_inject_hyperparams_and_schedule():
    tags = {("w",): ParamTag("weight", 4)}
    static = ("tags", "independent_weight_decay", "default_scale", "skip_nonfinite")
    tx = optax.inject_hyperparams(optim.adamw, static_args=static)(learning_rate=0.2, tags=tags)
    p = {"w": jnp.ones(3)}
    u, _ = jax.jit(tx.update)({"w": jnp.ones(3)}, tx.init(p), p)
    np.testing.assert_allclose(u["w"], -0.1, rtol=1e-4)
    sched = optax.linear_schedule(0.2, 0.0, 10)
    tx2 = optim.adamw(sched, tags=tags)
    u, _ = tx2.update({"w": jnp.ones(3)}, tx2.init(p), p)
    np.testing.assert_allclose(u["w"], -0.1, rtol=1e-4)


def test_residual_taus_rule():
    """Every branch contributes equally within its kind and attention/MLP totals average
    ``residual_mult^2`` relative to the embedding (simulated with independent branches)."""
    layers, mult, ratio = 3, 0.5, 2.0
    taus = us.residual_taus(layers, residual_mult=mult, attn_ratio=ratio)
    coeff = {"emb": 1.0}  # contribution coefficients of each source in the stream
    for i, tau in enumerate(taus):
        norm = (1 + tau**2) ** 0.5
        var = sum(c**2 for c in coeff.values())
        assert var == pytest.approx(1.0)  # the stream stays unit-variance
        coeff = {k: c / norm for k, c in coeff.items()}
        coeff[i] = tau / norm  # a unit branch enters with weight tau / norm
    emb = coeff.pop("emb") ** 2
    attn = [coeff[i] ** 2 / emb for i in range(0, 2 * layers, 2)]
    mlp = [coeff[i] ** 2 / emb for i in range(1, 2 * layers, 2)]
    assert np.allclose(attn, attn[0]) and np.allclose(mlp, mlp[0])
    assert sum(attn) / sum(mlp) == pytest.approx(ratio**2)
    assert (sum(attn) + sum(mlp)) / 2 == pytest.approx(mult**2)
